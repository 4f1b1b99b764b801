"""Image variants made by qemu-img/qemu-io (the oracles), shared by the tests."""

from __future__ import annotations

import random
from pathlib import Path

from tests.support.qcow2 import MiB, qemu_io, random_io_cmds, run

# name -> (short description); builders below
VARIANTS = [
    "v3-64k", "v3-512", "v3-2m", "v3-4k-odd-size", "v2", "rc1", "rc64", "lazy",
    "compressed-zlib", "compressed-zstd", "backing3", "snapshots", "v2-backing", "raw-backing",
]


def _create(path: Path, size: int, *opts: str, backing: Path | None = None, bfmt: str = "qcow2") -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing is not None:
        args += ["-b", backing.name, "-F", bfmt]
    run(*args, str(path), str(size))


def build(name: str, d: Path, seed: int = 1) -> Path:
    """Create variant `name` in directory `d`; returns the top image."""
    rng = random.Random(f"{name}-{seed}")
    img = d / f"{name}.qcow2"
    size = 4 * MiB

    def fill(path: Path, sz: int, n: int = 14, zeroes: bool = True) -> None:
        qemu_io(path, random_io_cmds(rng, sz, n, zeroes))

    if name == "v3-64k":
        _create(img, size)
        fill(img, size)
    elif name == "v3-512":
        _create(img, 3 * MiB, "cluster_size=512")
        fill(img, 3 * MiB)
    elif name == "v3-2m":
        size = 6 * MiB
        _create(img, size, "cluster_size=2M")
        fill(img, size, 6)
    elif name == "v3-4k-odd-size":
        size = 3 * MiB + 1536
        _create(img, size, "cluster_size=4096")
        fill(img, size)
        qemu_io(img, [f"write -P 0x5a {size - 1024} 1024"])
    elif name == "v2":
        _create(img, size, "compat=0.10")
        fill(img, size)
    elif name == "rc1":
        _create(img, size, "refcount_bits=1", "cluster_size=4096")
        fill(img, size)
    elif name == "rc64":
        _create(img, size, "refcount_bits=64", "cluster_size=1024")
        fill(img, size)
    elif name == "lazy":
        _create(img, size, "lazy_refcounts=on")
        fill(img, size)
    elif name in ("compressed-zlib", "compressed-zstd"):
        src = d / f"{name}-src.qcow2"
        _create(src, size, "cluster_size=16384")
        qemu_io(src, [f"write -P {i + 1} {i * 300 * 1024} 250k" for i in range(12)])
        fill(src, size, 6)
        args = ["qemu-img", "convert", "-c", "-O", "qcow2", "-o", "cluster_size=16384"]
        if name.endswith("zstd"):
            args[-1] += ",compression_type=zstd"
        run(*args, str(src), str(img))
        fill(img, size, 5)  # mix of compressed and normal clusters
    elif name == "backing3":
        base, mid = d / "base3.qcow2", d / "mid3.qcow2"
        _create(base, size, "cluster_size=4096")
        fill(base, size, 10, zeroes=False)
        _create(mid, size, "cluster_size=65536", backing=base)
        fill(mid, size, 8)
        _create(img, size, "cluster_size=8192", backing=mid)
        fill(img, size, 8)
    elif name == "snapshots":
        _create(img, size)
        fill(img, size, 10)
        run("qemu-img", "snapshot", "-c", "s1", str(img))
        fill(img, size, 8)
        run("qemu-img", "snapshot", "-c", "s2", str(img))
        fill(img, size, 8)
    elif name == "v2-backing":
        base = d / "v2base.qcow2"
        _create(base, size, "compat=0.10")
        fill(base, size, 8, zeroes=False)
        _create(img, size, "compat=0.10", backing=base)
        fill(img, size, 8, zeroes=False)
    elif name == "raw-backing":
        base = d / "base.raw"
        run("qemu-img", "create", "-q", "-f", "raw", str(base), str(3 * MiB))  # shorter than top
        qemu_io(base, random_io_cmds(rng, 3 * MiB, 8, zeroes=False), fmt="raw")
        _create(img, size, backing=base, bfmt="raw")
        fill(img, size, 8)
    else:
        raise KeyError(name)
    return img
