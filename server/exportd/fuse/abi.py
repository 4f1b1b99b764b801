"""FUSE kernel ABI: constants and struct layouts of include/uapi/linux/fuse.h.

Protocol 7.45 (Linux 6.19 header). Everything is little-endian/native on the
machines we run on; struct.Struct objects are compiled once here and shared.
Only what a single-file filesystem needs is spelled out; other opcodes are
listed so they can be counted and answered with ENOSYS.
"""

from __future__ import annotations

import struct

KERNEL_VERSION = 7
KERNEL_MINOR_VERSION = 45
# Oldest kernel minor we serve: 7.12 has every request layout we decode in
# its modern size (write_in/read_in since 7.9, fallocate from 7.19 is simply
# never sent by older kernels).
MIN_KERNEL_MINOR = 12

ROOT_ID = 1
MIN_READ_BUFFER = 8192

# --- opcodes --------------------------------------------------------------
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
REMOVEMAPPING = 49
SYNCFS = 50
TMPFILE = 51
STATX = 52
COPY_FILE_RANGE_64 = 53
MAX_OPCODE = 53

OPCODE_NAMES: dict[int, str] = {
    value: name
    for name, value in list(globals().items())
    if name.isupper()
    and isinstance(value, int)
    and name
    not in {
        "KERNEL_VERSION",
        "KERNEL_MINOR_VERSION",
        "MIN_KERNEL_MINOR",
        "ROOT_ID",
        "MIN_READ_BUFFER",
        "MAX_OPCODE",
    }
}


def opcode_name(opcode: int) -> str:
    return OPCODE_NAMES.get(opcode, f"OP{opcode}")


# --- INIT flags (flags | flags2 << 32) ------------------------------------
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
FILE_OPS = 1 << 2
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
SPLICE_WRITE = 1 << 7
SPLICE_MOVE = 1 << 8
SPLICE_READ = 1 << 9
FLOCK_LOCKS = 1 << 10
HAS_IOCTL_DIR = 1 << 11
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
NO_OPEN_SUPPORT = 1 << 17
PARALLEL_DIROPS = 1 << 18
HANDLE_KILLPRIV = 1 << 19
POSIX_ACL = 1 << 20
ABORT_ERROR = 1 << 21
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
EXPLICIT_INVAL_DATA = 1 << 25
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
INIT_RESERVED = 1 << 31
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
CREATE_SUPP_GROUP = 1 << 34
HAS_EXPIRE_ONLY = 1 << 35
DIRECT_IO_ALLOW_MMAP = 1 << 36
PASSTHROUGH = 1 << 37
NO_EXPORT_SUPPORT = 1 << 38
HAS_RESEND = 1 << 39
ALLOW_IDMAP = 1 << 40
OVER_IO_URING = 1 << 41
REQUEST_TIMEOUT = 1 << 42

# --- FOPEN_* (open_out.open_flags) ----------------------------------------
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_NONSEEKABLE = 1 << 2
FOPEN_CACHE_DIR = 1 << 3
FOPEN_STREAM = 1 << 4
FOPEN_NOFLUSH = 1 << 5
FOPEN_PARALLEL_DIRECT_WRITES = 1 << 6
FOPEN_PASSTHROUGH = 1 << 7

# --- setattr_in.valid -----------------------------------------------------
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10
FATTR_KILL_SUIDGID = 1 << 11

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
WRITE_CACHE = 1 << 0
WRITE_LOCKOWNER = 1 << 1
WRITE_KILL_SUIDGID = 1 << 2
# fuse_open_in.open_flags
OPEN_KILL_SUIDGID = 1 << 0
RELEASE_FLUSH = 1 << 0
UNIQUE_RESEND = 1 << 63

# --- struct layouts -------------------------------------------------------
# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# fuse_out_header: len, error, unique
OUT_HEADER = struct.Struct("<IiQ")

