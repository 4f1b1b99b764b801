"""Image creation without a daemon (what `qemu-img create` does; used by
`exportctl create`): a new raw or qcow2 image file.

Synchronous file I/O; call it from a worker thread when on the event loop.
Errors are BlockError with a message for the user.
"""

from __future__ import annotations

from exportd.block.file_create import PREALLOC_MODES, create_file
from exportd.block.qcow2.create import create_qcow2_file
from exportd.errors import BlockError


def create_image(path: str, size: int, fmt: str = "qcow2", cluster_size: int | None = None,
                 backing: str | None = None, backing_fmt: str | None = None,
                 preallocation: str = "off", *, refcount_bits: int = 16, compat: str = "1.1",
                 lazy_refcounts: bool = False, compression_type: str = "zlib") -> None:
    """Create (or overwrite) the image `path` of virtual size `size` bytes."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BlockError("Image size must be a non-negative integer")
    if preallocation not in PREALLOC_MODES:
        raise BlockError(f"Parameter 'preallocation' does not accept value '{preallocation}'")
    if fmt == "raw":
        if cluster_size is not None or backing is not None or backing_fmt is not None:
            raise BlockError("raw images have no cluster size or backing file")
        create_file(path, size, preallocation)
    elif fmt == "qcow2":
        create_qcow2_file(path, size, cluster_size, backing, backing_fmt, preallocation,
                          refcount_bits=refcount_bits, compat=compat, lazy_refcounts=lazy_refcounts,
                          compression_type=compression_type)
    else:
        raise BlockError(f"Format '{fmt}' does not support image creation (use raw or qcow2)")
