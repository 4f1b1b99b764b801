"""The NBD transmission phase on a plain socket (no TLS): the fast path.

After NBD_OPT_GO (or EXPORT_NAME) a connection without TLS leaves asyncio's
streams: Connection hands its socket over (a dup of the fd; whatever the
StreamReader had buffered comes along) and this class serves it with the
loop's reader callback directly:

- requests are received with recv_into into one preallocated buffer and
  parsed in place (struct.unpack_from); a WRITE's payload is handed to the
  node as a view of that buffer, without a copy; a payload too big for it
  is received straight into a buffer of its own (kept for the next one);
- READ and WRITE that the node maps to host-file bytes that never block
  (tmpfs, ExportIO.read_now / write_now) are answered inline, header and
  data in one sendmsg, and the replies to one burst of requests together;
- anything else goes through Connection._serve (the same checks, errors and
  replies as the stream path): inline when it does not wait, else as a
  task, up to MAX_IN_FLIGHT per client (reading stops at that many);
- READs of 64 KiB and more go by sendfile, file to socket; when the
  socket is full the rest waits in the queue as a FilePiece (a dup of the
  node's descriptor, at most MAX_PIECES in the process) and is sent by
  sendfile when the socket takes it: its bytes are read then, not at the
  request, which NBD allows (a read is not ordered against requests that
  overlap it while it is in flight, and the client has not seen its reply);
- replies that do not fit in the socket wait in an ordered queue; above
  OUT_HIGH unsent bytes the client's requests are not read (a client that
  stops reading holds back only itself);
- between requests the loop's busy poller (exportd.fuse.busypoll, shared
  with the FUSE channels, EXPORTD_FUSE_BUSY_POLL_US) spins on the socket
  for a short adaptive window, so a client at queue depth 1 does not pay an
  epoll wake-up per request.

TLS connections stay on the stream path (Connection.transmit).
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from exportd.aio.resume import Resume, start_eagerly
from exportd.extents import Extent
from exportd.fuse.busypoll import poller_for, serve_readable
from exportd.nbd import protocol as P

if TYPE_CHECKING:
    from exportd.nbd.connection import Connection

# Requests are parsed in place here, and WRITE payloads up to 1 MiB are
# received in place too (a payload cut at the buffer's end is moved to its
# front: with 256 KiB writes, about one in eight). Pages are only touched
# as they are used.
RECV_BUFFER = 2 << 20
OWN_BUFFER_MIN = RECV_BUFFER // 2  # a larger WRITE payload gets a buffer of its own
BURST = 16                    # receives per readiness callback before the loop gets a turn
# ... and at most this long serving them: a client that sends requests as
# fast as it reads replies would otherwise keep the loop for tens of ms per
# receive (thousands of small READs), and every other client waits (issue 16).
# 0.5 ms cost 1 MiB writes a loop turn each (nbdcopy in: 608 -> 405 MiB/s)
SLICE_S = 0.002
OUT_HIGH = 4 << 20            # unsent reply bytes above which requests are not read
MAX_PARTS = 1000              # sendmsg takes at most IOV_MAX (1024) buffers
CORK_MAX = 256 * 1024         # replies held for one sendmsg at most this long
SENDFILE_MIN = 64 * 1024      # READs from this size on go by sendfile (when they can)
MAX_IN_FLIGHT = 16            # requests waiting in tasks per client (QEMU: 16)
SPARSE_READ_MIN = 64 * 1024   # smaller structured reads are sent as data (a block_status costs more)

_SIMPLE = P.SIMPLE_REPLY
# a structured OFFSET_DATA chunk's header and its offset, one pack
_DATA_CHUNK = struct.Struct(">IHHQIQ")
# the same with extended headers (magic, flags, type, cookie, offset, length, offset)
_EXT_DATA_CHUNK = struct.Struct(">IHHQQQQ")
_EXT_REPLY = P.EXTENDED_REPLY
_ZEROES = bytes(1 << 20)


async def finish_resumed(started: Resume) -> None:
    """A request's task: go on with a handler that waited (aio.resume)."""
    await started


