"""QMP input framing: a JSON stream, not lines.

Bytes arrive in arbitrary chunks. A message may be split across chunks, or
several may share one; QMP also accepts single-quoted strings. Like QEMU's
json-lexer/json-streamer, tokens are counted: a message ends when the brace
and bracket counts return to zero (a top-level scalar is a message of its
own), or go negative (which is an error). A syntax error inside a message is
reported once, when its brackets balance, so the rest of a bad message does
not produce a cascade of errors. A lexical error (a stray character, a
byte 0xFE/0xFF in a string) drops the message and skips to the next
structural or control character, as QEMU's lexer recovers. Strings are
QEMU's modified UTF-8 (invalid sequences refuse the message, C0 80 is
U+0000), and a key given twice refuses it. Limits bound memory: the size
of one message, its token count and its nesting depth.

feed(bytes) returns a list of items: either a parsed value, or a
ParseError whose .desc is the QMP error text (QEMU's wording).
"""

from __future__ import annotations

import codecs
import json
import re
from dataclasses import dataclass
from typing import Any

MAX_MESSAGE_SIZE = 64 << 20  # QEMU: MAX_TOKEN_SIZE
MAX_TOKEN_COUNT = 1 << 20  # QEMU allows 2 Mi; every token here is a Python object
MAX_NESTING = 1024  # QEMU: MAX_NESTING
# strings longer than this are worth encoding a slice at a time in replies
BIG_STRING = 64 * 1024


@dataclass(frozen=True)
class ParseError:
    desc: str


_SPACE = re.compile(r"[ \t\r\n]+")
_NUMBER = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_NUMBER_PREFIX = re.compile(r"-?[0-9]*(?:\.[0-9]*)?(?:[eE][+-]?[0-9]*)?")
_MAX_ATOM = 4096  # longer numbers/keywords are not waited for
_WORD = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Invalid input bytes are decoded as lone surrogates (surrogateescape):
# byte b is "\udc00" + b. A string ends at its quote, or at a byte 0xFE or
# 0xFF, which QEMU's lexer never takes inside a string (a lexical error).
_BAD_IN_STRING = "\udcfe\udcff"
# after a lexical error QEMU skips to a structural character, a control
# character but tab (both kept), or a byte 0xFE/0xFF (dropped)
_RESYNC = re.compile(r"[\[\]{}:,\x00-\x08\x0a-\x1f" + _BAD_IN_STRING + "]")
_ESCAPES = {
    '"': '"', "'": "'", "\\": "\\", "/": "/",
    "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
}
_KEYWORDS = {"true": True, "false": False, "null": None}
_SKIP_STOP = re.compile(r"[\[\]{}\"']")
_PUNCT = "{}[]:,"

# Sentinel token kinds for the incremental parser.
_VALUE = "value"


class _SyntaxError(Exception):
    pass


def _decode_string(body: str) -> str:
    """Decode the inside of a quoted string (escapes, surrogate pairs). The
    runs between escapes are checked and copied whole (C speed: a 28 MiB
    string must not hold the loop for seconds)."""
    if "\\" not in body:
        # isprintable() is false for control characters and surrogates (bad
        # bytes): the common case is settled at C speed
        return body if body.isprintable() else _plain_run(body)
    try:
        # C speed for valid escapes (a raw " of a single-quoted string makes
        # it fail, never parse as something else)
        text = json.loads('"' + body + '"')
        text.encode("utf-8")  # no lone surrogate: from bad bytes or a \\ud800 escape
        return text
    except (ValueError, UnicodeEncodeError):
        pass  # the exact path below finds what is wrong, in QEMU's words
    out: list[str] = []
    i, n = 0, len(body)
    while i < n:
        j = body.find("\\", i)
        out.append(_plain_run(body[i:] if j < 0 else body[i:j]))
        if j < 0:
            break
        i = j
        esc = body[i + 1] if i + 1 < n else ""
        if esc in _ESCAPES:
            out.append(_ESCAPES[esc])
            i += 2
            continue
        if esc != "u":
            raise _SyntaxError("invalid escape sequence in string")
        code, i = _hex4(body, i + 2)
        if 0xD800 <= code < 0xDC00:
            # a high surrogate must be followed by \u of a low one
            if body[i : i + 2] == "\\u":
                low, j = _hex4(body, i + 2)
                if 0xDC00 <= low < 0xE000:
                    code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    i = j
                else:
                    raise _SyntaxError(f"\\u{code:04x} is not a valid Unicode character")
            else:
                raise _SyntaxError(f"\\u{code:04x} is not a valid Unicode character")
        elif 0xDC00 <= code < 0xE000:
            raise _SyntaxError(f"\\u{code:04x} is not a valid Unicode character")
        out.append(chr(code))
    return "".join(out)


