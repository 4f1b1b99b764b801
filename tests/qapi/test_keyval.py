"""exportd.qapi.keyval: QEMU's command-line syntax, and its typing by the schema."""

from __future__ import annotations

import pytest

from exportd.qapi.keyval import KeyvalError, coerce, parse, parse_option, parse_size
from exportd.qapi.schema import Schema, schema


@pytest.fixture(scope="module")
def s() -> Schema:
    return schema()


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


def test_keyval_coercion(s):
    got = coerce(s, "blockdev-add", {
        "driver": "raw", "offset": "0x200", "size": "1M",
        "file": {"driver": "file", "filename": "a,b.img", "cache": {"direct": "on", "no-flush": "off"}},
    })
    assert got == {"driver": "raw", "offset": 512, "size": 1 << 20,
                   "file": {"driver": "file", "filename": "a,b.img",
                            "cache": {"direct": True, "no-flush": False}}}
    s.validate("blockdev-add", got)
    assert coerce(s, "blockdev-add", {"driver": "qcow2", "file": "f", "backing": "null"})["backing"] is None
    assert coerce(s, "blockdev-add", {"driver": "null-co", "size": "lots"})["size"] == "lots"
    assert coerce(s, "block-export-add", {"type": "fuse", "writable": "yes"})["writable"] is True
    assert coerce(s, "qmp_capabilities", {"enable": ["oob"]}) == {"enable": ["oob"]}


@pytest.mark.parametrize("text, value", [
    ("0", 0), ("512", 512), ("4k", 4096), ("64K", 65536), ("1M", 1 << 20), ("1.5G", 3 << 29),
    ("2T", 2 << 40), ("0x1000", 4096), ("1b", 1),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "1.5", "-1", "1X", "0x10K", "99999999999E"])
def test_parse_size_rejects(text):
    assert parse_size(text) is None
