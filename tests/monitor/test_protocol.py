"""QMP at the byte level: framing, negotiation, every error text verbatim."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import pytest


@pytest.fixture
def d(module_daemon):
    assert module_daemon.alive, module_daemon.stderr
    return module_daemon


def err(desc: str, cls: str = "GenericError") -> dict:
    return {"error": {"class": cls, "desc": desc}}


def test_greeting_is_one_crlf_line(d, raw_qmp):
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(d.socket)
    data = b""
    while not data.endswith(b"\r\n"):
        data += s.recv(4096)
    s.close()
    assert data.count(b"\n") == 1
    greeting = json.loads(data)
    assert greeting["QMP"]["capabilities"] == []
    version = greeting["QMP"]["version"]
    assert set(version["qemu"]) == {"major", "minor", "micro"}
    assert all(isinstance(v, int) for v in version["qemu"].values())
    assert version["package"].startswith("exportd ")


def test_replies_end_in_crlf_and_are_single_lines(d, raw_qmp):
    c = raw_qmp(d)
    c.send(b'{"execute": "qmp_capabilities"}')
    line = c.recv_line()
    assert line == b'{"return": {}}\r\n'
    c.send(b'{"execute": "query-qmp-schema"}')
    line = c.recv_line()
    assert line.endswith(b"\r\n") and b"\n" not in line[:-2]


def test_negotiation_mode(d, raw_qmp):
    c = raw_qmp(d)
    assert c.cmd("query-version") == err(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
    # unknown commands are refused the same way before negotiation
    assert c.cmd("no-such-thing") == err(
        "Expecting capabilities negotiation with 'qmp_capabilities'", "CommandNotFound")
    assert c.cmd("qmp_capabilities", {"enable": ["oob"]}) == err("Capability oob not available")
    assert c.cmd("qmp_capabilities", {"enable": ["x-foo"]}) == err("Capability x-foo not available")
    assert c.cmd("qmp_capabilities", {"enable": "oob"}) == err(
        "Invalid parameter type for 'enable', expected: array")
    # still in negotiation mode after those failures
    assert c.cmd("query-version")["error"]["class"] == "CommandNotFound"
    assert c.cmd("qmp_capabilities", {"enable": []}) == {"return": {}}
    assert c.cmd("qmp_capabilities") == err(
        "Capabilities negotiation is already complete, command ignored", "CommandNotFound")
    assert "return" in c.cmd("query-version")


def test_qmp_capabilities_without_arguments_member(d, raw_qmp):
    c = raw_qmp(d)
    c.send(b'{"execute":"qmp_capabilities"}')
    assert c.recv_msg() == {"return": {}}


@pytest.mark.parametrize(
    "raw, reply",
    [
        (b"[1]", err("QMP input must be a JSON object")),
        (b'"abc" ', err("QMP input must be a JSON object")),
        (b"42 ", err("QMP input must be a JSON object")),
        (b"null ", err("QMP input must be a JSON object")),
        (b"{}", err("QMP input lacks member 'execute'")),
        (b'{"id": 7}', {"id": 7, **err("QMP input lacks member 'execute'")}),
        (b'{"execute": "query-version", "x": 1}', err("QMP input member 'x' is unexpected")),
        (b'{"exec-oob": "query-version"}', err("QMP input member 'exec-oob' is unexpected")),
        (b'{"execute": "query-version", "control": {}, "id": 1}',
         {"id": 1, **err("QMP input member 'control' is unexpected")}),
        (b'{"execute": 1}', err("QMP input member 'execute' must be a string")),
        (b'{"execute": "query-version", "arguments": []}',
         err("QMP input member 'arguments' must be an object")),
        (b'{"execute": "no-such"}', err("The command no-such has not been found", "CommandNotFound")),
        (b'{"execute": "query-version", "arguments": {"a": 1}}', err("Parameter 'a' is unexpected")),
        (b'{"execute": "quit", "arguments": {"now": true}, "id": 5}',
         {"id": 5, **err("Parameter 'now' is unexpected")}),
        (b"}", err("JSON parse error, expecting value")),
        (b"]", err("JSON parse error, expecting value")),
        (b"@", err("JSON parse error, stray '@'")),
        (b"\xff", err("JSON parse error, stray '\ufffd'")),
        (b'{"a" 1}', err("JSON parse error, missing : in object pair")),
        (b"{1: 2}", err("JSON parse error, key is not a string in object")),
        (b'{"a": 1,}', err("JSON parse error, expecting value")),
        (b"[1,]", err("JSON parse error, expecting value")),
        (b'[1 2]', err("JSON parse error, expected separator in list")),
        (b'{"a": 1 "b": 2}', err("JSON parse error, expected separator in dict")),
        (b"xyz ", err("JSON parse error, invalid keyword 'xyz'")),
        (b'"\\ud800"', err("JSON parse error, \\ud800 is not a valid Unicode character")),
        (b'{"execute": "query-version", "id": "\\u0000"}',
         {"return": None, "id": "\x00"}),
    ],
)
def test_error_texts(d, raw_qmp, raw, reply):
    c = raw_qmp(d)
    c.negotiate()
    c.send(raw)
    got = c.recv_msg()
    if reply.get("return", {}) is None:  # any successful reply, id checked
        assert "return" in got and got["id"] == reply["id"]
    else:
        assert got == reply
    # the connection is still usable afterwards
    assert "return" in c.cmd("query-version", id="after")


def test_parse_error_inside_message_reported_once(d, raw_qmp):
    c = raw_qmp(d)
    c.negotiate()
    c.send(b'{"execute": "query-version", "arguments": {"a" 1, "b": [1, 2, {}]}}')
    assert c.recv_msg() == err("JSON parse error, missing : in object pair")
    assert c.cmd("query-version", id=1)["id"] == 1


@pytest.mark.parametrize(
    "id_value",
    [0, -1, 12345678901234567890, 1.5, "libvirt-7", "", None, True, False, [], {},
     [1, {"a": [None, "x"]}], {"nested": {"deeper": [1, 2, 3]}}, "ünïcødé ☃ 😀"],
)
def test_id_echoed_verbatim(d, raw_qmp, id_value):
    c = raw_qmp(d)
    c.send(json.dumps({"execute": "qmp_capabilities", "id": id_value}))
    assert c.recv_msg() == {"return": {}, "id": id_value}
    c.send(json.dumps({"execute": "nope", "id": id_value}))
    assert c.recv_msg() == {"id": id_value, **err("The command nope has not been found", "CommandNotFound")}


def test_deeply_nested_id_echoed(d, raw_qmp):
    c = raw_qmp(d)
    c.negotiate()
    deep: object = "x"
    for _ in range(1000):
        deep = [deep]
    c.send(json.dumps({"execute": "query-version", "id": deep}))
    assert c.recv_msg()["id"] == deep


def test_nesting_limit(d, raw_qmp):
    c = raw_qmp(d)
    c.negotiate()
    c.send(b"[" * 1025)
    assert c.recv_msg() == err("JSON nesting depth limit exceeded")


def test_single_quoted_strings(d, raw_qmp):
    c = raw_qmp(d)
    c.send(b"{'execute': 'qmp_capabilities', 'id': 'it\\'s \"q\"'}")
    assert c.recv_msg() == {"return": {}, "id": "it's \"q\""}


def test_two_commands_in_one_write(d, raw_qmp):
    c = raw_qmp(d)
    c.send(b'{"execute":"qmp_capabilities","id":1}{"execute":"query-version","id":2}\n'
           b'  {"execute":"query-commands","id":3}')
    assert [c.recv_msg()["id"] for _ in range(3)] == [1, 2, 3]


def test_command_split_across_writes(d, raw_qmp):
    c = raw_qmp(d)
    c.negotiate()
    msg = '{"execute": "query-version", "id": "split \\u00e9 \\" ü"}'.encode()
    for i in range(len(msg)):
        c.send(msg[i : i + 1])  # one byte per write, including inside a UTF-8 sequence
    assert c.recv_msg()["id"] == 'split \u00e9 " ü'
    # a number split across writes is one number
    c.send(b'{"execute": "query-version", "id": 12')
    c.send(b"34}")
    assert c.recv_msg()["id"] == 1234


def test_no_newline_needed(d, raw_qmp):
    c = raw_qmp(d)
    c.send(b'{"execute":"qmp_capabilities"}')  # no trailing newline, no more data
    assert c.recv_msg() == {"return": {}}


def test_token_size_limit(d, raw_qmp):
    c = raw_qmp(d, timeout=60)
    c.negotiate()
    chunk = b"a" * (1 << 20)

    def sender() -> None:
        c.send(b'{"execute": "query-version", "id": "')
        for _ in range(65):
            c.send(chunk)
        c.send(b'"}')

    t = threading.Thread(target=sender)
    t.start()
    assert c.recv_msg() == err("JSON token size limit exceeded")
    t.join()
    # the rest of the dropped message (its string's tail, '}') gets no reply of its own
    c.send(b'{"execute": "query-version", "id": "ok"}')
    replies = []
    while True:
        m = c.recv_msg()
        replies.append(m)
        if m.get("id") == "ok":
            break
    assert replies == [{"return": replies[0]["return"], "id": "ok"}]


def test_no_events_before_negotiation(daemon, raw_qmp):
    d = daemon()
    waiting = raw_qmp(d)  # never negotiates
    listener = raw_qmp(d)
    listener.negotiate()
    quitter = raw_qmp(d)
    quitter.negotiate()
    assert quitter.cmd("quit", id="q") == {"return": {}, "id": "q"}
    for conn in (quitter, listener):
        ev = conn.recv_msg()
        assert ev["event"] == "SHUTDOWN"
        assert ev["data"] == {"guest": False, "reason": "host-qmp-quit"}
        assert set(ev["timestamp"]) == {"seconds", "microseconds"}
        assert 0 <= ev["timestamp"]["microseconds"] < 1_000_000
    assert waiting.recv_line() == b""  # closed without any event
    assert d.wait(15) == 0


def test_many_clients_and_a_bad_one(d, raw_qmp):
    clients = [raw_qmp(d) for _ in range(20)]
    for c in clients:
        c.negotiate()
    bad = raw_qmp(d)
    bad.send(b'{"execute": "query-version", "id": "never finished')
    bad.close()  # disconnects mid-message
    rude = raw_qmp(d)
    rude.send(b"\x00\x01garbage{{{[[[")
    for i, c in enumerate(clients):
        assert c.cmd("query-version", id=i)["id"] == i
    rude.close()
    assert raw_qmp(d).cmd("qmp_capabilities") == {"return": {}}


def test_unnegotiated_client_does_not_block_others(d, raw_qmp):
    idle = raw_qmp(d)
    other = raw_qmp(d)
    other.negotiate()
    assert "return" in other.cmd("query-version")
    idle.close()


def test_not_implemented_yet(daemon, raw_qmp, tmp_path):
    """A command described in schema/ but not registered answers so, never silently."""
    import shutil

    from exportd.qapi.schema import default_schema_dir

    schema_dir = tmp_path / "schema"
    shutil.copytree(default_schema_dir(), schema_dir)
    (schema_dir / "commands" / "x-later.json").write_text(json.dumps({
        "title": "x-later", "type": "object", "properties": {"a": {"type": "string"}},
        "additionalProperties": False,
    }))
    d = daemon(env={"EXPORTD_SCHEMA_DIR": str(schema_dir)})
    c = raw_qmp(d)
    c.negotiate()
    assert c.cmd("x-later", {"a": "b"}, id=1) == {"id": 1, **err("Command x-later is not implemented yet")}
    commands = {x["name"] for x in c.cmd("query-commands")["return"]}
    assert "x-later" not in commands


def test_disconnect_mid_command_completes_it(daemon, raw_qmp):
    """A client that leaves before its reply: the command still completes
    (no half-done state) and everyone else goes on."""
    d = daemon()
    observer = raw_qmp(d)
    observer.negotiate()
    leaver = raw_qmp(d)
    leaver.negotiate()
    leaver.send(json.dumps({"execute": "blockdev-add",
                            "arguments": {"driver": "null-co", "node-name": "orphan", "size": 4096}}))
    leaver.close()  # gone before the reply
    import time

    deadline = time.monotonic() + 15
    while True:
        reply = observer.cmd("query-named-block-nodes")
        assert "return" in reply, reply
        if any(n["node-name"] == "orphan" for n in reply["return"]):
            break
        assert time.monotonic() < deadline, "the command of the departed client never completed"
        time.sleep(0.05)
    assert observer.cmd("blockdev-del", {"node-name": "orphan"}) == {"return": {}}
    assert d.alive


def test_events_reach_every_negotiated_client_on_every_monitor(daemon, raw_qmp, tmp_path):
    second = str(tmp_path / "second.sock")
    d = daemon("--socket", second)
    import time

    deadline = time.monotonic() + 15
    while not os.path.exists(second):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    clients = [raw_qmp(d), raw_qmp(d), raw_qmp(second), raw_qmp(second)]
    for c in clients:
        c.negotiate()
    os.kill(d.pid, signal.SIGTERM)
    for c in clients:
        ev = c.recv_msg()
        assert ev["event"] == "SHUTDOWN" and ev["data"]["reason"] == "host-signal"
        assert c.recv_line() == b""  # then the connection closes
    assert d.wait(15) == 0
    assert not os.path.exists(second)


def test_huge_numbers(d, raw_qmp):
    c = raw_qmp(d)
    c.negotiate()
    c.send(b'{"execute": "query-version", "id": ' + b"9" * 5000 + b"}")
    reply = c.recv_msg()
    assert "return" in reply and "id" in reply
    c.send(b'{"execute": "query-version", "id": 1e400}')
    assert "return" in c.recv_msg()
    assert c.cmd("query-version", id="still")["id"] == "still"
