"""Mount table queries and forced unmounts, for the harness's own mountpoints."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounted_paths() -> set[str]:
    """Every mount point currently visible to this process."""
    paths = set()
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 4:
                paths.add(_unescape(fields[4]))
    return paths


def is_mounted(path: Path | str) -> bool:
    return str(path) in mounted_paths()


def mounts_under(directory: Path | str) -> list[str]:
    """Mount points inside directory, deepest first (safe unmount order)."""
    prefix = str(directory).rstrip("/") + "/"
    found = [p for p in mounted_paths() if p.startswith(prefix)]
    return sorted(found, key=len, reverse=True)


def force_unmount(path: Path | str) -> None:
    """Detach a mount even when its FUSE server is dead or hung (lazy unmount)."""
    path = str(path)
    if os.geteuid() == 0 and shutil.which("umount"):
        cmd = ["umount", "-l", path]
    else:
        cmd = ["fusermount3", "-u", "-z", path]
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30, check=False)
