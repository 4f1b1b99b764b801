"""Mounting, unmounting and stale-mount cleanup for single-file FUSE mounts.

As root: open /dev/fuse and mount(2) with `fd=N,rootmode=100000,...`
(filesystem type `fuse.exportd`, source = the fsname naming the export).
Otherwise: `fusermount3`, which mounts and hands the /dev/fuse fd back over a
socketpair (_FUSE_COMMFD, SCM_RIGHTS).

Every function here may block on the mountpoint (path lookup of a FUSE
mount): callers on the event loop run them in a worker thread
(exportd.aio.threads.in_own_thread), never on the loop that serves the mount.
"""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import logging
import os
import socket
import stat
import struct
import subprocess
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from exportd.mountinfo import MountEntry, read_mountinfo

log = logging.getLogger(__name__)

FS_SUBTYPE = "exportd"
FS_TYPE = "fuse." + FS_SUBTYPE
FUSERMOUNT = "fusermount3"

MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOATIME = 1024
MNT_FORCE = 1
MNT_DETACH = 2
UMOUNT_NOFOLLOW = 8

FUSECTL_DIR = "/sys/fs/fuse/connections"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_statx = getattr(_libc, "statx", None)  # glibc >= 2.28
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_NO_AUTOMOUNT = 0x800
AT_STATX_DONT_SYNC = 0x4000  # cached attributes: no request reaches a FUSE server
STATX_ATTR_MOUNT_ROOT = 0x2000
STATX_SIZE = 256
STATX_ATTRIBUTES = struct.Struct("<Q")  # stx_attributes at 8, stx_attributes_mask at 56
STATX_DEV = struct.Struct("<II")  # stx_dev_major, stx_dev_minor at 136


class MountError(OSError):
    """Mounting failed; the message carries the kernel's or fusermount3's words."""


@dataclass(frozen=True)
class MountOptions:
    fsname: str
    read_only: bool = False
    allow_other: bool = False
    default_permissions: bool = True
    max_read: int = 1 << 20


