"""Hostile clients against a real daemon, with probes that time what an
innocent user sees meanwhile (issue 16's verification; also bench/abuse.py).

A Target is a daemon (exportd, or qemu-storage-daemon as the peer) with a
FUSE export of a raw image and some extra nodes, so that a node query has
real work to do. Probes run in threads of this process, never in the
daemon: one reads 4 KiB at random offsets of the export with O_DIRECT,
one sends query-version on a second QMP connection; each records its
latencies. The abuses are plain-socket clients doing one bad thing each.
"""

from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import random
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IMAGE_SIZE = 64 << 20
EXTRA_NODES = 40  # with the file node: 41 nodes, as in the report


# --- raw QMP over a plain socket --------------------------------------------------------------
class RawClient:
    """A QMP connection at the byte level: sends what it is told, reads
    CRLF-terminated messages when asked."""

    def __init__(self, path: str, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buf = b""

    def recv_msg(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("EOF from the daemon")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def recv_reply(self) -> dict[str, Any]:
        """The next message that is not an event."""
        while True:
            msg = self.recv_msg()
            if "event" not in msg:
                return msg

    def negotiate(self) -> None:
        self.recv_msg()  # greeting
        self.sock.sendall(b'{"execute": "qmp_capabilities"}')
        self.recv_reply()

    def cmd(self, name: str, args: dict[str, Any] | None = None) -> dict[str, Any]:
        msg: dict[str, Any] = {"execute": name}
        if args:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        return self.recv_reply()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


# --- the daemon under test --------------------------------------------------------------------
@dataclass
class Target:
    kind: str  # "exportd" or "qsd"
    workdir: Path
    open_files: int | None = None  # RLIMIT_NOFILE of the daemon, when set
    proc: subprocess.Popen[bytes] | None = None
    sock: str = ""
    probe_sock: str = ""  # the probes' QMP socket (qsd's monitors take one client each)
    image: Path = field(default_factory=Path)
    mountpoint: Path = field(default_factory=Path)

    def start(self) -> Target:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sock = str(self.workdir / f"{self.kind}.sock")
        self.probe_sock = self.sock
        self.image = self.workdir / "probe.raw"
        with open(self.image, "wb") as f:
            f.write(os.urandom(1 << 20) * (IMAGE_SIZE >> 20))
        self.mountpoint = self.workdir / "probe.mnt"
        self.mountpoint.touch()
        node = f"driver=file,node-name=probe,filename={self.image}"
        export = f"type=fuse,id=probe,node-name=probe,mountpoint={self.mountpoint}"
        if self.kind == "exportd":
            # reads through the daemon's loop, as qsd's are (not the kernel's passthrough)
            export += ",passthrough=off"
            cmd = [sys.executable, "-m", "exportd", "--socket", self.sock]
            env = dict(os.environ, PYTHONPATH=str(ROOT / "server"))
        else:
            qsd = shutil.which("qemu-storage-daemon")
            assert qsd is not None, "qemu-storage-daemon is not installed"
            self.probe_sock = str(self.workdir / "probe.sock")
            cmd = [qsd, "--chardev", f"socket,id=m,path={self.sock},server=on,wait=off", "--monitor", "chardev=m",
                   "--chardev", f"socket,id=p,path={self.probe_sock},server=on,wait=off", "--monitor", "chardev=p"]
            env = dict(os.environ)
        cmd += ["--blockdev", node, "--export", export]
        limit = self.open_files

        def rlimit() -> None:
            if limit is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

        log = open(self.workdir / f"{self.kind}.log", "wb")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, preexec_fn=rlimit)
        log.close()
        deadline = time.monotonic() + 30
        while True:
            try:
                c = RawClient(self.sock, timeout=5)
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{self.kind} did not start: {self.log_text()}") from None
                time.sleep(0.05)
        try:
            c.negotiate()
            for i in range(EXTRA_NODES):
                r = c.cmd("blockdev-add", {"driver": "null-co", "node-name": f"null{i}", "size": 1 << 30})
                assert "return" in r, r
        finally:
            c.close()
        return self

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return (self.workdir / f"{self.kind}.log").read_text(errors="replace")[-3000:]
        return ""

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # a daemon that died leaves its mount behind: never ours to keep
        with open("/proc/mounts") as f:
            if f" {self.mountpoint} " in f.read():
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], check=False)


