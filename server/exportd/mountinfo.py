"""The mount table (/proc/self/mountinfo), parsed once for every user: the
FUSE layer (its own mounts, stale ones) and the export's mountpoint checks.

Reading it is a procfs read that never reaches a FUSE server, so it is safe
on the loop; it still costs ~90 us per read (bench/README.md, Levers), so
hot paths prefer a statx of the mountpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    dev: tuple[int, int]  # (major, minor); for FUSE, minor is the connection number
    mountpoint: str
    fstype: str
    source: str
    options: str  # per-mount options, then the superblock's ("rw,nosuid,...,fd=5,user_id=0")

    @property
    def connection(self) -> int:
        return self.dev[1]

    @property
    def is_fuse(self) -> bool:
        return self.fstype == "fuse" or self.fstype.startswith("fuse.")


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        c = field[i]
        if c == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_mountinfo(path: str = "/proc/self/mountinfo") -> list[MountEntry]:
    """The mount table, in mount order (later entries cover earlier ones).
    A line that cannot be parsed is skipped: it is not one of ours."""
    entries = []
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, sep, right = line.rstrip("\n").partition(" - ")
            if not sep:
                continue
            a = left.split(" ")
            b = right.split(" ")
            try:
                major, minor = a[2].split(":")
                entries.append(
                    MountEntry(
                        mount_id=int(a[0]),
                        dev=(int(major), int(minor)),
                        mountpoint=_unescape(a[4]),
                        fstype=b[0],
                        source=_unescape(b[1]),
                        options=a[5] + "," + b[2],
                    )
                )
            except (ValueError, IndexError):
                continue
    return entries


def mounts_at(path: str, entries: list[MountEntry] | None = None) -> list[MountEntry]:
    """Entries mounted exactly on `path` (canonical), bottom first."""
    if entries is None:
        entries = read_mountinfo()
    return [e for e in entries if e.mountpoint == path]
