"""SMTP replies as values (RFC 5321 4.2, RFC 3463 enhanced codes) and their wire form both ways.

Policies and handlers return `Reply` values. `encode_reply` is the one way a
reply becomes bytes (the server core writes with it; `Reply.to_bytes` is the
same), and `ReplyParser` the one way received bytes become replies (the
client core reads with it). A reply's text may hold several lines (separated
by "\n"), which become a multi-line reply ("250-first", ..., "250 last").
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from postroom.protocol._core import RemoteProtocolError, shown
from postroom.protocol.lines import LineBuffer

MAX_REPLY_LINE = 512  # RFC 5321 4.5.3.1.5: a reply line, CRLF included
# Servers do send longer lines (long URLs in refusals); a client accepts them up
# to a bound that keeps a hostile server from filling memory.
MAX_REPLY_LINE_ACCEPTED = 8192
MAX_REPLY_OCTETS = 64 * 1024  # one whole multi-line reply (EHLO lists are the longest)

# RFC 3463 2: class "." subject "." detail, the class matching the reply code's.
_ENHANCED_RE = re.compile(r"([245])\.\d{1,3}\.\d{1,3}")
_TEXT_BAD_RE = re.compile(r"[\x00-\x09\x0b-\x1f\x7f]")  # "\n" separates lines


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced status code, text.

    `close` asks the server layer to close the connection once the reply is sent
    (421 replies, QUIT's 221, too many errors).
    """

    code: int
    enhanced: str | None
    text: str
    close: bool = False

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code out of range: {self.code}")

    @property
    def is_positive(self) -> bool:
        """2xx and 3xx (RFC 5321 4.2.1)."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500

    def lines(self) -> list[str]:
        """The text lines, each prefixed with the enhanced code when there is one."""
        texts = self.text.split("\n") if self.text else [""]
        if self.enhanced:
            return [f"{self.enhanced} {t}".rstrip() for t in texts]
        return texts

    def to_bytes(self) -> bytes:
        """The wire form (`encode_reply`)."""
        return encode_reply(self)

    def __str__(self) -> str:
        return " ".join(f"{self.code} {line}" for line in self.lines())


@functools.lru_cache(maxsize=1024)  # replies are frozen values, most of them constants
def encode_reply(reply: Reply) -> bytes:
    """The wire form (RFC 5321 4.2): "CODE-text" lines, then "CODE SP text".

    The last line keeps its space when its text is empty ("334 "): 4.2 puts
    SP after the code of the last line, and RFC 4954 4 needs it for an empty
    SASL challenge. A line over MAX_REPLY_LINE is cut on a character boundary.
    ValueError for a reply that cannot go on the wire: a control character in
    its text, or an enhanced code whose class is not the reply's (RFC 3463 2).
    """
    if _TEXT_BAD_RE.search(reply.text):
        raise ValueError(f"control character in reply text {reply.text!r}")
    if reply.enhanced is not None:
        m = _ENHANCED_RE.fullmatch(reply.enhanced)
        if m is None or m.group(1) != str(reply.code)[0]:
            raise ValueError(f"enhanced code {reply.enhanced!r} does not fit reply {reply.code}")
    lines = reply.lines()
    out = []
    last = len(lines) - 1
    for i, text in enumerate(lines):
        line = f"{reply.code}{'-' if i < last else ' '}{text}".encode()
        if len(line) > MAX_REPLY_LINE - 2:
            line = line[: MAX_REPLY_LINE - 2].decode("utf-8", "ignore").encode()
        out.append(line + b"\r\n")
    return b"".join(out)


class ReplyParser:
    """Replies cut out of received bytes (RFC 5321 4.2).

    A reply is one or more lines "CODE-text" ending with "CODE text" (or
    "CODE" alone); every line carries the same code. Lines may end with CRLF
    or a bare LF (servers are forgiven that). With `enhanced` set (the server
    offered ENHANCEDSTATUSCODES, RFC 2034), a leading "class.subject.detail"
    code whose class matches the reply's is taken off each line into
    `Reply.enhanced`. A 421 reply has `close=True`: the server closes the
    channel after it (RFC 5321 3.8).
    """

    __slots__ = ("_code", "_lines", "_octets", "_texts", "enhanced")

    def __init__(self, *, enhanced: bool = False) -> None:
        self.enhanced = enhanced
        self._lines = LineBuffer(MAX_REPLY_LINE_ACCEPTED)
        self._code = 0  # the code of the reply being read, 0 between replies
        self._texts: list[bytes] = []
        self._octets = 0

    def __len__(self) -> int:
        """Octets received and not yet part of a returned reply."""
        return len(self._lines) + self._octets

    def feed(self, data: bytes) -> None:
        self._lines.feed(data)

    def clear(self) -> None:
        self._lines.clear()
        self._code = 0
        self._texts = []
        self._octets = 0

    def next_reply(self) -> Reply | None:
        """The next complete reply, or None; raises RemoteProtocolError on a malformed one."""
        while True:
            line = self._lines.next_line()
            if line is None:
                return None
            if line.too_long:
                raise RemoteProtocolError(
                    f"reply line longer than {MAX_REPLY_LINE_ACCEPTED} octets"
                )
            text = line.text
            head = text[:3]
            if len(head) < 3 or not head.isdigit() or head[:1] not in b"2345":
                raise RemoteProtocolError(f"malformed reply line {shown(text)}")
            code = int(head)
            if self._code and code != self._code:
                # RFC 5321 4.2.1: all lines of a multi-line reply share the code.
                raise RemoteProtocolError(f"reply lines with codes {self._code} and {code}")
            sep = text[3:4]
            if sep not in (b"-", b" ", b""):
                raise RemoteProtocolError(f"malformed reply line {shown(text)}")
            self._octets += line.length
            if self._octets > MAX_REPLY_OCTETS:
                raise RemoteProtocolError(f"reply longer than {MAX_REPLY_OCTETS} octets")
            self._code = code
            self._texts.append(text[4:])
            if sep == b"-":
                continue
            texts = [t.decode("utf-8", "replace") for t in self._texts]
            self._code = 0
            self._texts = []
            self._octets = 0
            return self._reply(code, texts)

    def _reply(self, code: int, texts: list[str]) -> Reply:
        enhanced = None
        if self.enhanced:
            m = _ENHANCED_RE.match(texts[0])
            if m is not None and m.group(1) == str(code)[0] and _starts_with_code(texts[0], m[0]):
                prefix = enhanced = m[0]
                # RFC 2034 4: each line carries the code; keep lines that do not.
                texts = [
                    t[len(prefix) :].removeprefix(" ") if _starts_with_code(t, prefix) else t
                    for t in texts
                ]
        return Reply(code, enhanced, "\n".join(texts), close=code == 421)


def _starts_with_code(text: str, prefix: str) -> bool:
    return text.startswith(prefix) and text[len(prefix) : len(prefix) + 1] in ("", " ")


def parse_reply(data: bytes, *, enhanced: bool = False) -> Reply:
    """Exactly one whole reply from `data`; RemoteProtocolError if malformed, incomplete
    or followed by more."""
    parser = ReplyParser(enhanced=enhanced)
    parser.feed(data)
    reply = parser.next_reply()
    if reply is None:
        raise RemoteProtocolError("incomplete reply")
    if len(parser):
        raise RemoteProtocolError("data after the reply")
    return reply
