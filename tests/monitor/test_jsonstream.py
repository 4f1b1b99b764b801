"""exportd.monitor.jsonstream: QMP input framing, value by value."""

from __future__ import annotations

from exportd.monitor.jsonstream import JsonStream, ParseError


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
