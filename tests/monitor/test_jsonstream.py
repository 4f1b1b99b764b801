"""exportd.monitor.jsonstream: QMP input framing, value by value."""

from __future__ import annotations

import json

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


def test_strings_across_chunks_decode_as_whole() -> None:
    # escapes, a surrogate pair, modified UTF-8 C0 80, an escaped backslash
    # before "u", and errors: cut at every point, the result is the same
    bodies = [b'\\ud83d\\ude00x\\n\\u00e9\xc0\x80\\\\ud83d' * 3,
              b'ok\\uZZZZ', b'a\xc0b', b'\\ud83dx', b'x\x01\\q', b'\xc3\xa9\\"\'']
    for body in bodies:
        msg = b'{"s": "' + body + b'"} '
        whole = JsonStream().feed(msg)
        for cut in range(1, len(msg)):
            s = JsonStream()
            assert s.feed(msg[:cut]) + s.feed(msg[cut:]) == whole, (body, cut)
        s = JsonStream()
        assert [x for i in range(len(msg)) for x in s.feed(msg[i : i + 1])] == whole, body


def test_big_string_replies_encode_in_slices() -> None:
    from exportd.monitor import session

    saw = JsonStream.big_strings_seen
    JsonStream.big_strings_seen = True
    try:
        m = {"error": {"class": "GenericError", "desc": "\u00e9\n\"" * 100_000}, "id": ["x" * 70_000, 1]}
        pieces = list(session.encode_pieces(m))
        assert len(pieces) > 5 and max(map(len, pieces)) <= 6 * session.BIG_STRING  # \\u00e9: 6 bytes a character
        assert b"".join(pieces) == (json.dumps(m) + "\r\n").encode()
        assert session.encode(m, pretty=True) == (json.dumps(m, indent=4) + "\r\n").encode()
    finally:
        JsonStream.big_strings_seen = saw


async def test_events_wait_for_a_reply_written_in_slices() -> None:
    import asyncio

    from exportd.monitor import session

    class Writer:
        def __init__(self) -> None:
            self.data = bytearray()
            self.transport = self

        def get_write_buffer_size(self) -> int:
            return 0

        def is_closing(self) -> bool:
            return False

        def write(self, b: bytes) -> None:
            self.data += b

        async def drain(self) -> None:
            pass

    saw = JsonStream.big_strings_seen
    JsonStream.big_strings_seen = True
    try:
        w = Writer()
        s = session.Session(None, None, w)  # type: ignore[arg-type]
        s.negotiated = True
        s.turn.slice_s = 0  # a turn after every piece
        reply = {"return": {"x": "y" * 1_000_000}}
        sending = asyncio.ensure_future(s.send(reply))
        await asyncio.sleep(0)
        s.send_event({"event": "E"})  # while the reply is half written
        await sending
        lines = bytes(w.data).split(b"\r\n")
        assert [json.loads(x) for x in lines if x] == [reply, {"event": "E"}]
    finally:
        JsonStream.big_strings_seen = saw
