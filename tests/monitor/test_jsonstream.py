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
    # the rest of a message dropped for a limit is skipped, with no reply of its own
    assert small.feed(b'yyy", "b": [1, "]"]} {"ok": 1}') == [{"ok": 1}]
    few = JsonStream(max_tokens=10)
    assert few.feed(b"[" + b"1," * 20 + b"1] 7 ") == [ParseError("JSON token count limit exceeded"), 7]
    deep = JsonStream(max_nesting=3)
    assert deep.feed(b'[[[[["x]"]]]], 2] {"a": [[[1]]]}') == [
        ParseError("JSON nesting depth limit exceeded"), ParseError("JSON nesting depth limit exceeded")]
    assert deep.feed(b' {"a": [1]}') == [{"a": [1]}]
