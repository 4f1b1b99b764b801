"""exportd.keyval (QEMU's command-line syntax) and query-qmp-schema's honesty."""

from __future__ import annotations

import pytest

from exportd import commands
from exportd.keyval import KeyvalError, parse, parse_option
from exportd.monitor.jsonstream import JsonStream, ParseError
from exportd.qapi import schema


def test_keyval_basic_and_nesting():
    assert parse("driver=file,node-name=n,filename=f") == {"driver": "file", "node-name": "n", "filename": "f"}
    assert parse("driver=raw,file.driver=file,file.filename=x,file.cache.direct=on") == {
        "driver": "raw", "file": {"driver": "file", "filename": "x", "cache": {"direct": "on"}}}
    assert parse("filename=a,,b,,c.img") == {"filename": "a,b,c.img"}
    assert parse("socket,id=m,path=/tmp/x", implied_key="backend") == {
        "backend": "socket", "id": "m", "path": "/tmp/x"}
    assert parse("enable.0=a,enable.1=b") == {"enable": ["a", "b"]}
    assert parse("a=1,a=2") == {"a": "2"}  # last wins, as in QEMU
    assert parse("a=1,") == {"a": "1"}
    assert parse("a=") == {"a": ""}
    assert parse("") == {}


@pytest.mark.parametrize("text, message", [
    ("novalue", "Expected '=' after parameter 'novalue'"),
    ("a=1,b", "Expected '=' after parameter 'b'"),
    ("a..b=1", "Invalid parameter 'a..b'"),
    ("=x", "Invalid parameter ''"),
    ("a=1,a.b=2", "Parameters 'a.*' used inconsistently"),
    ("a.b=1,a=2", "Parameters 'a.*' used inconsistently"),
    ("l.0=a,l.2=b", "Parameter 'l.1' missing"),
])
def test_keyval_errors(text, message):
    with pytest.raises(KeyvalError) as ei:
        parse(text)
    assert str(ei.value) == message


def test_parse_option_json_and_keyval():
    assert parse_option('{"driver": "null-co", "size": 512}') == ({"driver": "null-co", "size": 512}, False)
    assert parse_option("{'driver': 'null-co'}") == ({"driver": "null-co"}, False)
    assert parse_option("driver=null-co") == ({"driver": "null-co"}, True)
    for bad in ('{"driver": ', '{"a": 1} {"b": 2}', '{"a" 1}', "{} x"):
        with pytest.raises(KeyvalError):
            parse_option(bad)


def test_jsonstream_unit():
    s = JsonStream()
    assert s.feed(b'{"a": [1, 2.5, -3e2, true, false, null, "x\\n\\u00e9"]}') == [
        {"a": [1, 2.5, -300.0, True, False, None, "x\n\u00e9"]}]
    assert s.feed(b'"\\ud83d\\ude00" ') == ["\U0001F600"]
    assert s.feed(b"'\\'' ") == ["'"]
    out = s.feed(b'{"a": "b\x01"}')
    assert out == [ParseError("JSON parse error, control character in string")]
    small = JsonStream(max_size=100)
    assert small.feed(b'{"a": "' + b"x" * 200) == [ParseError("JSON token size limit exceeded")]
    assert small.feed(b'yyy"} {"ok": 1}') == [ParseError("JSON parse error, expecting value"), {"ok": 1}]
    few = JsonStream(max_tokens=10)
    assert few.feed(b"[" + b"1," * 20 + b"1]") [0] == ParseError("JSON token count limit exceeded")


def test_qmp_schema_is_consistent_and_complete():
    s = schema()
    registered = sorted(commands.load_all())
    info = s.introspect(registered, sorted(s.events))
    by_name = {e["name"]: e for e in info}
    assert len(by_name) == len(info), "duplicate entity names"
    referenced = set()
    for e in info:
        mt = e["meta-type"]
        assert mt in ("command", "event", "object", "enum", "array", "alternate", "builtin")
        if mt == "command":
            referenced |= {e["arg-type"], e["ret-type"]}
        elif mt == "event":
            referenced.add(e["arg-type"])
        elif mt == "object":
            referenced |= {m["type"] for m in e["members"]}
            referenced |= {v["type"] for v in e.get("variants", [])}
            if "tag" in e:
                assert e["tag"] in {m["name"] for m in e["members"]}
        elif mt == "array":
            referenced.add(e["element-type"])
        elif mt == "alternate":
            referenced |= {m["type"] for m in e["members"]}
        elif mt == "enum":
            assert e["values"] == [m["name"] for m in e["members"]]
    assert referenced <= set(by_name), referenced - set(by_name)
    for name in registered:
        assert by_name[name]["meta-type"] == "command"
    # the details libvirt probes for
    qmp_caps = by_name[by_name["qmp_capabilities"]["arg-type"]]
    assert [m["name"] for m in qmp_caps["members"]] == ["enable"]
    if "block-export-add" in by_name:
        union = by_name[by_name["block-export-add"]["arg-type"]]
        assert union["tag"] == "type"
        fuse = by_name[union["variants"][0]["type"]]
        assert {"mountpoint", "growable", "allow-other", "passthrough"} <= {m["name"] for m in fuse["members"]}
    if "blockdev-add" in by_name:
        union = by_name[by_name["blockdev-add"]["arg-type"]]
        assert {v["case"] for v in union["variants"]} == {"file", "host_device", "null-aio", "null-co", "qcow2", "raw"}
        optional = {m["name"] for m in union["members"] if "default" in m}
        assert "node-name" in optional and "driver" not in optional
    assert by_name["SHUTDOWN"]["meta-type"] == "event"
    shutdown_data = by_name[by_name["SHUTDOWN"]["arg-type"]]
    assert {m["name"] for m in shutdown_data["members"]} == {"guest", "reason"}


def test_unregistered_commands_are_not_introspected():
    s = schema()
    info = s.introspect(["query-version"], [])
    assert [e["name"] for e in info if e["meta-type"] == "command"] == ["query-version"]
