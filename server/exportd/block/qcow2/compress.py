"""Compression and decompression of qcow2 compressed clusters (zlib raw
deflate, zstd), with QEMU's parameters (block/qcow2-threads.c)."""

from __future__ import annotations

import errno
import zlib

from exportd.block.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

try:  # optional dependency (pyproject extra "zstd")
    import zstandard
except ImportError:  # pragma: no cover - depends on the installation
    zstandard = None


def zstd_available() -> bool:
    return zstandard is not None


def decompress(data: bytes, cluster_size: int, ctype: int) -> bytes:
    """One cluster's worth of data, or OSError(EIO) if the stream is bad."""
    try:
        if ctype == COMPRESSION_ZLIB:
            d = zlib.decompressobj(-12)
            out = d.decompress(data, cluster_size)
        elif ctype == COMPRESSION_ZSTD:
            if zstandard is None:
                raise OSError(errno.ENOTSUP, "qcow2: zstd compressed cluster but the zstandard package is not installed")
            # one frame, possibly followed by padding up to the sector end
            dobj = zstandard.ZstdDecompressor().decompressobj()
            out = dobj.decompress(data)
        else:
            raise OSError(errno.ENOTSUP, f"qcow2: unknown compression type {ctype}")
    except (zlib.error, ValueError) as e:
        raise OSError(errno.EIO, f"qcow2: bad compressed cluster: {e}") from None
    except Exception as e:
        if zstandard is not None and isinstance(e, zstandard.ZstdError):
            raise OSError(errno.EIO, f"qcow2: bad compressed cluster: {e}") from None
        raise
    if len(out) < cluster_size:
        raise OSError(errno.EIO, "qcow2: compressed cluster decompresses to less than a cluster")
    return out[:cluster_size]


def compress(data: bytes | bytearray | memoryview, cluster_size: int, ctype: int) -> bytes | None:
    """One whole cluster compressed as QEMU does it, or None when the result
    would not be smaller than the cluster (QEMU gives deflate an output
    buffer of cluster_size - 1 bytes and writes such a cluster uncompressed).
    Pure computation: zlib and zstd release the GIL, so a worker thread may
    run it."""
    if ctype == COMPRESSION_ZLIB:
        # qcow2_zlib_compress: raw deflate, 4 KiB window, memLevel 9
        c = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -12, 9, zlib.Z_DEFAULT_STRATEGY)
        out = c.compress(data) + c.flush(zlib.Z_FINISH)
    elif ctype == COMPRESSION_ZSTD:
        if zstandard is None:
            raise OSError(errno.ENOTSUP, "qcow2: zstd compression but the zstandard package is not installed")
        out = zstandard.ZstdCompressor(level=3).compress(bytes(data))  # ZSTD_CLEVEL_DEFAULT
    else:
        raise OSError(errno.ENOTSUP, f"qcow2: unknown compression type {ctype}")
    return out if len(out) < cluster_size else None
