"""Random input at the QMP socket: the daemon answers or closes that
connection, and keeps serving everyone else.

A seeded loop (reproducible: the seed is in the assertion messages) sends
over 10,000 random byte strings and over 10,000 random JSON objects.
"""

from __future__ import annotations

import json
import random
import socket
import threading

import pytest

from exportd.monitor.jsonstream import JsonStream, ParseError

SEED = 20261123
BYTE_INPUTS = 10_240
OBJECT_INPUTS = 10_240

# Commands the fuzzer may name. quit (ends the daemon) and commands that
# create files or mounts from random arguments are left out on purpose.
SAFE_COMMANDS = [
    "qmp_capabilities", "query-version", "query-commands", "query-qmp-schema",
    "blockdev-add", "blockdev-del", "query-named-block-nodes", "query-block-exports",
    "block-export-del", "no-such-command", "", "x" * 300,
]
KEYS = ["driver", "node-name", "filename", "file", "size", "read-only", "cache", "direct",
        "id", "mode", "flat", "enable", "type", "writable", "backing", "offset", "x", ""]
TOKENS = [b"{", b"}", b"[", b"]", b":", b",", b'"', b"'", b"\\", b"true", b"null", b"-",
          b"1", b"1e9", b'"execute"', b'"arguments"', b'"id"', b"\x00", b"\xff", b"\xc3",
          b"\r\n", b" ", b"\\u", b"\\ud800", b"qmp_capabilities", b'"query-version"']


def random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 1, 2**63, -(2**63) - 1, 2**64, rng.randrange(-10**6, 10**6)])
    if kind == 3:
        return rng.choice([0.5, -1e300, 1e-9, 1.0])
    if kind in (4, 5):
        return rng.choice(["", "null-co", "file", "raw", "qcow2", "on", "safe", "hard", "fuse",
                           "/nonexistent/x", "ü☃", "a" * rng.randrange(0, 50), "'\"\\"])
    if kind in (6, 7):
        return {rng.choice(KEYS): random_value(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]


def random_request(rng: random.Random) -> dict:
    msg: dict = {}
    if rng.random() < 0.9:
        msg["execute"] = rng.choice(SAFE_COMMANDS) if rng.random() < 0.9 else random_value(rng)
    if rng.random() < 0.7:
        msg["arguments"] = random_value(rng) if rng.random() < 0.2 else {
            rng.choice(KEYS): random_value(rng) for _ in range(rng.randrange(5))}
    if rng.random() < 0.6:
        msg["id"] = random_value(rng)
    if rng.random() < 0.05:
        msg[rng.choice(KEYS)] = random_value(rng)
    return msg


def random_bytes(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(1, 64))
    return b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(1, 24)))


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s


def read_all(s: socket.socket) -> bytes:
    data = b""
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


def check_alive(path: str) -> None:
    s = connect(path)
    f = s.makefile("rb")
    assert b"QMP" in f.readline()
    s.sendall(b'{"execute":"qmp_capabilities","id":"alive"}')
    assert json.loads(f.readline()) == {"return": {}, "id": "alive"}
    s.close()


def test_random_bytes(daemon):
    d = daemon()
    rng = random.Random(SEED)
    per_connection = 256
    for conn in range(BYTE_INPUTS // per_connection):
        s = connect(d.socket)
        payload = b"".join(random_bytes(rng) for _ in range(per_connection))
        # write and read at once: replies must not be able to block the writer
        reader_out: list[bytes] = []
        t = threading.Thread(target=lambda out=reader_out, sock=s: out.append(read_all(sock)))
        t.start()
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        t.join(60)
        assert not t.is_alive(), f"seed {SEED} connection {conn}: no answer"
        s.close()
        out = reader_out[0]
        assert out.startswith(b'{"QMP"'), f"seed {SEED} connection {conn}"
        # whatever came back is well-formed CRLF-terminated JSON objects
        assert out.endswith(b"\r\n")
        for line in out.split(b"\r\n")[:-1]:
            msg = json.loads(line)
            assert isinstance(msg, dict) and ("QMP" in msg or "error" in msg or "return" in msg), line
        assert d.alive, d.stderr
    check_alive(d.socket)


def test_random_json_objects(daemon):
    d = daemon()
    rng = random.Random(SEED + 1)
    per_connection = 512
    sent = 0
    for conn in range(OBJECT_INPUTS // per_connection):
        requests = [random_request(rng) for _ in range(per_connection)]
        negotiate = conn % 2 == 0
        s = connect(d.socket)
        f = s.makefile("rb")
        assert b"QMP" in f.readline()
        if negotiate:
            s.sendall(b'{"execute":"qmp_capabilities"}')
            assert json.loads(f.readline()) == {"return": {}}
        payload = "".join(json.dumps(r) for r in requests).encode()
        t = threading.Thread(target=s.sendall, args=(payload,))
        t.start()
        for i, req in enumerate(requests):
            line = f.readline()
            assert line.endswith(b"\r\n"), f"seed {SEED + 1}: request {req!r} got no reply"
            reply = json.loads(line)
            where = f"seed {SEED + 1} conn {conn} #{i}: {req!r} -> {reply!r}"
            assert ("return" in reply) != ("error" in reply), where
            if "id" in req:
                assert "id" in reply and reply["id"] == req["id"], where
            else:
                assert "id" not in reply, where
            if "error" in reply:
                assert set(reply["error"]) == {"class", "desc"}, where
                assert reply["error"]["class"] in ("GenericError", "CommandNotFound", "DeviceNotFound"), where
                assert not reply["error"]["desc"].startswith("Internal error"), where
        t.join(30)
        s.close()
        sent += len(requests)
        assert d.alive, d.stderr
    assert sent >= 10_000
    check_alive(d.socket)


@pytest.mark.parametrize("seed", range(3))
def test_framing_is_chunking_independent(seed):
    """The same bytes give the same messages however they are split."""
    rng = random.Random(SEED + 100 + seed)
    for _ in range(300):
        stream = b" ".join(
            json.dumps(random_request(rng)).encode() if rng.random() < 0.7 else random_bytes(rng)
            for _ in range(rng.randrange(1, 8))
        ) + b" {}"
        whole = JsonStream().feed(stream)
        parser = JsonStream()
        pieces = []
        i = 0
        while i < len(stream):
            n = rng.randrange(1, 12)
            pieces += parser.feed(stream[i : i + n])
            i += n

        def norm(items):
            return [x.desc if isinstance(x, ParseError) else json.dumps(x) for x in items]

        assert norm(pieces) == norm(whole), stream
