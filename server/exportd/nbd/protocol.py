"""NBD wire format: constants and small pack/unpack helpers.

Source of the numbers: NetworkBlockDevice's doc/proto.md (fixed newstyle
negotiation, structured replies, extended headers) and QEMU's
docs/interop/nbd.rst (the qemu: meta contexts). Everything is big-endian.
Shared by the server (nbd/server.py) and the client driver (block/nbd.py):
names here are stable.
"""

from __future__ import annotations

import errno as _errno
import struct
from typing import NamedTuple

# --- magics ---------------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943          # "NBDMAGIC", first 8 bytes from the server
IHAVEOPT = 0x49484156454F5054          # "IHAVEOPT": newstyle; also each option's magic
CLISERV_MAGIC = 0x00420281861253       # oldstyle negotiation (not served)
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

# --- handshake flags (server, 16 bits) and client flags (32 bits) ----------
FLAG_FIXED_NEWSTYLE = 1 << 0
FLAG_NO_ZEROES = 1 << 1
FLAG_C_FIXED_NEWSTYLE = FLAG_FIXED_NEWSTYLE
FLAG_C_NO_ZEROES = FLAG_NO_ZEROES

# --- transmission flags (16 bits) -----------------------------------------
FLAG_HAS_FLAGS = 1 << 0
FLAG_READ_ONLY = 1 << 1
FLAG_SEND_FLUSH = 1 << 2
FLAG_SEND_FUA = 1 << 3
FLAG_ROTATIONAL = 1 << 4
FLAG_SEND_TRIM = 1 << 5
FLAG_SEND_WRITE_ZEROES = 1 << 6
FLAG_SEND_DF = 1 << 7
FLAG_CAN_MULTI_CONN = 1 << 8
FLAG_SEND_RESIZE = 1 << 9
FLAG_SEND_CACHE = 1 << 10
FLAG_SEND_FAST_ZERO = 1 << 11
FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# --- options --------------------------------------------------------------
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4                    # withdrawn
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

OPT_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT", OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO",
    OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT",
    OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}

# --- option reply types ---------------------------------------------------
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_FLAG_ERROR = 1 << 31
REP_ERR_UNSUP = REP_FLAG_ERROR | 1
REP_ERR_POLICY = REP_FLAG_ERROR | 2
REP_ERR_INVALID = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG = REP_FLAG_ERROR | 9
REP_ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10

# --- NBD_INFO types (in REP_INFO and in INFO/GO requests) -----------------
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# --- commands -------------------------------------------------------------
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_RESIZE = 8

CMD_NAMES = {
    CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS", CMD_RESIZE: "RESIZE",
}

# --- command flags (16 bits) ----------------------------------------------
CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4
CMD_FLAG_PAYLOAD_LEN = 1 << 5

# --- structured reply chunks ----------------------------------------------
REPLY_FLAG_DONE = 1 << 0
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_BLOCK_STATUS_EXT = 6
REPLY_TYPE_ERROR = (1 << 15) | 1
REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2


def reply_type_is_error(rtype: int) -> bool:
    return bool(rtype & (1 << 15))


# --- meta contexts ----------------------------------------------------------
CONTEXT_BASE_ALLOCATION = "base:allocation"
CONTEXT_QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
CONTEXT_QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
STATE_HOLE = 1 << 0                    # base:allocation flags
STATE_ZERO = 1 << 1

# --- errno values on the wire (not the host's) ------------------------------
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_HOST_TO_NBD = {
    _errno.EPERM: EPERM, _errno.EACCES: EPERM, _errno.EROFS: EPERM,
    _errno.EIO: EIO, _errno.ENOMEM: ENOMEM, _errno.EINVAL: EINVAL,
    _errno.ENOSPC: ENOSPC, _errno.EDQUOT: ENOSPC, _errno.EFBIG: ENOSPC,
    _errno.EOVERFLOW: EOVERFLOW, _errno.ENOTSUP: ENOTSUP,
    _errno.ESHUTDOWN: ESHUTDOWN,
}
_NBD_TO_HOST = {
    EPERM: _errno.EPERM, EIO: _errno.EIO, ENOMEM: _errno.ENOMEM,
    EINVAL: _errno.EINVAL, ENOSPC: _errno.ENOSPC, EOVERFLOW: _errno.EOVERFLOW,
    ENOTSUP: _errno.ENOTSUP, ESHUTDOWN: _errno.ESHUTDOWN,
}


