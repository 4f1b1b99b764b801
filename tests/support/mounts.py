"""Finding and detaching the FUSE mounts a test left below its directory
(the safety net every fixture that mounts runs at teardown)."""

from __future__ import annotations

import os
import subprocess

from exportd.fuse import mount as fuse_mount


def fuse_mounts_under(root: str) -> list[str]:
    """Mountpoints of FUSE mounts below `root`, newest first."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            fstype = right.split()[0] if right else ""
            mountpoint = fields[4].replace("\\040", " ")
            if fstype.startswith("fuse") and (mountpoint == root or mountpoint.startswith(root + "/")):
                found.append(mountpoint)
    return found[::-1]


def lazy_unmount_all(root: str) -> None:
    for _ in range(4):
        mounts = fuse_mounts_under(root)
        if not mounts:
            return
        for m in mounts:
            subprocess.run(["umount", "-l", m], capture_output=True, timeout=20)


def exportd_mounts_under(root: str) -> list[str]:
    """Mountpoints of exportd's own FUSE mounts strictly below `root`."""
    return [
        m.mountpoint for m in fuse_mount.exportd_mounts() if m.mountpoint.startswith(root + os.sep)
    ]


def lazy_unmount_exportd_mounts(root: str) -> None:
    """Detach (umount -l) every exportd mount below `root`, deepest first."""
    for mp in sorted(set(exportd_mounts_under(root)), reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