# fuse_init_in (7.36+: 64 bytes; older kernels send the first 16)
INIT_IN_COMPAT = struct.Struct("<IIII")  # major, minor, max_readahead, flags
INIT_IN = struct.Struct("<IIIII44x")  # ... flags2, unused[11]
# fuse_init_out: major, minor, max_readahead, flags, max_background,
# congestion_threshold, max_write, time_gran, max_pages, map_alignment,
# flags2, max_stack_depth, request_timeout, unused[11]
INIT_OUT = struct.Struct("<IIIIHHIIHHIIH22x")
INIT_OUT_COMPAT_22_SIZE = 24
INIT_OUT_COMPAT_SIZE = 8

# fuse_attr: ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec,
# ctimensec, mode, nlink, uid, gid, rdev, blksize, flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
# fuse_attr_out: attr_valid, attr_valid_nsec, dummy, attr
ATTR_OUT = struct.Struct("<QII" + ATTR.format[1:])
COMPAT_ATTR_OUT_SIZE = 96  # kernels < 7.9 lack blksize/flags

# fuse_getattr_in: getattr_flags, dummy, fh
GETATTR_IN = struct.Struct("<IIQ")
# fuse_setattr_in
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")
# (valid, padding, fh, size, lock_owner, atime, mtime, ctime,
#  atimensec, mtimensec, ctimensec, mode, unused4, uid, gid, unused5)
# fuse_open_in: flags, open_flags
OPEN_IN = struct.Struct("<II")
# fuse_open_out: fh, open_flags, backing_id
OPEN_OUT = struct.Struct("<QIi")
# fuse_read_in / fuse_write_in: fh, offset, size, read/write_flags, lock_owner, flags, padding
READ_IN = struct.Struct("<QQIIQII")
WRITE_IN = struct.Struct("<QQIIQII")
WRITE_IN_COMPAT_SIZE = 24
# fuse_write_out: size, padding
WRITE_OUT = struct.Struct("<II")
# fuse_release_in: fh, flags, release_flags, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")
# fuse_flush_in: fh, unused, padding, lock_owner
FLUSH_IN = struct.Struct("<QIIQ")
# fuse_fsync_in: fh, fsync_flags, padding
FSYNC_IN = struct.Struct("<QII")
# fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN = struct.Struct("<QQQII")
# fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")

# Notifications: messages the server sends unasked (unique 0, the code in
# the error field of fuse_out_header).
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")  # ino, off, len
ROOT_ID = 1  # the root inode, here the one file
# fuse_kstatfs: blocks, bfree, bavail, files, ffree, bsize, namelen, frsize, padding, spare[6]
STATFS_OUT = struct.Struct("<QQQQQIIII24x")
COMPAT_STATFS_SIZE = 48
INTERRUPT_IN = struct.Struct("<Q")
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")

# --- /dev/fuse ioctls -----------------------------------------------------
# struct fuse_backing_map { int32 fd; uint32 flags; uint64 padding; }
BACKING_MAP = struct.Struct("<iIQ")
_IOC_WRITE = 1
_IOC_READ = 2


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (type_ << 8) | nr


DEV_IOC_MAGIC = 229
DEV_IOC_CLONE = _ioc(_IOC_READ, DEV_IOC_MAGIC, 0, 4)
DEV_IOC_BACKING_OPEN = _ioc(_IOC_WRITE, DEV_IOC_MAGIC, 1, BACKING_MAP.size)
DEV_IOC_BACKING_CLOSE = _ioc(_IOC_WRITE, DEV_IOC_MAGIC, 2, 4)

assert IN_HEADER.size == 40
assert OUT_HEADER.size == 16
assert INIT_IN.size == 64
assert INIT_OUT.size == 64
assert ATTR.size == 88
assert ATTR_OUT.size == 104
assert SETATTR_IN.size == 88
assert READ_IN.size == 40
assert STATFS_OUT.size == 80
assert DEV_IOC_BACKING_OPEN == 0x4010E501
assert DEV_IOC_BACKING_CLOSE == 0x4004E502