def errno_to_nbd(host_errno: int) -> int:
    """A host errno as the protocol's value; anything unlisted is EINVAL, as proto.md says."""
    if host_errno == 0:
        return 0
    return _HOST_TO_NBD.get(host_errno, EINVAL)


def nbd_to_errno(nbd_errno: int) -> int:
    """A wire errno as the host's; unknown values are EINVAL."""
    if nbd_errno == 0:
        return 0
    return _NBD_TO_HOST.get(nbd_errno, _errno.EINVAL)


# --- limits -----------------------------------------------------------------
MAX_STRING = 4096                      # names, descriptions, context names
MAX_OPTION_LENGTH = 64 * 1024          # any option's payload (QEMU's NBD_MAX_BUFFER-ish bound)
MAX_PAYLOAD = 32 * 1024 * 1024         # largest READ/WRITE the server accepts (QEMU: 32 MiB)
EXPORT_NAME_ZEROES = 124               # pad after EXPORT_NAME's reply without NO_ZEROES

# --- fixed-size headers -----------------------------------------------------
HANDSHAKE = struct.Struct(">QQH")      # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY_HEADER = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY = struct.Struct(">QH")       # size, transmission flags
REQUEST = struct.Struct(">IHHQQI")     # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")   # magic, error, cookie
STRUCTURED_REPLY = struct.Struct(">IHHQI")     # magic, flags, type, cookie, length
EXTENDED_REPLY = struct.Struct(">IHHQQQ")      # magic, flags, type, cookie, offset, length
INFO_EXPORT_PAYLOAD = struct.Struct(">HQH")    # INFO_EXPORT, size, transmission flags
INFO_BLOCK_SIZE_PAYLOAD = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, min, preferred, max
OFFSET_HOLE_PAYLOAD = struct.Struct(">QI")
OFFSET_DATA_HEADER = struct.Struct(">Q")
ERROR_HEADER = struct.Struct(">IH")    # error, message length
BLOCK_DESCRIPTOR = struct.Struct(">II")        # length, flags
BLOCK_DESCRIPTOR_EXT = struct.Struct(">QQ")
U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")


class ProtocolError(Exception):
    """The peer broke the protocol: the connection is dropped."""


# --- options ----------------------------------------------------------------
class OptionHeader(NamedTuple):
    option: int
    length: int


