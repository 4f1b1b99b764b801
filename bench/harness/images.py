"""Benchmark images on tmpfs: random raw data and the same content as qcow2.

Images are made lazily, only for the families the selected peers need, and
every daemon that might lock or rewrite metadata gets its own copy, so that
peers running side by side never see each other's locks.

Every file a peer touches is made the same way, a copy (copy_file_range) of
a seed file that is then deleted: on tmpfs, how a file was written changes
how fast it reads (on kernel 6.18 a copied file reads 1 MiB blocks ~1.25x
faster than one written with write(), probably larger folios), and a peer
must not win by getting the better-made file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

QCOW2_CLUSTER_SIZE = 64 * 1024
_CHUNK = 16 * 1024 * 1024


def make_random_raw(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(_CHUNK, remaining)
            f.write(os.urandom(n))
            remaining -= n


def make_qcow2_copy(raw: Path, qcow2: Path) -> None:
    """Convert raw to a qcow2 with 64 KiB clusters; random data allocates every cluster."""
    out = subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qcow2",
         "-o", f"cluster_size={QCOW2_CLUSTER_SIZE}", str(raw), str(qcow2)],
        capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"qemu-img convert failed: {out.stderr.strip()}")


def qcow2_fully_allocated(qcow2: Path, size: int) -> bool:
    out = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", str(qcow2)],
                         check=True, capture_output=True, text=True).stdout
    data = sum(e["length"] for e in json.loads(out) if e.get("data"))
    return data == size


class Images:
    """The run's base images, created on first use, plus per-peer private copies."""

    def __init__(self, directory: Path, size: int) -> None:
        self.directory = directory
        self.size = size
        self._raw: Path | None = None
        self._qcow2: Path | None = None
        self.facts: dict[str, object] = {"size": size}

    def raw(self) -> Path:
        if self._raw is None:
            seed = self.directory / "seed.raw"
            make_random_raw(seed, self.size)
            path = self.directory / "base.raw"
            shutil.copyfile(seed, path)
            seed.unlink()
            self._raw = path
        return self._raw

    def qcow2(self) -> Path:
        if self._qcow2 is None:
            seed = self.directory / "seed.qcow2"
            make_qcow2_copy(self.raw(), seed)
            allocated = qcow2_fully_allocated(seed, self.size)
            self.facts["qcow2_fully_allocated"] = allocated
            if not allocated:
                raise RuntimeError(f"{seed} is not fully allocated")
            self.facts["qcow2_cluster_size"] = QCOW2_CLUSTER_SIZE
            path = self.directory / "base.qcow2"
            shutil.copyfile(seed, path)
            seed.unlink()
            self._qcow2 = path
        return self._qcow2

    def prepare(self, families: set[str]) -> None:
        """Make the base images up front: once a daemon holds the raw image
        locked, qemu-img can no longer read it to convert."""
        if "raw" in families or "qcow2" in families:
            self.raw()
        if "qcow2" in families:
            self.qcow2()

    def base(self, family: str) -> Path:
        return {"raw": self.raw, "qcow2": self.qcow2}[family]()

    def private_copy(self, family: str, owner: str, destination: Path | None = None) -> Path:
        """A copy of the base image for one peer (by default beside the base images)."""
        src = self.base(family)
        dst = destination or self.directory / f"{owner}.{family}"
        shutil.copyfile(src, dst)
        return dst