_CONTROL = re.compile("[\x00-\x1f]")
# bytes that are not UTF-8 (lone surrogates, see _BAD_IN_STRING), but for
# the pair C0 80: QEMU reads strings as modified UTF-8, where it is U+0000
_NOT_MODIFIED_UTF8 = re.compile("\udcc0(?!\udc80)|(?<!\udcc0)\udc80|[\udc81-\udcbf\udcc1-\udcff]")


def _plain_run(run: str) -> str:
    """A run of a string without escapes: its text, or the first error in
    it by position (so that where a string is cut into chunks does not
    change which error is reported)."""
    control = _CONTROL.search(run)
    invalid = _NOT_MODIFIED_UTF8.search(run)
    if control is not None and (invalid is None or control.start() < invalid.start()):
        raise _SyntaxError("control character in string")
    if invalid is not None:
        raise _SyntaxError("invalid UTF-8 sequence in string")
    return run.replace("\udcc0\udc80", "\0") if "\udcc0" in run else run


def _hex4(body: str, i: int) -> tuple[int, int]:
    digits = body[i : i + 4]
    if len(digits) != 4 or any(c not in "0123456789abcdefABCDEF" for c in digits):
        raise _SyntaxError("invalid hex escape sequence in string")
    return int(digits, 16), i + 4


# whole units of a string's inside: runs without a backslash, \\uXXXX, or
# another escape (checked when decoded); stops before an unfinished escape
_WHOLE_UNITS = re.compile(r"(?:[^\\]+|\\u[0-9a-fA-F]{4}|\\[^u])*")
_HIGH_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


def _decodable_prefix(raw: str) -> int:
    """How much of the inside of an unfinished string can be decoded now:
    no escape, surrogate pair (\\uD83D\\uDE00) or modified-UTF-8 pair
    (bytes C0 80) is cut in two. An invalid \\u escape is taken whole, so
    that decoding reports it."""
    m = _WHOLE_UNITS.match(raw)
    assert m is not None
    cut = m.end()
    if raw.startswith("\\u", cut) and len(raw) - cut >= 6:
        return cut + 6  # \\u and four characters that are not hex digits
    if cut >= 6 and _HIGH_SURROGATE_ESCAPE.match(raw, cut - 6) and not _odd_backslashes_before(raw, cut - 6, 0):
        cut -= 6  # its low half may follow
    if cut and raw[cut - 1] == "\udcc0":
        cut -= 1  # byte C0: U+0000 if 80 follows
    return cut


def _string_end(s: str, i: int, quote: str, escaped: bool) -> tuple[int, bool]:
    """(index of the closing quote in s from i, or of a byte 0xFE/0xFF that
    ends the string as an error, or -1; whether s ends mid-escape). Found
    with str.find, not character by character: a string may be 28 MiB."""
    n = len(s)
    if escaped:
        if i >= n:
            return -1, True
        i += 1
    bad = min((b for b in (s.find(c, i) for c in _BAD_IN_STRING) if b >= 0), default=n)
    while True:
        q = s.find(quote, i, bad)
        if q < 0:
            if bad < n:
                return bad, False
            return -1, _odd_backslashes_before(s, n, i)
        if not _odd_backslashes_before(s, q, i):
            return q, False
        i = q + 1  # an escaped quote


def _odd_backslashes_before(s: str, end: int, start: int) -> bool:
    """Whether an odd number of backslashes ends s[start:end] (the next
    character is escaped)."""
    k = end
    while k > start and s[k - 1] == "\\":
        k -= 1
    return (end - k) % 2 == 1


def _number(text: str) -> int | float:
    if any(c in text for c in ".eE"):
        return float(text)
    try:
        return int(text)
    except ValueError:  # past Python's int digit limit: approximate, as QEMU does
        return float(text)