def pack_option(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(IHAVEOPT, option, len(data)) + data


def unpack_option_header(buf: bytes) -> OptionHeader:
    magic, option, length = OPTION_HEADER.unpack(buf)
    if magic != IHAVEOPT:
        raise ProtocolError(f"bad option magic {magic:#x}")
    return OptionHeader(option, length)


class OptionReplyHeader(NamedTuple):
    option: int
    reply: int
    length: int


def pack_option_reply(option: int, reply: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY_HEADER.pack(OPTION_REPLY_MAGIC, option, reply, len(data)) + data


def unpack_option_reply_header(buf: bytes) -> OptionReplyHeader:
    magic, option, reply, length = OPTION_REPLY_HEADER.unpack(buf)
    if magic != OPTION_REPLY_MAGIC:
        raise ProtocolError(f"bad option reply magic {magic:#x}")
    return OptionReplyHeader(option, reply, length)


def pack_string(s: str | bytes) -> bytes:
    """A u32 length then the UTF-8 bytes (names in GO/INFO/LIST/META_CONTEXT)."""
    b = s.encode() if isinstance(s, str) else s
    return U32.pack(len(b)) + b


def unpack_string(buf: bytes, pos: int) -> tuple[str, int]:
    """Read a u32-length string at `pos`; returns (text, next position)."""
    if pos + 4 > len(buf):
        raise ProtocolError("string length past the end of the option")
    (n,) = U32.unpack_from(buf, pos)
    pos += 4
    if n > MAX_STRING or pos + n > len(buf):
        raise ProtocolError("string past the end of the option")
    try:
        return buf[pos:pos + n].decode(), pos + n
    except UnicodeDecodeError as e:
        raise ProtocolError("string is not UTF-8") from e


def pack_go(name: str, infos: list[int] | tuple[int, ...] = ()) -> bytes:
    """Payload of NBD_OPT_GO / NBD_OPT_INFO."""
    return pack_string(name) + U16.pack(len(infos)) + b"".join(U16.pack(i) for i in infos)


def unpack_go(buf: bytes) -> tuple[str, list[int]]:
    name, pos = unpack_string(buf, 0)
    if pos + 2 > len(buf):
        raise ProtocolError("GO/INFO without its info count")
    (n,) = U16.unpack_from(buf, pos)
    pos += 2
    if pos + 2 * n != len(buf):
        raise ProtocolError("GO/INFO info list does not match its count")
    return name, [U16.unpack_from(buf, pos + 2 * i)[0] for i in range(n)]


def pack_meta_context_query(name: str, queries: list[str] | tuple[str, ...]) -> bytes:
    """Payload of NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT."""
    return pack_string(name) + U32.pack(len(queries)) + b"".join(pack_string(q) for q in queries)


def unpack_meta_context_query(buf: bytes) -> tuple[str, list[str]]:
    name, pos = unpack_string(buf, 0)
    if pos + 4 > len(buf):
        raise ProtocolError("META_CONTEXT without its query count")
    (n,) = U32.unpack_from(buf, pos)
    pos += 4
    queries = []
    for _ in range(n):
        q, pos = unpack_string(buf, pos)
        queries.append(q)
    if pos != len(buf):
        raise ProtocolError("META_CONTEXT has trailing bytes")
    return name, queries


def pack_meta_context_reply(context_id: int, name: str) -> bytes:
    """Payload of NBD_REP_META_CONTEXT."""
    return U32.pack(context_id) + name.encode()


def pack_server_reply(name: str, description: str = "") -> bytes:
    """Payload of NBD_REP_SERVER (one export in NBD_OPT_LIST's answer)."""
    return pack_string(name) + description.encode()


def unpack_server_reply(buf: bytes) -> tuple[str, str]:
    name, pos = unpack_string(buf, 0)
    return name, buf[pos:].decode(errors="replace")


def pack_info_export(size: int, tflags: int) -> bytes:
    return INFO_EXPORT_PAYLOAD.pack(INFO_EXPORT, size, tflags)


def pack_info_name(name: str) -> bytes:
    return U16.pack(INFO_NAME) + name.encode()


def pack_info_description(text: str) -> bytes:
    return U16.pack(INFO_DESCRIPTION) + text.encode()


def pack_info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return INFO_BLOCK_SIZE_PAYLOAD.pack(INFO_BLOCK_SIZE, minimum, preferred, maximum)


# --- transmission -----------------------------------------------------------
class Request(NamedTuple):
    flags: int
    type: int
    cookie: int
    offset: int
    length: int


def pack_request(req: Request, extended: bool = False) -> bytes:
    if extended:
        return EXTENDED_REQUEST.pack(EXTENDED_REQUEST_MAGIC, req.flags, req.type,
                                     req.cookie, req.offset, req.length)
    return REQUEST.pack(REQUEST_MAGIC, req.flags, req.type, req.cookie, req.offset, req.length)


def unpack_request(buf: bytes, extended: bool = False) -> Request:
    if extended:
        magic, flags, rtype, cookie, offset, length = EXTENDED_REQUEST.unpack(buf)
        want = EXTENDED_REQUEST_MAGIC
    else:
        magic, flags, rtype, cookie, offset, length = REQUEST.unpack(buf)
        want = REQUEST_MAGIC
    if magic != want:
        raise ProtocolError(f"bad request magic {magic:#x}")
    return Request(flags, rtype, cookie, offset, length)


class SimpleReply(NamedTuple):
    error: int
    cookie: int


def pack_simple_reply(cookie: int, error: int = 0) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def unpack_simple_reply(buf: bytes) -> SimpleReply:
    magic, error, cookie = SIMPLE_REPLY.unpack(buf)
    if magic != SIMPLE_REPLY_MAGIC:
        raise ProtocolError(f"bad simple reply magic {magic:#x}")
    return SimpleReply(error, cookie)


class ChunkHeader(NamedTuple):
    flags: int
    type: int
    cookie: int
    length: int
    offset: int = 0                    # extended headers only


def pack_chunk_header(cookie: int, rtype: int, length: int, flags: int = 0) -> bytes:
    """Structured reply chunk header; the payload of `length` bytes follows."""
    return STRUCTURED_REPLY.pack(STRUCTURED_REPLY_MAGIC, flags, rtype, cookie, length)


def pack_extended_chunk_header(cookie: int, rtype: int, length: int, flags: int = 0,
                               offset: int = 0) -> bytes:
    return EXTENDED_REPLY.pack(EXTENDED_REPLY_MAGIC, flags, rtype, cookie, offset, length)


def unpack_chunk_header(buf: bytes) -> ChunkHeader:
    """A 20-byte structured or 32-byte extended reply header."""
    if len(buf) == EXTENDED_REPLY.size:
        magic, flags, rtype, cookie, offset, length = EXTENDED_REPLY.unpack(buf)
        if magic != EXTENDED_REPLY_MAGIC:
            raise ProtocolError(f"bad extended reply magic {magic:#x}")
        return ChunkHeader(flags, rtype, cookie, length, offset)
    magic, flags, rtype, cookie, length = STRUCTURED_REPLY.unpack(buf)
    if magic != STRUCTURED_REPLY_MAGIC:
        raise ProtocolError(f"bad structured reply magic {magic:#x}")
    return ChunkHeader(flags, rtype, cookie, length)


def pack_chunk(cookie: int, rtype: int, payload: bytes = b"", flags: int = 0,
               extended: bool = False) -> bytes:
    if extended:
        return pack_extended_chunk_header(cookie, rtype, len(payload), flags) + payload
    return pack_chunk_header(cookie, rtype, len(payload), flags) + payload


def pack_error_payload(error: int, message: str = "", offset: int | None = None) -> bytes:
    """Payload of REPLY_TYPE_ERROR (offset None) or REPLY_TYPE_ERROR_OFFSET."""
    msg = message.encode()[:MAX_STRING]
    out = ERROR_HEADER.pack(error, len(msg)) + msg
    if offset is not None:
        out += U64.pack(offset)
    return out


def unpack_error_payload(buf: bytes) -> tuple[int, str, int | None]:
    if len(buf) < ERROR_HEADER.size:
        raise ProtocolError("short error chunk")
    error, n = ERROR_HEADER.unpack_from(buf)
    end = ERROR_HEADER.size + n
    if end > len(buf):
        raise ProtocolError("error message past the chunk")
    msg = buf[ERROR_HEADER.size:end].decode(errors="replace")
    offset = U64.unpack_from(buf, end)[0] if len(buf) >= end + 8 else None
    return error, msg, offset


def pack_offset_hole(offset: int, length: int) -> bytes:
    return OFFSET_HOLE_PAYLOAD.pack(offset, length)


def pack_block_status(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """Payload of REPLY_TYPE_BLOCK_STATUS: context id, then (length, flags) pairs."""
    return U32.pack(context_id) + b"".join(BLOCK_DESCRIPTOR.pack(n, f) for n, f in extents)


def pack_block_status_ext(context_id: int, extents: list[tuple[int, int]]) -> bytes:
    """Payload of REPLY_TYPE_BLOCK_STATUS_EXT: context id, count, (u64 length, u64 flags)."""
    return (struct.pack(">II", context_id, len(extents))
            + b"".join(BLOCK_DESCRIPTOR_EXT.pack(n, f) for n, f in extents))


def unpack_block_status(buf: bytes, extended: bool = False) -> tuple[int, list[tuple[int, int]]]:
    if extended:
        context_id, count = struct.unpack_from(">II", buf)
        pos, d = 8, BLOCK_DESCRIPTOR_EXT
    else:
        (context_id,) = U32.unpack_from(buf)
        pos, d = 4, BLOCK_DESCRIPTOR
        count = (len(buf) - 4) // d.size
    if (len(buf) - pos) % d.size or (len(buf) - pos) // d.size != count:
        raise ProtocolError("block status payload is not whole descriptors")
    return context_id, [d.unpack_from(buf, pos + i * d.size) for i in range(count)]