def _statx_cached(path: str) -> ctypes.Array[ctypes.c_char] | None:
    """statx of `path` itself that never waits on a FUSE server (cached
    attributes only); None when it fails or libc has no statx."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(STATX_SIZE)
    flags = AT_SYMLINK_NOFOLLOW | AT_NO_AUTOMOUNT | AT_STATX_DONT_SYNC
    if _statx(AT_FDCWD, os.fsencode(path), flags, 0, buf) != 0:
        return None
    return buf


def top_connection(mountpoint: str) -> int | None:
    """The FUSE connection whose mount is on top at `mountpoint` (FUSE
    superblocks are anonymous devices: major 0, minor = connection); None
    when that is not an anonymous device or statx fails. ~3 us, where
    reading mountinfo costs ~90 us (add+del cycle: bench/README.md, Levers)."""
    buf = _statx_cached(mountpoint)
    if buf is None:
        return None
    major, minor = STATX_DEV.unpack_from(buf, 136)
    return minor if major == 0 else None


def is_mount_root(path: str) -> bool | None:
    """Whether something is mounted on `path` (STATX_ATTR_MOUNT_ROOT, Linux
    >= 5.8); None when the kernel cannot tell or statx fails."""
    buf = _statx_cached(path)
    if buf is None:
        return None
    (attributes,) = STATX_ATTRIBUTES.unpack_from(buf, 8)
    (known,) = STATX_ATTRIBUTES.unpack_from(buf, 56)
    if not known & STATX_ATTR_MOUNT_ROOT:
        return None
    return bool(attributes & STATX_ATTR_MOUNT_ROOT)


def exportd_mounts(mountpoint: str | None = None) -> list[MountEntry]:
    """exportd FUSE mounts (optionally only at `mountpoint`), oldest first."""
    target = os.path.abspath(mountpoint) if mountpoint else None
    return [
        m
        for m in read_mountinfo()
        if m.fstype == FS_TYPE and (target is None or m.mountpoint == target)
    ]


def find_mount(mountpoint: str, fsname: str) -> MountEntry | None:
    """The newest exportd mount at `mountpoint` with source `fsname`."""
    found = [m for m in exportd_mounts(mountpoint) if m.source == fsname]
    return max(found, key=lambda m: m.mount_id) if found else None


def _escape_opt(value: str) -> str:
    # fusermount3 splits options at unescaped commas.
    return value.replace("\\", "\\\\").replace(",", "\\,")


def open_dev_fuse() -> int:
    return os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)


def check_target(mountpoint: str) -> None:
    """The mountpoint must be an existing regular file (the root inode is one)."""
    try:
        st = os.stat(mountpoint)
    except OSError as e:
        raise MountError(
            e.errno, f"cannot use {mountpoint!r} as mountpoint: {e.strerror}"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise MountError(errno.EINVAL, f"{mountpoint!r} is not a regular file")


def mount_root(fd: int, mountpoint: str, opts: MountOptions) -> None:
    """mount(2) as root with an already open /dev/fuse fd."""
    check_target(mountpoint)
    flags = MS_NOSUID | MS_NODEV | MS_NOATIME
    if opts.read_only:
        flags |= MS_RDONLY
    data = [
        f"fd={fd}",
        "rootmode=100000",
        f"user_id={os.geteuid()}",
        f"group_id={os.getegid()}",
        f"max_read={opts.max_read}",
        *_access_options(opts),
    ]
    rc = _libc.mount(
        opts.fsname.encode(),
        os.fsencode(mountpoint),
        FS_TYPE.encode(),
        flags,
        ",".join(data).encode(),
    )
    if rc != 0:
        e = ctypes.get_errno()
        raise MountError(e, f"mount {mountpoint}: {os.strerror(e)}")


def _access_options(opts: MountOptions) -> list[str]:
    """Options both mount paths pass on as they are."""
    return [name for name, on in (("default_permissions", opts.default_permissions),
                                  ("allow_other", opts.allow_other)) if on]


def mount_fusermount(mountpoint: str, opts: MountOptions) -> int:
    """Mount through fusermount3; returns the /dev/fuse fd it sends back."""
    check_target(mountpoint)
    options = [
        "ro" if opts.read_only else "rw",
        "nosuid",
        "nodev",
        "noatime",
        f"fsname={_escape_opt(opts.fsname)}",
        f"subtype={FS_SUBTYPE}",
        f"max_read={opts.max_read}",
        *_access_options(opts),
    ]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ, _FUSE_COMMFD=str(theirs.fileno()))
        proc = subprocess.Popen(
            [FUSERMOUNT, "-o", ",".join(options), "--", mountpoint],
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        fd = _receive_fd(ours)
        _, err = proc.communicate(timeout=30)
        text = err.decode(errors="replace").strip()
        if fd is None:
            raise MountError(errno.EIO, text or f"{FUSERMOUNT} failed (exit {proc.returncode})")
        if proc.returncode != 0:
            os.close(fd)
            raise MountError(errno.EIO, text or f"{FUSERMOUNT} failed (exit {proc.returncode})")
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
        return fd
    finally:
        ours.close()
        theirs.close()


def _receive_fd(sock: socket.socket) -> int | None:
    fds = array.array("i")
    try:
        msg, ancdata, _flags, _addr = sock.recvmsg(1, socket.CMSG_SPACE(fds.itemsize))
    except OSError:
        return None
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    return fds[0] if fds else None


def resolve_and_mount(
    path: str,
    fsname: str,
    mount: Callable[..., Any],
    fd: int | None,
    options: MountOptions,
) -> tuple[str, int | None, int | None]:
    """Resolve `path`, mount on it, find the new mount's FUSE connection:
    one worker thread does all three while the loop is free to answer INIT
    (one thread hop per mount instead of three: bench/README.md, add+del
    cycle). `mount` is mount_root (with the open /dev/fuse `fd`) or
    mount_fusermount (fd None). Returns (resolved path, the fd fusermount3
    handed over or None, the connection number or None)."""
    resolved = os.path.realpath(path)
    if fd is None:
        fd = mount(resolved, options)
        handed = fd
    else:
        mount(fd, resolved, options)
        handed = None
    connection = top_connection(resolved)
    if connection is None:
        try:
            found = find_mount(resolved, fsname)
        except OSError:
            found = None
        connection = found.connection if found else None
    return resolved, handed, connection


def unmount(mountpoint: str, *, lazy: bool = False) -> bool:
    """Unmount the top mount at `mountpoint`. False when nothing was mounted.

    Root uses umount2 (EBUSY falls back to a lazy detach); others use
    `fusermount3 -u` (with -z for lazy).
    """
    if os.geteuid() == 0:
        flags = UMOUNT_NOFOLLOW | (MNT_DETACH if lazy else 0)
        rc = _libc.umount2(os.fsencode(mountpoint), flags)
        if rc == 0:
            return True
        e = ctypes.get_errno()
        if e == errno.EBUSY and not lazy:
            return unmount(mountpoint, lazy=True)
        if e in (errno.EINVAL, errno.ENOENT):
            return False  # not a mount point (any more)
        raise OSError(e, f"umount {mountpoint}: {os.strerror(e)}")
    args = [FUSERMOUNT, "-u", "-q"] + (["-z"] if lazy else []) + ["--", mountpoint]
    proc = subprocess.run(args, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
    if proc.returncode == 0:
        return True
    text = proc.stderr.decode(errors="replace").strip()
    if "not found" in text or "not mounted" in text or "Invalid argument" in text:
        return False
    if not lazy and ("busy" in text.lower()):
        return unmount(mountpoint, lazy=True)
    raise OSError(errno.EIO, text or f"{FUSERMOUNT} -u failed")


def unmount_if_ours(mountpoint: str, connection: int | None, *, lazy: bool = False) -> bool:
    """Unmount only if the top exportd mount at `mountpoint` is `connection`."""
    if connection is not None and top_connection(mountpoint) == connection:
        return unmount(mountpoint, lazy=lazy)  # ours and on top: no mountinfo needed
    mounts = exportd_mounts(mountpoint)
    if not mounts:
        return False
    top = max(mounts, key=lambda m: m.mount_id)
    if connection is not None and top.connection != connection:
        # Not on top: someone mounted over it or it is already gone.
        if not any(m.connection == connection for m in mounts):
            return False
        log.warning("mount %s is covered by another mount; detaching lazily", mountpoint)
        lazy = True
    return unmount(mountpoint, lazy=lazy)


def abort_connection(connection: int) -> bool:
    """Write to /sys/fs/fuse/connections/N/abort (fusectl); False if unavailable."""
    path = os.path.join(FUSECTL_DIR, str(connection), "abort")
    try:
        with open(path, "w") as f:
            f.write("1")
        return True
    except OSError:
        return False


# --- stale mounts --------------------------------------------------------------


def probe(mountpoint: str, timeout: float = 2.0) -> str:
    """Stat `mountpoint` in a helper thread: 'alive', 'dead' (ENOTCONN) or 'hung'.

    A daemon thread does the stat so a hung connection cannot hang the caller
    (the thread itself stays blocked until the connection is aborted).
    """
    result: list[str] = []

    def run() -> None:
        try:
            os.stat(mountpoint)
            result.append("alive")
        except OSError as e:
            result.append(
                "dead" if e.errno in (errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV) else "alive"
            )

    t = threading.Thread(target=run, name=f"probe {mountpoint}", daemon=True)
    t.start()
    t.join(timeout)
    return result[0] if result else "hung"


def find_stale_mounts(
    mountpoints: list[str] | None = None, timeout: float = 2.0
) -> list[MountEntry]:
    """exportd mounts whose connection is dead (after a crash stat gives ENOTCONN).

    Blocking; run it in a thread. `mountpoints` limits the search.
    """
    mounts = exportd_mounts()
    if mountpoints is not None:
        wanted = {os.path.abspath(p) for p in mountpoints}
        mounts = [m for m in mounts if m.mountpoint in wanted]
    stale = []
    checked: dict[str, str] = {}
    for m in mounts:
        # Only the top mount at a path can be probed by path; lower ones are
        # judged by their connection being gone from fusectl when it exists.
        top = max((x for x in mounts if x.mountpoint == m.mountpoint), key=lambda x: x.mount_id)
        if m is top:
            state = checked.setdefault(m.mountpoint, probe(m.mountpoint, timeout))
            if state == "dead":
                stale.append(m)
        elif os.path.isdir(FUSECTL_DIR) and not os.path.exists(
            os.path.join(FUSECTL_DIR, str(m.connection))
        ):
            stale.append(m)
    return stale


def clean_stale_mounts(mountpoints: list[str] | None = None, timeout: float = 2.0) -> list[str]:
    """Abort and lazily unmount dead exportd mounts; returns the mountpoints cleaned.

    Blocking; run it in a thread. The daemon calls it at startup for every
    mountpoint it is asked to use.
    """
    cleaned = []
    for _ in range(8):  # stacked dead mounts at one path come off one by one
        stale = find_stale_mounts(mountpoints, timeout)
        if not stale:
            break
        progress = False
        for m in sorted(stale, key=lambda m: -m.mount_id):
            abort_connection(m.connection)
            try:
                if unmount(m.mountpoint, lazy=True):
                    progress = True
                    cleaned.append(m.mountpoint)
                    log.info("removed stale FUSE mount %s (%s)", m.mountpoint, m.source)
            except OSError as e:
                log.warning("cannot remove stale mount %s: %s", m.mountpoint, e)
        if not progress:
            break
    return cleaned
