"""exportd's own FUSE kernel protocol layer (pure Python, asyncio).

Serves single-file filesystems: each mount's root inode is a regular file,
mounted over an existing regular file, as QEMU's FUSE export does.

    abi.py         constants and struct layouts of include/uapi/linux/fuse.h (7.45)
    requests.py    decoding of requests read from /dev/fuse
    replies.py     encoding of reply payloads (INIT's included)
    filesystem.py  SingleFileFS: the handler interface an export implements
    session.py     FuseSession: the life cycle (mount, INIT, close, end) and its State
    channel.py     the /dev/fuse fd: read loop, requests in flight, replies
    opcodes.py     the opcode table (decoder, handler, encoder) and the handshake
    readreply.py   how a READ is answered: splice, inline (extents) or await read()
    splice.py      the per-loop pipe READ replies are spliced through
    passthrough.py backing files for FUSE passthrough
    uring.py       FUSE over io_uring: ring entries, REGISTER, COMMIT_AND_FETCH
    iouring.py     a minimal io_uring (SQE128, URING_CMD) over the raw system calls
    buffers.py     receive buffers shared by all sessions of one loop
    busypoll.py    adaptive busy-polling of a loop's FUSE fds
    mount.py       mount(2) / fusermount3, unmount, stale-mount finder and cleaner

Public API:

    from exportd.fuse import FuseSession, SingleFileFS, Attr, SetAttr, OpenReply, StatFs
    session = await FuseSession.start(fs, mountpoint, fsname=..., read_only=...,
                                      allow_other=..., passthrough=...,
                                      io_uring="auto" | "on" | "off")
    session.closed            # future -> "closed" | "unmounted" | "destroy" | "error: ..."
    session.counters          # {"READ": n, ...}
    session.passthrough_available; session.open_backing(fd) -> id; session.close_backing(id)
    session.io_uring; session.io_uring_reason  # the ring serves; why not
    await session.close()     # unmount; idempotent
    mount.clean_stale_mounts([paths])  # blocking: run in a thread
"""

from .filesystem import Attr, OpenReply, SetAttr, SingleFileFS, StatFs
from .mount import MountError
from .passthrough import PassthroughUnavailable
from .session import FuseSession

__all__ = [
    "Attr",
    "FuseSession",
    "MountError",
    "OpenReply",
    "PassthroughUnavailable",
    "SetAttr",
    "SingleFileFS",
    "StatFs",
]
