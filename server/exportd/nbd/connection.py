"""One NBD client connection: fixed newstyle negotiation, then the
transmission phase (NetworkBlockDevice's doc/proto.md).

- The handshake must end within the server's handshake-max-seconds.
- Without TLS the transmission phase leaves asyncio's streams for the fast
  path of nbd/transmit.py (the socket is handed over after NBD_OPT_GO); with
  TLS it stays here (transmit()). Both serve requests through _serve().
- Requests are served concurrently (up to MAX_IN_FLIGHT per client); each
  reply, whatever its chunks, is written by one synchronous call, so replies
  never interleave on the wire.
- While in transmission the connection holds a reference on its export
  (QEMU's: a safe block-export-del says "still in use"); each request holds
  one more, through BlockExport.request().
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import select
from typing import TYPE_CHECKING, Any

from exportd.aio.resume import Resume, start_eagerly
from exportd.authz import AuthzError, is_allowed_by_id
from exportd.block.node import Status
from exportd.export.io import to_the_end
from exportd.nbd import protocol as P
from exportd.nbd.meta import Contexts, base_allocation_extents, context_extents
from exportd.nbd.transmit import (
    MAX_IN_FLIGHT,
    OUT_HIGH,
    SPARSE_READ_MIN,
    Transmission,
    finish_resumed,
    read_extents_now,
    take_socket,
)
from exportd.tls import TlsError, peer_certificate_der, upgrade
from exportd.x509dn import DNError, subject_dn

if TYPE_CHECKING:
    from exportd.export.nbd import NbdExport
    from exportd.nbd.server import NbdServer

log = logging.getLogger(__name__)


MAX_DISCARDED_OPTION = 16 << 20     # an over-long option is skipped up to this, else dropped
CACHE_CHUNK = 4 << 20


class Disconnect(Exception):
    """End the connection quietly (ABORT, EXPORT_NAME of an unknown export...)."""


class Connection:
    def __init__(self, server: NbdServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.no_zeroes = False
        self.tls_done = False
        self.structured = False
        # NBD_OPT_EXTENDED_HEADERS: 32-byte requests and replies, 64-bit
        # effect lengths (implies everything structured replies allow)
        self.extended = False
        self.export: NbdExport | None = None
        self.contexts = Contexts()
        self.tasks: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._send_lock = asyncio.Lock()
        self._main: asyncio.Task[Any] | None = None
        self.fast: Transmission | None = None
        self.closed = False

    # --- life cycle -------------------------------------------------------------
    async def run(self) -> None:
        self._main = asyncio.current_task()
        try:
            limit = self.server.handshake_max_seconds
            async with asyncio.timeout(limit if limit else None):
                await self.negotiate()
            taken = None if self.tls_done else take_socket(self.reader, self.writer)
            if taken is None:
                await self.transmit()
            else:
                self.fast = Transmission(self, *taken)
                await self.fast.run()
        except (Disconnect, asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except P.ProtocolError as e:
            log.info("nbd: client dropped: %s", e)
        except asyncio.CancelledError:
            pass
        except Exception:  # noqa: BLE001 - one client's failure is that client's only
            log.exception("nbd: client failed")
        finally:
            await self._finish()

    def close(self) -> None:
        """Drop the client now (export shutdown, server stop)."""
        self.closed = True
        for t in list(self.tasks):
            t.cancel()
        self.writer.transport.abort()
        if self.fast is not None:
            self.fast.close()
        if self._main is not None and not self._main.done():
            self._main.cancel()

    def peer_gone(self) -> bool:
        """Whether the client has hung up (its DISC, if any, may be unread):
        poll's POLLRDHUP, without reading."""
        if self.fast is not None:
            fd = self.fast.sock.fileno()
        else:
            sock = self.writer.transport.get_extra_info("socket")
            fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return True
        p = select.poll()
        p.register(fd, select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR) for _, ev in p.poll(0))

    def depart(self) -> None:
        """The client is gone: let go of the export now (a safe
        block-export-del must not see a client that has hung up but whose
        end the loop has not processed yet), then close."""
        exp = self.export
        self.export = None
        if exp is not None:
            exp.clients.discard(self)
            exp.unref()
        self.close()

    async def _finish(self) -> None:
        # the connection's reference goes first, before any await (a second
        # cancel cannot leak it); requests in flight hold their own
        exp = self.export
        self.export = None
        if exp is not None:
            exp.clients.discard(self)
            exp.unref()
        self.writer.transport.abort()
        if self.fast is not None:
            self.fast.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            with contextlib.suppress(BaseException):
                await asyncio.gather(*self.tasks, return_exceptions=True)

    # --- I/O helpers --------------------------------------------------------------
    async def _read(self, n: int) -> bytes:
        return await self.reader.readexactly(n)

    async def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        fast = self.fast
        if fast is not None:
            fast.send(parts)
            if fast.out_bytes > OUT_HIGH:
                await fast.drained()
            return
        # one reply buffered at a time: a client that stops reading holds
        # its own replies back, not the daemon's memory
        async with self._send_lock:
            if self.closed or self.writer.transport.is_closing():
                raise ConnectionResetError("client gone")
            self.writer.writelines(parts)  # one call: nothing can come between the parts
            await self.writer.drain()

    async def _reply(self, option: int, rtype: int, data: bytes = b"") -> None:
        await self._send(P.pack_option_reply(option, rtype, data))

    async def _error(self, option: int, rtype: int, message: str = "") -> None:
        await self._reply(option, rtype, message.encode()[: P.MAX_STRING])

    # --- negotiation ---------------------------------------------------------------
    async def negotiate(self) -> None:
        await self._send(P.HANDSHAKE.pack(P.NBDMAGIC, P.IHAVEOPT,
                                          P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES))
        (cflags,) = P.CLIENT_FLAGS.unpack(await self._read(4))
        if cflags & ~(P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
            raise P.ProtocolError(f"unknown client flags {cflags:#x}")
        self.no_zeroes = bool(cflags & P.FLAG_C_NO_ZEROES)
        while True:
            opt, length = P.unpack_option_header(await self._read(P.OPTION_HEADER.size))
            if length > P.MAX_OPTION_LENGTH:
                if length > MAX_DISCARDED_OPTION or opt == P.OPT_EXPORT_NAME:
                    raise P.ProtocolError(f"option {opt} of {length} bytes")
                await self._read(length)
                await self._error(opt, P.REP_ERR_TOO_BIG, "option too long")
                continue
            data = await self._read(length)
            if self.server.tls is not None and not self.tls_done and opt not in (P.OPT_STARTTLS, P.OPT_ABORT):
                if opt == P.OPT_EXPORT_NAME:
                    raise Disconnect  # no way to answer EXPORT_NAME with an error
                await self._error(opt, P.REP_ERR_TLS_REQD, f"Option 0x{opt:x} not permitted before TLS")
                continue
            if await self._option(opt, data):
                return

    async def _option(self, opt: int, data: bytes) -> bool:
        """Handle one option; True once transmission starts."""
        if opt == P.OPT_EXPORT_NAME:
            if self.extended:  # proto.md: MUST NOT; it has no way to answer an error
                raise P.ProtocolError("EXPORT_NAME after extended headers were negotiated")
            return await self._export_name(data)
        if opt == P.OPT_ABORT:
            with contextlib.suppress(ConnectionError):
                await self._reply(opt, P.REP_ACK)
            raise Disconnect
        if opt == P.OPT_STARTTLS:
            await self._starttls(opt, data)
            return False
        if opt == P.OPT_LIST:
            if data:
                await self._error(opt, P.REP_ERR_INVALID, "no payload expected in option 3")
                return False
            for name, exp in sorted(self.server.exports.items()):
                if not exp.shutting_down:
                    await self._reply(opt, P.REP_SERVER, P.pack_server_reply(name, exp.description))
            await self._reply(opt, P.REP_ACK)
            return False
        if opt in (P.OPT_INFO, P.OPT_GO):
            return await self._info_go(opt, data)
        if opt == P.OPT_STRUCTURED_REPLY:
            if data:
                await self._error(opt, P.REP_ERR_INVALID, "no payload expected in option 8")
            elif self.extended:
                await self._error(opt, P.REP_ERR_EXT_HEADER_REQD, "extended headers already negotiated")
            elif self.structured:
                await self._error(opt, P.REP_ERR_INVALID, "structured reply already negotiated")
            else:
                self.structured = True
                await self._reply(opt, P.REP_ACK)
            return False
        if opt in (P.OPT_LIST_META_CONTEXT, P.OPT_SET_META_CONTEXT):
            await self._meta_context(opt, data)
            return False
        if opt == P.OPT_EXTENDED_HEADERS:
            if data:
                await self._error(opt, P.REP_ERR_INVALID, "no payload expected in option 11")
            elif self.extended:
                await self._error(opt, P.REP_ERR_INVALID, "extended headers already negotiated")
            else:
                self.extended = self.structured = True
                await self._reply(opt, P.REP_ACK)
            return False
        await self._error(opt, P.REP_ERR_UNSUP, f"Unsupported option {opt:#x} ({P.OPT_NAMES.get(opt, '?')})")
        return False

    async def _starttls(self, opt: int, data: bytes) -> None:
        """NBD_OPT_STARTTLS: the stream goes on over TLS (exportd.tls); a
        failed handshake ends the connection."""
        if self.server.tls is None:
            await self._error(opt, P.REP_ERR_POLICY, "TLS not configured")
            return
        if data:
            await self._error(opt, P.REP_ERR_INVALID, "no payload expected in option 5")
            return
        if self.tls_done:
            await self._error(opt, P.REP_ERR_INVALID, "TLS already negotiated")
            return
        await self._reply(opt, P.REP_ACK)
        try:
            await upgrade(self.writer, self.server.tls, server_side=True)
            if self.server.tls_authz is not None:
                await self._authorize(self.server.tls_authz)
        except TlsError as e:
            log.info("NBD client: %s", e)
            raise Disconnect from None
        self.tls_done = True
        # proto.md: what was negotiated before STARTTLS must be asked again
        self.structured = self.extended = False
        self.contexts = Contexts()

    async def _authorize(self, authz_id: str) -> None:
        """tls-authz: the client certificate's distinguished name must be
        allowed by the authz object `authz_id` (QEMU's
        qcrypto_tls_session_check_certificate, right after the handshake:
        a refused client is dropped without a reply). TlsError if not."""
        from exportd.objects import registry_of

        der = peer_certificate_der(self.writer)
        if der is None:
            raise TlsError("No certificate peers")
        try:
            identity = subject_dn(der)
        except DNError as e:
            raise TlsError(f"Cannot get client distinguished name: {e}") from None
        try:
            allowed = await is_allowed_by_id(registry_of(self.server.daemon).objects, authz_id, identity)
        except AuthzError as e:
            raise TlsError(str(e)) from None
        if not allowed:
            raise TlsError(f"TLS x509 authz check for {identity} is denied")

    async def _export_name(self, data: bytes) -> bool:
        name = data.decode(errors="replace")
        exp = self.server.find_export(name)
        if exp is None:
            raise Disconnect  # the protocol has no error reply for EXPORT_NAME
        flags = self._tflags(exp)
        reply = P.EXPORT_NAME_REPLY.pack(exp.current_length(), flags)
        if not self.no_zeroes:
            reply += bytes(P.EXPORT_NAME_ZEROES)
        self._attach(exp)
        await self._send(reply)
        return True

    async def _info_go(self, opt: int, data: bytes) -> bool:
        try:
            name, infos = P.unpack_go(data)
        except P.ProtocolError as e:
            await self._error(opt, P.REP_ERR_INVALID, str(e))
            return False
        exp = self.server.find_export(name)
        if exp is None:
            await self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return False
        if P.INFO_NAME in infos:
            await self._reply(opt, P.REP_INFO, P.pack_info_name(name))
        if P.INFO_DESCRIPTION in infos and exp.description:
            await self._reply(opt, P.REP_INFO, P.pack_info_description(exp.description))
        minimum, preferred, maximum = exp.block_sizes()
        await self._reply(opt, P.REP_INFO, P.pack_info_block_size(minimum, preferred, maximum))
        await self._reply(opt, P.REP_INFO, P.pack_info_export(exp.current_length(), self._tflags(exp)))
        if opt == P.OPT_INFO:
            await self._reply(opt, P.REP_ACK)
            return False
        if self.contexts.export_name != name:
            self.contexts = Contexts()  # negotiated for another export: void
        self._attach(exp)
        await self._reply(opt, P.REP_ACK)
        return True

    async def _meta_context(self, opt: int, data: bytes) -> None:
        if not self.structured:
            await self._error(opt, P.REP_ERR_INVALID, f"request option '{P.OPT_NAMES[opt]}' when structured reply is not negotiated")
            return
        try:
            name, queries = P.unpack_meta_context_query(data)
        except P.ProtocolError as e:
            await self._error(opt, P.REP_ERR_INVALID, str(e))
            return
        exp = self.server.find_export(name)
        if exp is None:
            await self._error(opt, P.REP_ERR_UNKNOWN, f"export '{name}' not present")
            return
        available = exp.meta_contexts()
        listing = opt == P.OPT_LIST_META_CONTEXT
        chosen = Contexts.select(available, queries, listing)
        for cid, cname in chosen:
            await self._reply(opt, P.REP_META_CONTEXT, P.pack_meta_context_reply(0 if listing else cid, cname))
        if not listing:
            self.contexts = Contexts(name, {n: i for i, n in chosen})
        await self._reply(opt, P.REP_ACK)

    def _tflags(self, exp: NbdExport) -> int:
        flags = (P.FLAG_HAS_FLAGS | P.FLAG_SEND_FLUSH | P.FLAG_SEND_FUA | P.FLAG_SEND_CACHE)
        if exp.writable:
            flags |= P.FLAG_SEND_TRIM | P.FLAG_SEND_WRITE_ZEROES | P.FLAG_SEND_FAST_ZERO
        else:
            flags |= P.FLAG_READ_ONLY
        if exp.multi_conn:
            flags |= P.FLAG_CAN_MULTI_CONN
        if self.structured:
            flags |= P.FLAG_SEND_DF
        return flags

    def _attach(self, exp: NbdExport) -> None:
        exp.ref()
        exp.clients.add(self)
        self.export = exp

    # --- transmission ------------------------------------------------------------------
    async def transmit(self) -> None:
        read = self.reader.readexactly
        extended = self.extended
        size = P.EXTENDED_REQUEST.size if extended else P.REQUEST.size
        exp = self.export
        assert exp is not None
        while True:
            req = P.unpack_request(await read(size), extended)
            payload = b""
            # compact: only a WRITE carries a payload; extended: any request
            # with PAYLOAD_LEN, whose length is then the payload's
            carries = req.flags & P.CMD_FLAG_PAYLOAD_LEN if extended else req.type == P.CMD_WRITE
            if carries:
                if req.length > P.MAX_PAYLOAD:
                    raise P.ProtocolError(f"payload of {req.length} bytes")  # cannot skip it safely
                payload = await read(req.length)
            if req.type == P.CMD_DISC:
                break
            await self.slots.acquire()
            # most requests finish without waiting (tmpfs, page cache): run
            # them here, and make a task only of one that really waits
            started = start_eagerly(self._serve(exp, req, payload))
            if type(started) is Resume:
                task = asyncio.get_running_loop().create_task(finish_resumed(started))
                self.tasks.add(task)
                task.add_done_callback(self._done)
            else:
                self.slots.release()
        # DISC: answer what is in flight, then close
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self.writer.drain()

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def _serve(self, exp: NbdExport, req: P.Request, payload: bytes) -> None:
        try:
            try:
                with exp.request():
                    await self._command(exp, req, payload)
            except OSError as e:
                await self._send_error(req, P.errno_to_nbd(e.errno or errno.EIO), e.strerror or str(e))
        except (ConnectionError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - one bad request fails alone
            log.exception("nbd: request %s failed", P.CMD_NAMES.get(req.type, req.type))
            with contextlib.suppress(Exception):
                await self._send_error(req, P.EIO, "internal error")

    def _chunk_header(self, req: P.Request, rtype: int, length: int, flags: int) -> bytes:
        """A reply chunk's header: 20-byte structured, or 32-byte extended
        (which repeats the request's offset)."""
        if self.extended:
            return P.pack_extended_chunk_header(req.cookie, rtype, length, flags, req.offset)
        return P.pack_chunk_header(req.cookie, rtype, length, flags)

    def _chunk(self, req: P.Request, rtype: int, payload: bytes = b"", flags: int = P.REPLY_FLAG_DONE) -> bytes:
        return self._chunk_header(req, rtype, len(payload), flags) + payload

    async def _send_error(self, req: P.Request, err: int, message: str) -> None:
        if self.structured:
            await self._send(self._chunk(req, P.REPLY_TYPE_ERROR, P.pack_error_payload(err, message)))
        else:
            await self._send(P.pack_simple_reply(req.cookie, err))

    async def _ok(self, req: P.Request) -> None:
        if self.extended:  # no simple replies once extended headers are on
            await self._send(self._chunk(req, P.REPLY_TYPE_NONE))
        else:
            await self._send(P.pack_simple_reply(req.cookie))

    def _check(self, exp: NbdExport, req: P.Request) -> None:
        """QEMU's request checks: flags valid for the command, range inside the export."""
        t, f = req.type, req.flags
        allowed = 0
        if t == P.CMD_READ:
            allowed = P.CMD_FLAG_DF if self.structured else 0
        elif t in (P.CMD_WRITE, P.CMD_TRIM):
            allowed = P.CMD_FLAG_FUA
        elif t == P.CMD_WRITE_ZEROES:
            allowed = P.CMD_FLAG_FUA | P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO
        elif t == P.CMD_BLOCK_STATUS:
            allowed = P.CMD_FLAG_REQ_ONE
        if f & ~allowed:
            raise OSError(errno.EINVAL, f"unsupported flags {f:#x} for {P.CMD_NAMES.get(t, t)}")
        if t in (P.CMD_READ, P.CMD_WRITE) and req.length > P.MAX_PAYLOAD:
            raise OSError(errno.EINVAL, "request too large")
        if t in (P.CMD_WRITE, P.CMD_TRIM, P.CMD_WRITE_ZEROES) and not exp.writable:
            raise OSError(errno.EPERM, "export is read-only")
        if t != P.CMD_FLUSH and req.offset + req.length > exp.current_length():
            raise OSError(errno.EINVAL, "operation past EOF")

    async def _command(self, exp: NbdExport, req: P.Request, payload: bytes) -> None:
        t = req.type
        if t not in P.CMD_NAMES or t == P.CMD_RESIZE:
            raise OSError(errno.EINVAL, f"unsupported command {t}")
        if self.extended:
            if (t == P.CMD_WRITE) != bool(req.flags & P.CMD_FLAG_PAYLOAD_LEN):
                # a WRITE must say its payload's length; nothing else takes
                # one here (no BLOCK_STATUS payload form: not advertised)
                raise OSError(errno.EINVAL, f"{P.CMD_NAMES[t]} with{'out' if t == P.CMD_WRITE else ''} a payload")
            req = req._replace(flags=req.flags & ~P.CMD_FLAG_PAYLOAD_LEN)
        self._check(exp, req)
        io = exp.io
        if t == P.CMD_READ:
            return await self._cmd_read(exp, req)
        if t == P.CMD_WRITE:
            view = memoryview(payload)
            if io.write_now(req.offset, view) is None:
                await io.write(req.offset, view)
            if req.flags & P.CMD_FLAG_FUA:
                await io.flush()
        elif t == P.CMD_FLUSH:
            await io.flush()
        elif t == P.CMD_TRIM:
            exp.forget_data()
            if req.length:
                await to_the_end(exp.node.discard(req.offset, req.length))
            if req.flags & P.CMD_FLAG_FUA:
                await io.flush()
        elif t == P.CMD_WRITE_ZEROES:
            if req.flags & P.CMD_FLAG_FAST_ZERO and not exp.fast_zero():
                raise OSError(errno.EOPNOTSUPP, "fast zeroing not supported")
            exp.forget_data()
            if req.length:
                await io.write_zeroes(req.offset, req.length, may_unmap=not req.flags & P.CMD_FLAG_NO_HOLE)
            if req.flags & P.CMD_FLAG_FUA:
                await io.flush()
        elif t == P.CMD_CACHE:
            pos, end = req.offset, req.offset + req.length
            while pos < end:  # read it once: warms the caches below
                n = min(CACHE_CHUNK, end - pos)
                await io.read(pos, n)
                pos += n
        elif t == P.CMD_BLOCK_STATUS:
            return await self._cmd_block_status(exp, req)
        await self._ok(req)

    async def _read_bytes(self, exp: NbdExport, offset: int, n: int) -> bytes | bytearray | memoryview:
        """The bytes, from the node's map when that cannot block (tmpfs), else awaited."""
        io = exp.io
        got = io.read_now(offset, n)
        if isinstance(got, (bytes, bytearray)):
            return got
        if got is not None:
            data = read_extents_now(got, n)
            if data is not None:
                return data
        return await io.read(offset, n)

    async def _cmd_read(self, exp: NbdExport, req: P.Request) -> None:
        off, n = req.offset, req.length
        if not self.structured:
            data = await self._read_bytes(exp, off, n) if n else b""
            await self._send(P.pack_simple_reply(req.cookie), data)
            return
        if n == 0:  # no OFFSET_DATA may be empty
            await self._send(self._chunk(req, P.REPLY_TYPE_NONE))
            return
        if req.flags & P.CMD_FLAG_DF or n < SPARSE_READ_MIN:
            data = await self._read_bytes(exp, off, n)
            await self._send(self._chunk_header(req, P.REPLY_TYPE_OFFSET_DATA, 8 + len(data), P.REPLY_FLAG_DONE),
                             P.U64.pack(off), data)
            return
        # sparse: holes as OFFSET_HOLE chunks, data as OFFSET_DATA, all built first
        runs: list[list[int]] = []  # [is_hole, start, length]
        pos, end = off, off + n
        steps = 0
        while pos < end:
            known, st = await exp.data_status(pos, end - pos)
            if known:
                ln, hole = min(known, end - pos), 0
            else:
                assert st is not None
                ln = min(st.length, end - pos) if st.length > 0 else end - pos
                hole = 1 if st.status & Status.ZERO else 0
            if runs and runs[-1][0] == hole:
                runs[-1][2] += ln
            else:
                runs.append([hole, pos, ln])
            pos += ln
            steps += 1
            if steps % 256 == 0:
                await asyncio.sleep(0)
        parts: list[bytes | bytearray | memoryview] = []
        for i, (hole, start, ln) in enumerate(runs):
            flags = P.REPLY_FLAG_DONE if i == len(runs) - 1 else 0
            if hole:
                parts.append(self._chunk(req, P.REPLY_TYPE_OFFSET_HOLE, P.pack_offset_hole(start, ln), flags))
            else:
                data = await self._read_bytes(exp, start, ln)
                parts.append(self._chunk_header(req, P.REPLY_TYPE_OFFSET_DATA, 8 + ln, flags))
                parts.append(P.U64.pack(start))
                parts.append(data)
        await self._send(*parts)

    async def _cmd_block_status(self, exp: NbdExport, req: P.Request) -> None:
        if not self.structured or not self.contexts.ids:
            raise OSError(errno.EINVAL, "no meta context negotiated")
        if req.length == 0:
            raise OSError(errno.EINVAL, "block status of zero bytes")
        one = bool(req.flags & P.CMD_FLAG_REQ_ONE)
        chunks: list[bytes] = []
        for cname, cid in self.contexts.ids.items():
            if cname == P.CONTEXT_BASE_ALLOCATION:
                ext = await self._base_allocation(exp, req.offset, req.length, one)  # the export's cache first
            else:
                ext = await context_extents(exp.node, exp.bitmaps, cname, req.offset, req.length, one)
            if one:  # exactly one descriptor (a run past 4 GiB comes split in two)
                ext = ext[:1]
            chunks.append(P.pack_block_status_ext(cid, ext) if self.extended else P.pack_block_status(cid, ext))
        rtype = P.REPLY_TYPE_BLOCK_STATUS_EXT if self.extended else P.REPLY_TYPE_BLOCK_STATUS
        parts = [self._chunk(req, rtype, c, P.REPLY_FLAG_DONE if i == len(chunks) - 1 else 0)
                 for i, c in enumerate(chunks)]
        await self._send(*parts)

    async def _base_allocation(self, exp: NbdExport, offset: int, length: int,
                               one: bool) -> list[tuple[int, int]]:
        """base:allocation, its first run of data from the export's cache
        (NbdExport.data_status): asked to the export's end once, not walked
        again by every request (SEEK_HOLE walks a tmpfs file's pages up to
        the next hole: milliseconds per call on a big image)."""
        known, _ = await exp.data_status(offset, length)
        if not known:
            return await base_allocation_extents(exp.node, offset, length, one)
        first = min(known, length)
        if one or first == length:
            return [(first, 0)]
        rest = await base_allocation_extents(exp.node, offset + first, length - first, one)
        if rest and rest[0][1] == 0:
            return [(first + rest[0][0], 0), *rest[1:]]
        return [(first, 0), *rest]