class FilePiece:
    """Bytes of a host file queued for sendfile once the socket takes them:
    a descriptor of its own (a dup: the node's may be closed or replaced
    meanwhile), where, and how many are left."""

    __slots__ = ("fd", "offset", "left")

    def __init__(self, fd: int, offset: int, left: int) -> None:
        self.fd = os.dup(fd)
        self.offset = offset
        self.left = left

    def __len__(self) -> int:
        return self.left

    def close(self) -> None:
        global _pieces
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
            _pieces -= 1


# Descriptors held by queued pieces, in the whole process: past this, a big
# READ whose reply must wait is read into memory instead.
MAX_PIECES = 256
_pieces = 0


def _read_cached(fd: int, offset: int, n: int) -> bytearray | None:
    """`n` bytes of a disk file if the page cache has them all (RWF_NOWAIT),
    else None."""
    buf = bytearray(n)
    try:
        got = os.preadv(fd, (buf,), offset, os.RWF_NOWAIT)
    except OSError:  # EAGAIN, EOPNOTSUPP (no RWF_NOWAIT here), an error: read() will tell
        return None
    return buf if got == n else None


def read_extents_now(extents: list[Extent], n: int) -> bytes | bytearray | None:
    """The `n` bytes of a read mapping when no piece can block (or, for one
    extent of a disk file, the page cache has them), read now; None when
    one could (the caller awaits read()). A host file shorter than its
    extent reads as zeroes past its end."""
    if len(extents) == 1:
        fd, off, ln, never_blocks = extents[0]
        if not never_blocks:
            return _read_cached(fd, off, n)
        if fd < 0:
            return bytes(n)
        data = os.pread(fd, n, off)
        if len(data) == n:
            return data
        return data + bytes(n - len(data))
    for e in extents:
        if not e[3]:
            return None
    buf = bytearray(n)
    view = memoryview(buf)
    pos = 0
    for fd, off, ln, _ in extents:
        if fd >= 0:
            done = 0
            while done < ln:
                r = os.preadv(fd, [view[pos + done: pos + ln]], off + done)
                if r <= 0:
                    break  # past the host file's end: zeroes
                done += r
        pos += ln
    return buf