class _Parser:
    """Incremental parser: takes tokens one by one, builds the value."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # frames: [container, state, pending_key]
        self.result: Any = None
        self.done = False

    def token(self, kind: str, value: Any = None) -> None:
        if self.done:
            raise _SyntaxError("expecting value")  # cannot happen: framing splits
        if not self.stack:
            self._top(kind, value)
            return
        frame = self.stack[-1]
        container, state = frame[0], frame[1]
        if isinstance(container, dict):
            if state == "key_or_end":
                if kind == "}":
                    self._close()
                elif kind == _VALUE and isinstance(value, str):
                    frame[2], frame[1] = value, "colon"
                elif kind == _VALUE or kind in "{[":
                    raise _SyntaxError("key is not a string in object")
                else:
                    raise _SyntaxError("expecting value")
            elif state == "key":
                if kind == _VALUE and isinstance(value, str):
                    frame[2], frame[1] = value, "colon"
                elif kind == _VALUE or kind in "{[":
                    raise _SyntaxError("key is not a string in object")
                else:
                    raise _SyntaxError("expecting value")
            elif state == "colon":
                if kind != ":":
                    raise _SyntaxError("missing : in object pair")
                frame[1] = "value"
            elif state == "value":
                self._value(kind, value)
            else:  # comma_or_end
                if kind == ",":
                    frame[1] = "key"
                elif kind == "}":
                    self._close()
                else:
                    raise _SyntaxError("expected separator in dict")
        else:
            if state == "value_or_end":
                if kind == "]":
                    self._close()
                else:
                    self._value(kind, value)
            elif state == "value":
                self._value(kind, value)
            else:  # comma_or_end
                if kind == ",":
                    frame[1] = "value"
                elif kind == "]":
                    self._close()
                else:
                    raise _SyntaxError("expected separator in list")

    def _top(self, kind: str, value: Any) -> None:
        if kind == _VALUE:
            self.result, self.done = value, True
        elif kind == "{":
            self.stack.append([{}, "key_or_end", None])
        elif kind == "[":
            self.stack.append([[], "value_or_end", None])
        else:
            raise _SyntaxError("expecting value")

    def _value(self, kind: str, value: Any) -> None:
        if kind == "{":
            self.stack.append([{}, "key_or_end", None])
        elif kind == "[":
            self.stack.append([[], "value_or_end", None])
        elif kind == _VALUE:
            self._store(value)
        else:
            raise _SyntaxError("expecting value")

    def _store(self, value: Any) -> None:
        if not self.stack:
            self.result, self.done = value, True
            return
        frame = self.stack[-1]
        if isinstance(frame[0], dict):
            if frame[2] in frame[0]:
                raise _SyntaxError("duplicate key")
            frame[0][frame[2]] = value
        else:
            frame[0].append(value)
        frame[1] = "comma_or_end"

    def _close(self) -> None:
        container = self.stack.pop()[0]
        self._store(container)


class JsonStream:
    """Feed raw bytes; get back complete messages (values or ParseError)."""

    # Whether any stream of this process ever parsed a string longer than
    # BIG_STRING: only then can a reply hold one (the daemon makes none of
    # its own), and only then is each reply searched for them (session.py)
    big_strings_seen = False

    def __init__(
        self,
        max_size: int = MAX_MESSAGE_SIZE,
        max_tokens: int = MAX_TOKEN_COUNT,
        max_nesting: int = MAX_NESTING,
    ) -> None:
        self.max_size = max_size
        self.max_tokens = max_tokens
        self.max_nesting = max_nesting
        # invalid bytes stay visible (as lone surrogates U+DC80..U+DCFF), so
        # that strings holding them are refused as QEMU refuses them
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self._recovering = False  # after a lexical error: skipping to a resync point
        self._buf = ""  # an unfinished number or keyword
        self._quote: str | None = None  # set while a string spans chunks
        self._escaped = False  # that string's last chunk ended in a lone backslash
        self._parts: list[str] = []  # its raw inside so far (for a stray token's text)
        self._parts_len = 0
        # ... decoded as it arrives, so that its end costs no more than a chunk
        self._decoded: list[str] = []
        self._undecoded = ""  # a tail that may end mid-escape
        self._string_error: str | None = None
        self._discarding = False  # swallowing the rest of an oversized string
        # after a message was dropped for a limit: the depth of brackets
        # left to skip, so that its rest is passed over without a reply per token
        self._skip_depth = 0
        self._reset_message()

    def _reset_message(self) -> None:
        self._parser = _Parser()
        self._error: str | None = None
        self._braces = 0
        self._brackets = 0
        self._size = 0
        self._tokens = 0

    def feed(self, data: bytes) -> list[Any]:
        out: list[Any] = []
        text: str | None = self._decoder.decode(data)
        if self._quote is not None:
            text = self._continue_string(text, out)
            if text is None:
                return out
        buf = self._buf + text if self._buf else text
        self._buf = ""
        self._scan(buf, out)
        return out

    # --- skipping the rest of a dropped message -----------------------------
    def _skip(self, buf: str, pos: int) -> int:
        """Pass over the rest of a dropped message: brackets counted, strings
        jumped, everything else at C speed. Returns where skipping ended
        (len(buf) if it goes on in the next chunk)."""
        n = len(buf)
        while self._skip_depth > 0:
            m = _SKIP_STOP.search(buf, pos)
            if m is None:
                return n
            ch, pos = m.group(), m.end()
            if ch in "[{":
                self._skip_depth += 1
            elif ch in "]}":
                self._skip_depth -= 1
            else:
                end, escaped = _string_end(buf, pos, ch, False)
                if end < 0:
                    self._quote, self._escaped, self._discarding = ch, escaped, True
                    return n
                pos = end + 1
        return pos

    # --- lexing -----------------------------------------------------------
    def _scan(self, buf: str, out: list[Any]) -> None:
        n = len(buf)
        pos = 0
        while True:
            if self._skip_depth:
                pos = self._skip(buf, pos)
                if self._skip_depth or self._discarding:
                    return
            if self._recovering:
                r = _RESYNC.search(buf, pos)
                if r is None:
                    return  # all of it skipped
                self._recovering = False
                pos = r.start() + (buf[r.start()] in _BAD_IN_STRING)
            m = _SPACE.match(buf, pos)
            if m:
                pos = m.end()
            if pos >= n:
                return
            ch = buf[pos]
            if ch in _PUNCT:
                pos += 1
                self._emit_token(ch, None, 1, out)
            elif ch == '"' or ch == "'":
                end, escaped = _string_end(buf, pos + 1, ch, False)
                if end >= 0 and buf[end] in _BAD_IN_STRING:
                    self._stray(ch + buf[pos + 1 : end] + "\ufffd", out)
                    pos = end + 1
                    continue
                if end < 0:
                    # the rest of the string comes in later chunks
                    self._quote, self._escaped = ch, escaped
                    self._take_string_part(buf[pos + 1 :])
                    self._check_pending(out)
                    return
                self._string_token(buf[pos + 1 : end], out)
                pos = end + 1
            elif ch == "-" or "0" <= ch <= "9":
                prefix = _NUMBER_PREFIX.match(buf, pos)
                if prefix is not None and prefix.end() == n and n - pos < _MAX_ATOM:
                    self._buf = buf[pos:]  # a number may continue in the next chunk
                    return
                m = _NUMBER.match(buf, pos)
                if m is None:
                    pos += 1
                    self._stray(ch, out)
                    continue
                pos = m.end()
                self._emit_token(_VALUE, _number(m.group()), pos - m.start(), out)
            elif ch.isascii() and (ch.isalpha() or ch == "_"):
                m = _WORD.match(buf, pos)
                assert m is not None
                if m.end() == n and n - pos < _MAX_ATOM:
                    self._buf = buf[pos:]  # a keyword may continue in the next chunk
                    return
                pos = m.end()
                word = m.group()
                if word in _KEYWORDS:
                    self._emit_token(_VALUE, _KEYWORDS[word], len(word), out)
                else:
                    self._fail(f"invalid keyword '{word}'")
                    self._emit_token(_VALUE, None, len(word), out)
            else:
                pos += 1
                self._stray(ch, out)

    def _continue_string(self, text: str, out: list[Any]) -> str | None:
        """Feed text to an unfinished string; return what follows it, or None."""
        assert self._quote is not None
        end, escaped = _string_end(text, 0, self._quote, self._escaped)
        if self._discarding:
            if end < 0:
                self._escaped = escaped
                return None
            self._quote, self._discarding = None, False
            return text[end + 1 :]
        if end < 0:
            self._take_string_part(text)
            self._escaped = escaped
            self._check_pending(out)
            return None
        if text[end] in _BAD_IN_STRING:
            token = self._quote + "".join(self._parts) + text[:end] + "\ufffd"
            self._end_string()
            self._stray(token, out)
            return text[end + 1 :]
        size = self._parts_len + end + 2
        if size > BIG_STRING:
            JsonStream.big_strings_seen = True
        try:
            if self._string_error is not None:
                raise _SyntaxError(self._string_error)
            self._decoded.append(_decode_string(self._undecoded + text[:end]))
            value: Any = "".join(self._decoded)  # one copy of a string that may be 28 MiB
        except _SyntaxError as e:
            self._fail(str(e))
            value = ""
        self._end_string()
        self._emit_token(_VALUE, value, size, out)
        return text[end + 1 :]

    def _take_string_part(self, raw: str) -> None:
        """More of a string that spans chunks: kept raw, and decoded as far
        as it can be."""
        self._parts.append(raw)
        self._parts_len += len(raw)
        if self._string_error is not None:
            return
        raw = self._undecoded + raw
        cut = _decodable_prefix(raw)
        try:
            if cut:
                self._decoded.append(_decode_string(raw[:cut]))
            self._undecoded = raw[cut:]
        except _SyntaxError as e:
            self._string_error, self._decoded, self._undecoded = str(e), [], ""

    def _end_string(self) -> None:
        self._quote, self._parts, self._parts_len = None, [], 0
        self._decoded, self._undecoded, self._string_error = [], "", None

    def _check_pending(self, out: list[Any]) -> None:
        if self._size + self._parts_len > self.max_size:
            # one unfinished string alone is past the limit: drop it, and
            # swallow the rest of it as it arrives, then the rest of its message
            quote = self._quote
            self._end_string()
            self._quote, self._discarding = quote, True
            self._skip_depth = self._braces + self._brackets
            self._reset_message()
            out.append(ParseError("JSON token size limit exceeded"))

    def _string_token(self, body: str, out: list[Any]) -> None:
        if len(body) > BIG_STRING:
            JsonStream.big_strings_seen = True
        try:
            value: Any = _decode_string(body)
        except _SyntaxError as e:
            self._fail(str(e))
            value = ""
        self._emit_token(_VALUE, value, len(body) + 2, out)

    def _stray(self, token: str, out: list[Any]) -> None:
        # a lexical error: QEMU drops the message in progress, reports the
        # token (an invalid or non-ASCII byte shows as U+FFFD) and skips to
        # the next point where it can resynchronize
        if not token.isascii():
            token = token[:-1] + "\ufffd" if token[0] in "\"'" else "\ufffd"
        self._reset_message()
        self._recovering = True
        out.append(ParseError(f"JSON parse error, stray '{token}'"))

    def _fail(self, reason: str) -> None:
        if self._error is None:
            self._error = reason

    # --- streaming ---------------------------------------------------------
    def _emit_token(self, kind: str, value: Any, size: int, out: list[Any]) -> None:
        if kind == "{":
            self._braces += 1
        elif kind == "}":
            self._braces -= 1
        elif kind == "[":
            self._brackets += 1
        elif kind == "]":
            self._brackets -= 1
        self._size += size
        self._tokens += 1
        if self._error is None:
            try:
                self._parser.token(kind, value)
            except _SyntaxError as e:
                self._error = str(e)
                self._parser = _Parser()
        if self._braces < 0 or self._brackets < 0 or (self._braces == 0 and self._brackets == 0):
            if self._error is not None:
                out.append(ParseError(f"JSON parse error, {self._error}"))
            elif self._parser.done:
                out.append(self._parser.result)
            else:
                out.append(ParseError("JSON parse error, expecting value"))
            self._reset_message()
        elif self._size > self.max_size:
            self._drop_message("JSON token size limit exceeded", out)
        elif self._tokens > self.max_tokens:
            self._drop_message("JSON token count limit exceeded", out)
        elif self._braces + self._brackets > self.max_nesting:
            self._drop_message("JSON nesting depth limit exceeded", out)

    def _drop_message(self, error: str, out: list[Any]) -> None:
        # QEMU then starts over inside the message and answers each of its
        # remaining tokens (millions of replies for a big array); the rest
        # of it is skipped here instead, with one reply for the message
        self._skip_depth = self._braces + self._brackets
        self._reset_message()
        out.append(ParseError(error))