@contextlib.contextmanager
def running(kind: str, workdir: Path, **kw: Any) -> Iterator[Target]:
    target = Target(kind, workdir, **kw)
    target.start()
    try:
        yield target
    finally:
        target.stop()


# --- probes -----------------------------------------------------------------------------------
@dataclass
class Latencies:
    samples: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def worst(self) -> float:
        return max(self.samples, default=0.0)

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples)
        return {"count": len(s), "worst_ms": round(self.worst * 1000, 2),
                "median_ms": round(statistics.median(s) * 1000, 3) if s else None,
                "p99_ms": round(s[int(len(s) * 0.99)] * 1000, 2) if s else None,
                "over_50ms": sum(1 for x in s if x > 0.05), "errors": self.errors[:5]}


class Probes:
    """While open: FUSE reads and a second QMP client, each timed."""

    def __init__(self, target: Target, interval: float = 0.002) -> None:
        self.target = target
        self.interval = interval
        self.fuse = Latencies()
        self.qmp = Latencies()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Probes:
        self._qmp_client = RawClient(self.target.probe_sock)
        self._qmp_client.negotiate()
        self._fd = os.open(self.target.mountpoint, os.O_RDONLY | os.O_DIRECT)
        for fn in (self._read_loop, self._qmp_loop):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)
        time.sleep(0.2)  # a baseline before the abuse starts
        return self

    def __exit__(self, *exc: Any) -> None:
        time.sleep(0.2)
        self._stop.set()
        for t in self._threads:
            t.join(60)
        os.close(self._fd)
        self._qmp_client.close()

    def _read_loop(self) -> None:
        aligned = mmap.mmap(-1, 4096)  # O_DIRECT wants an aligned buffer
        rng = random.Random(1)
        while not self._stop.is_set():
            off = rng.randrange(IMAGE_SIZE // 4096) * 4096
            t0 = time.monotonic()
            try:
                n = os.preadv(self._fd, [aligned], off)
                assert n == 4096
            except OSError as e:
                self.fuse.errors.append(str(e))
                return
            self.fuse.samples.append(time.monotonic() - t0)
            time.sleep(self.interval)

    def _qmp_loop(self) -> None:
        c = self._qmp_client
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                r = c.cmd("query-version")
                assert "return" in r, r
            except (OSError, ConnectionError, AssertionError) as e:
                self.qmp.errors.append(str(e))
                return
            self.qmp.samples.append(time.monotonic() - t0)
            time.sleep(self.interval * 5)

    def result(self) -> dict[str, Any]:
        return {"fuse_read": self.fuse.summary(), "qmp": self.qmp.summary()}


# --- abuses: each returns facts about what the abusive client itself got ------------------------
def query_flood(target: Target, seconds: float = 5.0) -> dict[str, Any]:
    """query-named-block-nodes back to back without reading, then drain:
    every reply must come, in order."""
    c = RawClient(target.sock, timeout=120)
    c.negotiate()
    sent = 0
    c.sock.setblocking(False)
    deadline = time.monotonic() + seconds
    pending = b""
    while time.monotonic() < deadline:
        if not pending:
            pending = json.dumps({"execute": "query-named-block-nodes", "id": sent}).encode()
            sent += 1
        try:
            n = c.sock.send(pending)
            pending = pending[n:]
        except BlockingIOError:
            time.sleep(0.001)  # the daemon stopped reading us: backpressure
    c.sock.setblocking(True)
    c.sock.settimeout(120)
    # the rest of the last message goes while the replies are drained (the
    # daemon may read nothing more until we read)
    sender = threading.Thread(target=c.sock.sendall, args=(pending,), daemon=True)
    sender.start()
    got = 0
    in_order = True
    while got < sent:
        r = c.recv_reply()
        in_order &= r.get("id") == got and "return" in r
        got += 1
    sender.join(60)
    c.close()
    return {"sent": sent, "replies": got, "in_order": in_order}


def _send_all_then(c: RawClient, payload: Iterator[bytes]) -> None:
    for chunk in payload:
        c.sock.sendall(chunk)


def big_array(target: Target, mib: int = 60) -> dict[str, Any]:
    """A JSON array of `mib` MiB (past the token limit), then a good
    command: how many error replies came before its reply."""
    c = RawClient(target.sock, timeout=300)
    c.negotiate()
    piece = b"1," * (1 << 19)  # 1 MiB

    def payload() -> Iterator[bytes]:
        yield b"["
        for _ in range(mib):
            yield piece
        yield b'1]{"execute": "query-version", "id": "after"}'

    sender = threading.Thread(target=_send_all_then, args=(c, payload()), daemon=True)
    sender.start()
    errors: dict[str, int] = {}
    while True:
        r = c.recv_reply()
        if r.get("id") == "after":
            break
        desc = r.get("error", {}).get("desc", json.dumps(r)[:80])
        errors[desc] = errors.get(desc, 0) + 1
    sender.join(60)
    c.close()
    return {"error_replies": sum(errors.values()), "errors": errors}


def big_string(target: Target, mib: int = 28, escaped: bool = False) -> dict[str, Any]:
    """One message with a `mib` MiB string argument (under the size limit):
    it must get its reply (an error: no such command takes it)."""
    c = RawClient(target.sock, timeout=300)
    c.negotiate()
    unit = b"\\u00e9\\n" if escaped else b"a"
    body = unit * ((mib << 20) // len(unit))
    msg = b'{"execute": "query-version", "id": "big", "arguments": {"x": "' + body + b'"}}'
    sender = threading.Thread(target=c.sock.sendall, args=(msg,), daemon=True)
    sender.start()
    r = c.recv_reply()
    sender.join(60)
    c.close()
    return {"id": r.get("id"), "reply": r.get("error", {}).get("desc", "return" if "return" in r else r)}


def connect_burst(target: Target, clients: int = 200, seconds: float = 5.0) -> dict[str, Any]:
    """`clients` threads connecting in a loop, each waiting for its greeting
    (at most 5 s), for `seconds`."""
    counts = {"connections": 0, "greeted": 0, "no_greeting": 0, "refused": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def one() -> None:
        while time.monotonic() < deadline:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(5)
            try:
                s.connect(target.sock)
            except OSError:
                with lock:
                    counts["refused"] += 1
                s.close()
                time.sleep(0.01)
                continue
            try:
                data = s.recv(4096)
                ok = data.startswith(b'{"QMP"')
            except OSError:
                ok = False
            with lock:
                counts["connections"] += 1
                counts["greeted" if ok else "no_greeting"] += 1
            s.close()

    threads = [threading.Thread(target=one, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + 30)
    return counts


def nbd_export(target: Target) -> str:
    """An NBD server on a UNIX socket with the probe node's export 'probe'
    (read-only); its socket path."""
    path = str(target.workdir / "nbd.sock")
    if os.path.exists(path):
        return path  # started by an earlier abuse
    c = RawClient(target.sock)
    c.negotiate()
    for name, args in (("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}}),
                       ("block-export-add", {"type": "nbd", "id": "nbd-probe", "node-name": "probe"})):
        r = c.cmd(name, args)
        assert "return" in r, r
    c.close()
    return path


def _nbd_connect(path: str) -> socket.socket:
    """Fixed newstyle handshake with NBD_OPT_EXPORT_NAME 'probe', no zeroes."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(path)
    hello = _recv_exact(s, 18)
    assert hello[:16] == b"NBDMAGICIHAVEOPT", hello
    s.sendall(struct.pack(">I", 3))  # FIXED_NEWSTYLE | NO_ZEROES
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, 5) + b"probe")
    _recv_exact(s, 10)  # size, transmission flags
    return s


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("EOF from the NBD server")
        buf += chunk
    return bytes(buf)


def _nbd_reads(count: int, size: int = 4096) -> bytes:
    rng = random.Random(2)
    return b"".join(struct.pack(">IHHQQI", 0x25609513, 0, 0, i, rng.randrange(IMAGE_SIZE // size) * size, size)
                    for i in range(count))


def nbd_flood(target: Target, requests: int = 200_000) -> dict[str, Any]:
    """NBD READs of 4 KiB sent as fast as the server takes them, replies
    read as fast as they come: every reply must arrive."""
    s = _nbd_connect(nbd_export(target))
    sender = threading.Thread(target=s.sendall, args=(_nbd_reads(requests),), daemon=True)
    sender.start()
    got, bad = 0, 0
    reply = 16 + 4096
    buf = bytearray()
    while got < requests:
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
        whole = len(buf) // reply
        for i in range(whole):
            magic, error = struct.unpack_from(">II", buf, i * reply)
            bad += magic != 0x67446698 or error != 0
        del buf[: whole * reply]
        got += whole
    sender.join(60)
    s.close()
    return {"requests": requests, "replies": got, "bad_replies": bad}


def nbd_never_reads(target: Target, seconds: float = 5.0) -> dict[str, Any]:
    """NBD READs sent for `seconds` without ever reading a reply; then the
    client goes away."""
    s = _nbd_connect(nbd_export(target))
    s.setblocking(False)
    batch = _nbd_reads(10_000)
    sent, pending = 0, memoryview(batch)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            n = s.send(pending)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        sent += n
        pending = pending[n:] or memoryview(batch)
    s.close()
    return {"request_bytes_taken": sent}


ABUSES: dict[str, Callable[[Target], dict[str, Any]]] = {
    "query-flood": query_flood,
    "json-array-60MiB": big_array,
    "string-28MiB": big_string,
    "string-28MiB-escaped": lambda t: big_string(t, escaped=True),
    "connect-burst": connect_burst,
    "nbd-flood": nbd_flood,
    "nbd-never-reads": nbd_never_reads,
}


def _abuse_in_child(abuse: Callable[[Target], dict[str, Any]], target: Target, conn: Any) -> None:
    try:
        conn.send(abuse(target))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        conn.send({"failed": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


def probe(target: Target, abuse: Callable[[Target], dict[str, Any]], timeout: float = 300) -> dict[str, Any]:
    """Run `abuse` against `target` with the probes on; both sides' facts.
    The abuse runs in a process of its own, so that its work (hundreds of
    threads, big sends) does not slow the probes' threads."""
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    with Probes(target) as probes:
        t0 = time.monotonic()
        proc = ctx.Process(target=_abuse_in_child, args=(abuse, target, child))
        proc.start()
        child.close()
        try:
            facts = parent.recv() if parent.poll(timeout) else {"failed": f"no answer in {timeout} s"}
        except EOFError:
            facts = {"failed": "the abusing process died"}
        took = time.monotonic() - t0
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return {"abuse": facts, "seconds": round(took, 2), **probes.result(), "alive": target.alive}


def exports_until_refused(target: Target, most: int = 1000) -> dict[str, Any]:
    """FUSE exports of one node until block-export-add fails (the daemon
    runs under a low open-file limit); then a new QMP client must still be
    greeted and served. The exports are deleted again."""
    c = RawClient(target.sock, timeout=60)
    c.negotiate()
    made, error = 0, None
    for i in range(most):
        mnt = target.workdir / f"many-{i}.raw"
        mnt.touch()
        r = c.cmd("block-export-add", {"type": "fuse", "id": f"many{i}", "node-name": "null0",
                                       "mountpoint": str(mnt), "writable": False})
        if "error" in r:
            error = r["error"]["desc"]
            break
        made += 1
    late: dict[str, Any] = {}
    try:
        other = RawClient(target.sock, timeout=10)
        other.negotiate()
        late = other.cmd("query-version")
        other.close()
    except (OSError, ConnectionError, ValueError) as e:
        late = {"failed": str(e)}
    for i in range(made):
        c.cmd("block-export-del", {"id": f"many{i}"})
    c.close()
    return {"exports": made, "refused_with": error, "new_client": "ok" if "return" in late else late}
