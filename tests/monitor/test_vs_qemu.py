"""Differential test: exportd and qemu-storage-daemon (Debian's, test oracle
only) get the same bytes and must give the same replies.

Only inputs whose answer does not depend on the implementation are used:
framing and parse errors, request checks, negotiation, argument validation.
Known, deliberate differences are listed in DIFFERENCES.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time

import pytest

QSD = shutil.which("qemu-storage-daemon")

# Deliberate differences (not compared):
# - nested union discriminator errors: QEMU says 'driver', exportd 'file.driver'
# - qmp_capabilities enable of an unknown name: QEMU says "Parameter 'null' ...",
#   exportd "Capability x not available"
# - the greeting's version and capabilities (QEMU offers oob)

INPUTS: list[bytes] = [
    b'{"execute": "query-commands", "id": 1}',
    b"[1]", b'"abc" ', b"}", b"@", b'{"a" 1}', b"{1: 2}", b'{"a": 1,}', b"[1,]", b"[1 2]",
    b'{"a": 1 "b": 2}', b"xyz ", b'"\\ud800"', b'{"a": "\\x"}', b"{}", b'{"id": "i"}',
    b'{"execute": 1}', b'{"execute": "query-version", "arguments": []}',
    b'{"execute": "query-version", "x": 1}', b'{"exec-oob": "query-version"}',
    b'{"execute": "nope", "id": [1, {"a": null}]}', b'{"execute": "nope", "arguments": {"a": 1}}',
    b'{"execute": "query-version", "arguments": {"a": 1}, "id": "x"}',
    b'{"execute": "qmp_capabilities", "id": 2}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": "oob"}}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": [1]}}',
    b"{'execute': 'query-commands', 'id': 'it\\'s'}",
    b'{"execute": "blockdev-del"}',
    # invalid UTF-8 in a string, a duplicate key (QEMU refuses both)
    b'{"execute": "query-version", "id": "a\xffb"}', b'{"execute": "query-version", "id": "\xc3"}',
    b'{"execute": "query-version", "id": "\xed\xa0\x80"}', b'{"execute": "query-version", "id": "\xc3\xa9"}',
    b'{"execute": "query-version", "id": 1, "id": 2}', b'{"execute": "query-version", "id": "\xc0\x80"}',
    b'{"execute": "query-version", "id": "a\xffb, "x": 1} {"execute": "query-version", "id": 3}',
    b'@abc} {"execute": "query-version", "id": 4}', b'\xc3\xa9 {"execute": "query-version", "id": 5}',
    b'{"execute": "query-version", "arguments": {"a": 1, "a": 1}}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": 1}}',
    b'{"execute": "blockdev-del", "arguments": {"node-name": "x", "y": 1}}',
    b'{"execute": "query-named-block-nodes", "arguments": {"flat": "x"}}',
    b'{"execute": "query-block-exports", "arguments": {"z": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"node-name": "n"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "xx"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "foo": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "file": {"driver": "file"}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "file": {}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "file": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "raw", "file": {"driver": "file", "filename": "x", "zz": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "x", "backing": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "aio": "bad"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "aio": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "cache": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "cache": {"direct": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "cache": {"x": 1}}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "discard": 1}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "detect-zeroes": "no"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "file", "filename": "x", "locking": "maybe"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "size": 1.5}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "size": "1"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "null-co", "read-zeroes": "on"}}',
    b'{"execute": "blockdev-add", "arguments": {"driver": "qcow2", "file": "f", "l2-cache-size": "1M"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "fusex", "id": "e"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e", "node-name": "n"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "m", "allow-other": "x"}}',
    b'{"execute": "block-export-add", "arguments": {"type": "fuse", "id": "e", "node-name": "n", "mountpoint": "m", "writable": "yes"}}',
    b'{"execute": "block-export-del", "arguments": {"id": "e", "mode": "x"}}',
    b'{"execute": "block-export-del", "arguments": {}}',
    b'{"execute": "blockdev-create", "arguments": {"job-id": "j", "options": {"driver": "qcow2"}}}',
    b'{"execute": "query-version", "id": 1.5}',
    b'{"execute": "query-version", "id": {"nested": [true, false, null, "s"]}}',
]


class Conn:
    def __init__(self, path: str) -> None:
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(10)
        self.s.connect(path)
        self.f = self.s.makefile("rb")
        self.f.readline()

    def close(self) -> None:
        self.f.close()
        self.s.close()

    def ask(self, data: bytes) -> dict:
        self.s.sendall(data)
        return json.loads(self.f.readline())


def strip_version(reply: dict) -> dict:
    r = reply.get("return")
    if isinstance(r, dict) and "qemu" in r and "package" in r:
        return {**reply, "return": "<version>"}
    if isinstance(r, list) and r and isinstance(r[0], dict) and set(r[0]) == {"name"}:
        return {**reply, "return": "<command list>"}
    return reply


@pytest.fixture(scope="module")
def qsd(tmp_path_factory):
    if QSD is None:
        pytest.skip("qemu-storage-daemon is not installed")
    path = str(tmp_path_factory.mktemp("qsd") / "qsd.sock")
    proc = subprocess.Popen([QSD, "--chardev", f"socket,id=m,path={path},server=on,wait=off",
                             "--monitor", "chardev=m"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            Conn(path).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"qemu-storage-daemon did not start: {proc.communicate()[1]!r}")
            time.sleep(0.05)
    yield path
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def test_negotiation_same_as_qemu(qsd, module_daemon):
    # qemu-storage-daemon serves one client per monitor at a time: close each
    ours, theirs = Conn(module_daemon.socket), Conn(qsd)
    try:
        for data in (b'{"execute": "query-version", "id": 0}', b'{"execute": "nope"}',
                     b'{"execute": "qmp_capabilities", "arguments": {"enable": 1}}',
                     b'{"execute": "qmp_capabilities", "arguments": {"enable": []}}',
                     b'{"execute": "qmp_capabilities"}',
                     b'{"execute": "qmp_capabilities", "arguments": {"enable": 1}}'):
            assert ours.ask(data) == theirs.ask(data), data
    finally:
        ours.close()
        theirs.close()


@pytest.mark.parametrize("data", INPUTS, ids=range(len(INPUTS)))
def test_same_reply_as_qemu(qsd, module_daemon, data):
    ours, theirs = Conn(module_daemon.socket), Conn(qsd)
    try:
        for c in (ours, theirs):
            assert c.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
        assert strip_version(ours.ask(data)) == strip_version(theirs.ask(data))
    finally:
        ours.close()
        theirs.close()
