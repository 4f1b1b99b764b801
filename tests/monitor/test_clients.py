"""Real QMP clients talk to exportd unchanged: qemu.qmp (async and legacy),
qmp-shell piped, and a libvirt-style exchange."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess

import pytest
from qemu.qmp import EventListener, ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from exportd.qapi.schema import schema


async def test_qmpclient_execute_and_errors(module_daemon, qmp):
    client = await qmp(module_daemon)
    assert client.greeting is not None
    info = await client.execute("query-version")
    schema().check_returns("query-version", info)
    assert info["package"].startswith("exportd")
    names = {c["name"] for c in await client.execute("query-commands")}
    assert {"qmp_capabilities", "query-version", "query-commands", "quit", "query-qmp-schema"} <= names

    with pytest.raises(ExecuteError) as ei:
        await client.execute("query-version", {"bogus": 1})
    assert ei.value.error_class == "GenericError"
    assert str(ei.value) == "Parameter 'bogus' is unexpected"

    with pytest.raises(ExecuteError) as ei:
        await client.execute("no-such-command")
    assert ei.value.error_class == "CommandNotFound"
    assert str(ei.value) == "The command no-such-command has not been found"

    with pytest.raises(ExecuteError) as ei:
        await client.execute("blockdev-add", {"driver": "raw", "file": {"driver": "file"}})
    assert str(ei.value) == "Parameter 'file.filename' is missing"


async def test_qmpclient_concurrent_commands(module_daemon, qmp):
    client = await qmp(module_daemon)
    results = await asyncio.gather(*(client.execute("query-version") for _ in range(50)))
    assert len({json.dumps(r) for r in results}) == 1


async def test_qmpclient_events_through_listener(daemon, qmp):
    d = daemon()
    watcher = await qmp(d, "watcher")
    quitter = await qmp(d, "quitter")
    listener = EventListener("SHUTDOWN")
    with watcher.listen(listener):
        await quitter.execute("quit")
        event = await asyncio.wait_for(listener.get(), 15)
    assert event["event"] == "SHUTDOWN"
    assert event["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert set(event["timestamp"]) == {"seconds", "microseconds"}
    assert await asyncio.to_thread(d.wait, 15) == 0


def test_legacy_qemu_monitor_protocol(daemon):
    d = daemon()
    watcher = QEMUMonitorProtocol(d.socket)
    greeting = watcher.connect(negotiate=True)
    assert greeting["QMP"]["capabilities"] == []
    quitter = QEMUMonitorProtocol(d.socket)
    quitter.connect(negotiate=True)
    try:
        reply = watcher.cmd_raw("query-version")
        assert reply["return"]["package"].startswith("exportd")
        assert watcher.cmd("query-version")["package"].startswith("exportd")
        assert watcher.cmd_obj({"execute": "query-version", "id": "legacy-1"})["id"] == "legacy-1"
        bad = watcher.cmd_raw("blockdev-add", {"driver": "nope"})
        assert bad == {"error": {"class": "GenericError",
                                 "desc": "Parameter 'driver' does not accept value 'nope'"}}
        with pytest.raises(ExecuteError) as ei:
            watcher.cmd("blockdev-del", **{"node-name": 5})
        assert ei.value.error_class == "GenericError"
        assert str(ei.value) == "Invalid parameter type for 'node-name', expected: string"
        assert quitter.cmd_raw("quit") == {"return": {}}
        event = watcher.pull_event(wait=15.0)
        assert event is not None and event["event"] == "SHUTDOWN"
        assert event["data"]["reason"] == "host-qmp-quit"
    finally:
        # the server has closed both connections at exit (as QEMU does after
        # quit); the legacy client reports that as EOFError on close
        for c in (quitter, watcher):
            with contextlib.suppress(EOFError, ConnectionError):
                c.close()
    assert d.wait(15) == 0


def test_qmp_shell_piped(module_daemon):
    qmp_shell = __import__("shutil").which("qmp-shell") or str(
        __import__("pathlib").Path(__file__).resolve().parents[2] / ".venv/bin/qmp-shell")
    script = (
        "query-version\n"
        "query-commands\n"
        "no-such-cmd\n"
        "blockdev-del node-name=absent-node\n"
        "query-version bogus=1\n"
    )
    r = subprocess.run([qmp_shell, module_daemon.socket], input=script, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    replies = [json.loads(line.split("(QEMU) ", 1)[1]) for line in r.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert len(replies) == 5, r.stdout
    assert replies[0]["return"]["package"].startswith("exportd")
    assert {"name": "quit"} in replies[1]["return"]
    assert replies[2] == {"error": {"class": "CommandNotFound",
                                    "desc": "The command no-such-cmd has not been found"}}
    assert replies[3]["error"]["class"] in ("GenericError", "DeviceNotFound")
    assert replies[4] == {"error": {"class": "GenericError", "desc": "Parameter 'bogus' is unexpected"}}


class LibvirtStyle:
    """What libvirt's qemu monitor does: CRLF-framed replies, ids libvirt-N."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(15)
        self.sock.connect(path)
        self.buf = b""
        self.raw = b""
        self.n = 0

    def message(self) -> dict:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            assert chunk, "server closed"
            self.buf += chunk
            self.raw += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        return json.loads(line)

    def command(self, name: str, args: dict | None = None) -> dict:
        self.n += 1
        msg: dict = {"execute": name, "id": f"libvirt-{self.n}"}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode() + b"\r\n")
        while True:
            reply = self.message()
            if "event" in reply:
                continue
            assert reply["id"] == f"libvirt-{self.n}"
            return reply


def test_libvirt_style_exchange(daemon):
    d = daemon()
    lv = LibvirtStyle(d.socket)
    greeting = lv.message()
    assert "QMP" in greeting
    assert lv.command("qmp_capabilities") == {"return": {}, "id": "libvirt-1"}
    ver = lv.command("query-version")["return"]
    assert isinstance(ver["qemu"]["major"], int)
    commands = {c["name"] for c in lv.command("query-commands")["return"]}
    schema_info = lv.command("query-qmp-schema")["return"]
    by_name = {e["name"]: e for e in schema_info}
    # libvirt looks commands up in the introspected schema and follows arg-type
    for name in commands:
        assert by_name[name]["meta-type"] == "command"
        assert by_name[by_name[name]["arg-type"]]["meta-type"] == "object"
    assert by_name["SHUTDOWN"]["meta-type"] == "event"
    err = lv.command("query-version", {"x": 1})
    assert err == {"id": f"libvirt-{lv.n}", "error": {"class": "GenericError",
                                                      "desc": "Parameter 'x' is unexpected"}}
    # a reply whose strings hold newlines still has none unescaped
    lv.n += 1
    lv.sock.sendall(json.dumps({"execute": "query-version", "id": "line\nbreak\r\n"}).encode() + b"\r\n")
    assert lv.message()["id"] == "line\nbreak\r\n"
    assert lv.command("quit") == {"return": {}, "id": f"libvirt-{lv.n}"}
    ev = lv.message()
    assert ev["event"] == "SHUTDOWN"
    # every LF the server sent is part of a CRLF
    assert lv.raw.count(b"\n") == lv.raw.count(b"\r\n")
    assert d.wait(15) == 0