class Transmission:
    """One client's transmission phase on its own socket; see the module docstring."""

    def __init__(self, conn: Connection, sock: socket.socket, leftover: bytes) -> None:
        exp = conn.export
        assert exp is not None
        self.conn = conn
        self.exp = exp
        self.io = exp.io
        self.structured = conn.structured
        # NBD_OPT_EXTENDED_HEADERS: 32-byte requests, where PAYLOAD_LEN (not
        # the command) says a payload follows, and 32-byte replies only
        self.extended = conn.extended
        self.request = P.EXTENDED_REQUEST if self.extended else P.REQUEST
        self.request_size = self.request.size
        self.request_magic = P.EXTENDED_REQUEST_MAGIC if self.extended else P.REQUEST_MAGIC
        # the flags of a WRITE that may be served inline
        self.plain_write = P.CMD_FLAG_PAYLOAD_LEN if self.extended else 0
        self.sock = sock
        self.fd = sock.fileno()
        self.loop = asyncio.get_running_loop()
        self.buf = bytearray(max(RECV_BUFFER, len(leftover)))
        self.view = memoryview(self.buf)
        self.buf[: len(leftover)] = leftover
        self.head = 0                   # first unparsed byte
        self.tail = len(leftover)       # end of received bytes
        # a WRITE whose payload is being received into a buffer of its own
        self.big: tuple[int, int, int, int] | None = None  # flags, cookie, offset, length
        self.big_buf: bytearray | None = None
        self.big_type = P.CMD_WRITE
        self.big_filled = 0
        self.spare: bytearray | None = None  # the last own buffer, kept for the next
        # replies held while a burst of requests is served (_parse)
        self.corked: list[Any] | None = None
        self.corked_bytes = 0
        self.out: deque[memoryview | FilePiece] = deque()
        self.out_bytes = 0
        self.tasks = conn.tasks
        self.reading = False
        self.slice_end = 0.0  # when the current turn of serving this client ends
        self.continuing = False  # a turn for requests already received is scheduled
        self.writing = False
        self.disc = False
        self.closed = False
        self.ended: asyncio.Future[None] = self.loop.create_future()
        self._drain_waiters: list[asyncio.Future[None]] = []
        self.poller = poller_for(self.loop)

    # --- life cycle ----------------------------------------------------------------
    async def run(self) -> None:
        """Serve until DISC (after answering what is in flight), EOF or an
        error; a ProtocolError is raised."""
        self._update_reading()
        await self.ended

    def close(self) -> None:
        """Stop serving and close the socket (Connection._finish and close)."""
        self._lost()
        if self.fd >= 0:
            self.fd = -1
            self.sock.close()

    def _end(self, exc: BaseException | None = None) -> None:
        if not self.ended.done():
            if exc is None:
                self.ended.set_result(None)
            else:
                self.ended.set_exception(exc)
        self._set_reading(False)

    def _lost(self) -> None:
        """EOF or a socket error: the client is gone, nothing more to answer
        (the socket is closed by close(), when the connection ends)."""
        self.closed = True
        self._set_reading(False)
        if self.writing and self.fd >= 0:
            self.writing = False
            self.loop.remove_writer(self.fd)
        self._clear_out()
        self.out_bytes = 0
        self._wake_drain_waiters()
        self._end()

    # --- reading -------------------------------------------------------------------
    def _want_reading(self) -> bool:
        return (not self.closed and not self.disc and not self.ended.done()
                and len(self.tasks) < MAX_IN_FLIGHT and self.out_bytes <= OUT_HIGH)

    def _update_reading(self) -> None:
        want = self._want_reading()
        if want and not self.reading and self.head < self.tail:
            # requests received before reading stopped come first
            self._set_reading(True)
            self.slice_end = time.monotonic() + SLICE_S
            self._parse()
            self._continue_if_left()
            want = self._want_reading()
        self._set_reading(want)

    # --- taking turns with the loop's other work ---------------------------------------
    def _left_unserved(self) -> bool:
        """A whole request received but not served (its slice ran out); a
        partial one waits for the socket's readiness instead."""
        return (self.big is None and self.reading and self.tail - self.head >= self.request_size
                and self.tail - self.head >= self._needed(self.head, self.tail))

    def _continue_if_left(self) -> None:
        if not self.continuing and self._left_unserved():
            self.continuing = True
            self.loop.call_soon(self._continue)

    def _continue(self) -> None:
        self.continuing = False
        if self.closed or not self.reading:
            return  # what is left is served when reading resumes (_update_reading)
        self.slice_end = time.monotonic() + SLICE_S
        try:
            self._parse()
        except Exception as e:  # noqa: BLE001 - garbage or a bug: this client ends, alone
            self._end(e)
            return
        self._continue_if_left()

    def _set_reading(self, on: bool) -> None:
        if on == self.reading:
            return
        self.reading = on
        if on:
            self.loop.add_reader(self.fd, self._on_readable)
            if self.poller is not None:
                self.poller.register(self.fd, self._drain)
        elif self.fd >= 0:
            self.loop.remove_reader(self.fd)
            if self.poller is not None:
                self.poller.unregister(self.fd)

    def _on_readable(self) -> None:
        serve_readable(self.poller, self._drain)

    def _drain(self) -> bool:
        """Receive and serve what the socket has (up to BURST receives).
        True when nothing of this client is in flight or queued afterwards
        (the busy poller may spin on)."""
        sock = self.sock
        if self.continuing:
            return False  # requests already received come first (_continue)
        self.slice_end = time.monotonic() + SLICE_S
        for _ in range(BURST):
            if not self.reading:
                return False
            try:
                if self.big is not None:
                    big_buf = self.big_buf
                    assert big_buf is not None
                    want = self.big[3] - self.big_filled
                    n = sock.recv_into(memoryview(big_buf)[self.big_filled: self.big[3]])
                else:
                    tail = self.tail
                    want = len(self.buf) - tail
                    n = sock.recv_into(self.view[tail:] if tail else self.view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._lost()
                return False
            if n == 0:
                self._lost()
                return False
            try:
                if self.big is not None:
                    self.big_filled += n
                    if self.big_filled == self.big[3]:
                        self._big_done()
                else:
                    self.tail += n
                    self._parse()
            except Exception as e:  # noqa: BLE001 - garbage or a bug: this client ends, alone
                self._end(e)
                return False
            if n < want:
                break  # the socket is empty: the next readiness says when there is more
            if time.monotonic() > self.slice_end:
                break  # the socket's readiness brings us back
        self._continue_if_left()
        if self.continuing:
            return False
        # nothing in flight, nothing waiting for the socket to take it: the
        # poller may spin (while replies wait, the loop must watch for writability)
        return not self.tasks and not self.out

    def _parse(self) -> None:
        """Serve every whole request in buf[head:tail]; keep a partial one.
        When more than one request is there, the replies of those answered
        inline go out together at the end (one sendmsg for a burst, one
        wake-up of the client)."""
        buf = self.buf
        head, tail = self.head, self.tail
        request, size, want_magic, extended = self.request, self.request_size, self.request_magic, self.extended
        try:
            slice_end, first = self.slice_end, head
            while tail - head >= size and self.reading:
                if head != first and time.monotonic() > slice_end:
                    # the rest when the loop has had a turn (_continue_if_left);
                    # one request at least per call, so each makes progress
                    break
                magic, flags, typ, cookie, offset, length = request.unpack_from(buf, head)
                if magic != want_magic:
                    raise P.ProtocolError(f"bad request magic {magic:#x}")
                if (flags & P.CMD_FLAG_PAYLOAD_LEN) if extended else typ == P.CMD_WRITE:
                    if length > P.MAX_PAYLOAD:
                        raise P.ProtocolError(f"payload of {length} bytes")  # cannot skip it safely
                    start = head + size
                    end = start + length
                    if end > tail:
                        if length >= OWN_BUFFER_MIN:
                            self._big_start(flags, typ, cookie, offset, length, start, tail)
                            head = tail
                        break
                    head = end
                    if head < tail and self.corked is None:
                        self.corked = []  # more requests follow: one sendmsg for all
                    if typ == P.CMD_WRITE:
                        self._write(flags, cookie, offset, length, self.view[start:end])
                    elif typ == P.CMD_DISC:  # as the stream path: DISC ends it, payload or not
                        self._disconnect()
                        head = tail
                        break
                    else:  # read and refused (Connection._command): no payload expected
                        self._slow(P.Request(flags, typ, cookie, offset, length), b"")
                    continue
                head += size
                if head < tail and self.corked is None:
                    self.corked = []
                if typ == P.CMD_READ:
                    self._read(flags, cookie, offset, length)
                elif typ == P.CMD_DISC:
                    self._disconnect()
                    head = tail  # nothing after DISC is served
                    break
                else:
                    self._slow(P.Request(flags, typ, cookie, offset, length), b"")
        finally:
            if self.corked is not None:
                self._uncork()
                self.corked = None
            if head == tail:
                head = tail = 0
            elif head and len(buf) - head < self._needed(head, tail):
                # move the partial request to the front so it fits
                n = tail - head
                buf[:n] = buf[head:tail]
                head, tail = 0, n
            self.head, self.tail = head, tail

    def _needed(self, head: int, tail: int) -> int:
        """Bytes the partial request at `head` takes in the buffer."""
        size = self.request_size
        if tail - head < size:
            return size
        _, flags, typ, _, _, length = self.request.unpack_from(self.buf, head)
        carries = flags & P.CMD_FLAG_PAYLOAD_LEN if self.extended else typ == P.CMD_WRITE
        return size + length if carries else size

    def _big_start(self, flags: int, typ: int, cookie: int, offset: int, length: int,
                   start: int, tail: int) -> None:
        spare = self.spare
        if spare is not None and len(spare) == length:
            big = spare
            self.spare = None
        else:
            big = bytearray(length)
        have = tail - start
        big[:have] = self.view[start:tail]
        self.big = (flags, cookie, offset, length)
        self.big_type = typ
        self.big_buf = big
        self.big_filled = have

    def _big_done(self) -> None:
        big, payload = self.big, self.big_buf
        assert big is not None and payload is not None
        self.big = None
        self.big_buf = None
        flags, cookie, offset, length = big
        if self.big_type == P.CMD_DISC:
            self._disconnect()
        elif self.big_type != P.CMD_WRITE:  # a payload nothing expects (extended headers): refused
            self._slow(P.Request(flags, self.big_type, cookie, offset, length), b"")
            self.spare = payload
        elif self._write(flags, cookie, offset, length, memoryview(payload), owned=True):
            self.spare = payload  # written inline: nobody keeps it

    # --- requests ------------------------------------------------------------------
    def _read(self, flags: int, cookie: int, offset: int, length: int) -> None:
        exp = self.exp
        if (0 < length <= P.MAX_PAYLOAD and offset + length <= exp.current_length()
                and (flags == 0 or (flags == P.CMD_FLAG_DF and self.structured))
                and (not self.structured or flags or length < SPARSE_READ_MIN
                     or exp.known_data(offset) >= length)):
            try:
                got = self.io.read_now(offset, length)
                if type(got) is not list:
                    data = None
                elif length >= SENDFILE_MIN and len(got) == 1 and got[0][0] >= 0 and got[0][3]:
                    self._send_file(cookie, offset, length, got[0][0], got[0][1])
                    return
                else:
                    data = read_extents_now(got, length)
            except OSError as e:
                self._error(cookie, e, offset)
                return
            if data is not None:
                head = self._data_head(cookie, offset, length)
                self.send((head, data), len(head) + length)
                return
        self._slow(P.Request(flags, P.CMD_READ, cookie, offset, length), b"")

    def _data_head(self, cookie: int, offset: int, length: int) -> bytes:
        """What precedes a READ's data: a simple reply, or an OFFSET_DATA chunk's header."""
        if self.extended:
            return _EXT_DATA_CHUNK.pack(P.EXTENDED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_OFFSET_DATA,
                                        cookie, offset, 8 + length, offset)
        if self.structured:
            return _DATA_CHUNK.pack(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                    P.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length, offset)
        return _SIMPLE.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie)

    def _send_file(self, cookie: int, offset: int, length: int, fd: int, at: int) -> None:
        """A big READ of host-file bytes that never block: the data goes from
        the file to the socket by sendfile (one copy, no buffer); what the
        socket does not take now waits in the queue (_queue_file)."""
        head = self._data_head(cookie, offset, length)
        self._uncork()  # the replies before it go first
        if self.closed:
            return
        if self.out:
            self._queue_file(head, 0, fd, at, length)
            return
        try:
            n = self.sock.send(head)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._lost()
            return
        if n < len(head):  # the socket is full: header and data wait their turn
            self._queue_file(head, n, fd, at, length)
            self.writing = True
            self.loop.add_writer(self.fd, self._on_writable)
            return
        sent = 0
        try:
            while sent < length:
                n = os.sendfile(self.fd, fd, at + sent, length - sent)
                if n == 0:
                    break  # the host file ends early: zeroes follow
                sent += n
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            pass  # whatever went wrong, the rest goes as data read now
        if sent < length:
            self._queue_file(b"", 0, fd, at + sent, length - sent)
            self.writing = True
            self.loop.add_writer(self.fd, self._on_writable)

    def _queue_file(self, head: bytes, sent: int, fd: int, at: int, length: int) -> None:
        """Queue a READ reply's rest: what is left of `head`, then the data,
        as a FilePiece while descriptors are to be had, else read now."""
        global _pieces
        if sent < len(head):
            self.out.append(memoryview(head)[sent:])
        if _pieces < MAX_PIECES:
            self.out.append(FilePiece(fd, at, length))  # type: ignore[arg-type]
            _pieces += 1
        else:
            data = read_extents_now([(fd, at, length, True)], length)
            self.out.append(memoryview(data))  # type: ignore[arg-type]
        self.out_bytes += len(head) - sent + length
        if self.out_bytes > OUT_HIGH:
            self._set_reading(False)

    def _write(self, flags: int, cookie: int, offset: int, length: int, payload: memoryview,
               owned: bool = False) -> bool:
        """Serve a WRITE; True when it was written inline (`payload` is free
        again). A payload in the receive buffer is copied for a request that
        waits; an `owned` one is handed over."""
        exp = self.exp
        if flags == self.plain_write and length and exp.writable and offset + length <= exp.current_length():
            try:
                done = self.io.write_now(offset, payload)
            except OSError as e:
                self._error(cookie, e, offset)
                return True
            if done is not None:
                if self.extended:  # no simple replies: a NONE chunk
                    self.send((_EXT_REPLY.pack(P.EXTENDED_REPLY_MAGIC, P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE,
                                               cookie, offset, 0),), _EXT_REPLY.size)
                else:
                    self.send((_SIMPLE.pack(P.SIMPLE_REPLY_MAGIC, 0, cookie),), _SIMPLE.size)
                return True
        self._slow(P.Request(flags, P.CMD_WRITE, cookie, offset, length),
                   payload if owned else bytes(payload))
        return False

    def _error(self, cookie: int, e: OSError, offset: int) -> None:
        err = P.errno_to_nbd(e.errno or errno.EIO)
        if self.extended:
            msg = P.pack_error_payload(err, e.strerror or str(e))
            reply = P.pack_extended_chunk_header(cookie, P.REPLY_TYPE_ERROR, len(msg), P.REPLY_FLAG_DONE,
                                                 offset) + msg
        elif self.structured:
            msg = P.pack_error_payload(err, e.strerror or str(e))
            reply = P.pack_chunk(cookie, P.REPLY_TYPE_ERROR, msg, P.REPLY_FLAG_DONE)
        else:
            reply = P.pack_simple_reply(cookie, err)
        self.send((reply,), len(reply))

    def _slow(self, req: P.Request, payload: Any) -> None:
        """Everything but the inline READ/WRITE: Connection._serve, inline
        when it does not wait, else in a task."""
        started = start_eagerly(self.conn._serve(self.exp, req, payload))
        if type(started) is Resume:
            task = self.loop.create_task(finish_resumed(started))
            self.tasks.add(task)
            task.add_done_callback(self._task_done)
            if len(self.tasks) >= MAX_IN_FLIGHT:
                self._set_reading(False)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if self.closed:
            return
        if self.disc:
            self._maybe_disconnected()
            return
        if not self.reading:
            self._update_reading()
        if not self.tasks and not self.out and self.reading and self.poller is not None:
            self.poller.idle()

    def _disconnect(self) -> None:
        """DISC: answer what is in flight, then end."""
        self.disc = True
        self._set_reading(False)
        self._maybe_disconnected()

    def _maybe_disconnected(self) -> None:
        if not self.tasks and not self.out:
            self._end()

    # --- replies -------------------------------------------------------------------
    def send(self, parts: tuple[Any, ...] | list[Any], total: int = -1) -> None:
        """Send one reply whole, after the replies before it (`total`: its
        length when the caller knows it)."""
        if self.closed:
            return
        if total < 0:
            total = 0
            for p in parts:
                total += len(p)
        corked = self.corked
        if corked is not None:
            corked.extend(parts)
            self.corked_bytes += total
            if self.corked_bytes >= CORK_MAX or len(corked) >= MAX_PARTS:
                self._uncork()
            return
        self._send_now(parts, total)

    def _uncork(self) -> None:
        corked = self.corked
        if corked and not self.closed:
            total = self.corked_bytes
            self.corked = []
            self.corked_bytes = 0
            self._send_now(corked, total)

    def _send_now(self, parts: tuple[Any, ...] | list[Any], total: int) -> None:
        if len(parts) > MAX_PARTS:
            parts = (b"".join(parts),)
        if self.out:
            self._queue(parts, 0)
            self.out_bytes += total
            if self.out_bytes > OUT_HIGH:
                self._set_reading(False)
            return
        try:
            n = self.sock.sendmsg(parts)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._lost()
            return
        if n != total:
            self._queued(parts, n, total)

    def _queued(self, parts: tuple[Any, ...] | list[Any], sent: int, total: int) -> None:
        """A reply of which the socket took `sent` bytes (the queue was
        empty): the rest waits for the socket to be writable."""
        self._queue(parts, sent)
        self.out_bytes += total - sent
        self.writing = True
        self.loop.add_writer(self.fd, self._on_writable)
        if self.out_bytes > OUT_HIGH:
            self._set_reading(False)

    def _queue(self, parts: tuple[Any, ...] | list[Any], skip: int) -> None:
        out = self.out
        for p in parts:
            n = len(p)
            if skip >= n:
                skip -= n
                continue
            view = memoryview(p)
            out.append(view[skip:] if skip else view)
            skip = 0

    def _on_writable(self) -> None:
        out = self.out
        while out:
            first = out[0]
            if type(first) is FilePiece:
                try:
                    n = os.sendfile(self.fd, first.fd, first.offset, first.left)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    self._lost()  # the reply promised these bytes: nothing else can follow
                    return
                if n == 0:  # the host file ends early: zeroes promised
                    out[0] = memoryview(bytes(first.left))
                    first.close()
                    continue
                self.out_bytes -= n
                first.offset += n
                first.left -= n
                if not first.left:
                    first.close()
                    out.popleft()
                continue
            parts = []
            for part in out:
                if type(part) is FilePiece or len(parts) == MAX_PARTS:
                    break
                parts.append(part)
            try:
                n = self.sock.sendmsg(parts)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._lost()
                return
            self.out_bytes -= n
            while n:
                first = out[0]
                if n >= len(first):
                    n -= len(first)
                    out.popleft()
                else:
                    out[0] = first[n:]
                    n = 0
        self.writing = False
        self.loop.remove_writer(self.fd)
        self._wake_drain_waiters()
        if self.disc:
            self._maybe_disconnected()
        elif not self.reading:
            self._update_reading()

    def _clear_out(self) -> None:
        for part in self.out:
            if type(part) is FilePiece:
                part.close()
        self.out.clear()

    async def drained(self) -> None:
        """Wait until the queued replies went out (a coroutine's backpressure)."""
        if not self.out or self.closed:
            return
        fut = self.loop.create_future()
        self._drain_waiters.append(fut)
        await fut

    def _wake_drain_waiters(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


def take_socket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[socket.socket, bytes] | None:
    """Take a plain stream's socket from asyncio: a dup of its fd, and what
    the reader had received but not consumed. None for a TLS stream (and
    anything without a socket)."""
    transport = writer.transport
    if transport.get_extra_info("ssl_object") is not None:
        return None
    tsock = transport.get_extra_info("socket")
    buffered = getattr(reader, "_buffer", None)  # asyncio's: no public way to take it
    if tsock is None or not isinstance(buffered, bytearray):
        return None
    transport.pause_reading()
    leftover = bytes(buffered)
    buffered.clear()
    sock = socket.socket(fileno=os.dup(tsock.fileno()))
    sock.setblocking(False)
    transport.abort()  # closes its own fd; the dup keeps the connection
    return sock, leftover
