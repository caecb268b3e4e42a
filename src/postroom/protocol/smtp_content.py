"""One message's content as the SMTP server core reads it (DATA or BDAT): checks and refusals.

DATA content is dot-terminated and read with `lines.DataReader` (the end is
CRLF "." CRLF and nothing else); BDAT content comes in counted chunks (RFC
3030) and only its lines are measured. Both have the header section measured
(`header_limits`) and, when something is wrong, the reply that refuses the
message at its end (RFC 5321 4.2.5 lets the server refuse it only then).
"""

from __future__ import annotations

from postroom.protocol.header_limits import HEADER_TOO_BIG, TOO_MANY_FIELDS, HeaderLimits
from postroom.protocol.lines import (
    BARE_CR,
    BARE_LF,
    LONG_LINE,
    MAX_MESSAGE_LINE,
    TOO_BIG,
    DataReader,
    LineMeter,
)
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_config import SMTPServerConfig

# The replies that refuse content, by the problem found in it.
CONTENT_REPLIES: dict[str, Reply] = {
    TOO_BIG: Reply(552, "5.3.4", "Message size exceeds fixed maximum message size"),
    BARE_LF: Reply(
        554, "5.5.2", "Message refused: bare <LF> received; lines end with <CR><LF>"
    ),
    BARE_CR: Reply(
        554, "5.5.2", "Message refused: bare <CR> received; lines end with <CR><LF>"
    ),
    LONG_LINE: Reply(
        554, "5.6.0", f"Message refused: a line is longer than {MAX_MESSAGE_LINE} octets"
    ),
    HEADER_TOO_BIG: Reply(552, "5.3.4", "Message header section exceeds fixed maximum size"),
    TOO_MANY_FIELDS: Reply(554, "5.6.0", "Message refused: too many header fields"),
}


class DataContent(DataReader):
    """DATA content: a DataReader (fed what follows the 354, it gives the content
    without its dots until `done`) that also measures the header section, and
    says what refuses the message (`refusal`, None when it is good)."""

    __slots__ = ("_header",)

    def __init__(self, config: SMTPServerConfig, *, after_crlf: bool) -> None:
        super().__init__(
            bare_newline="reject" if config.bare_newline == "reject" else "normalize",
            max_line=MAX_MESSAGE_LINE,
            max_size=config.max_message_size,
            after_crlf=after_crlf,
        )
        self._header = HeaderLimits(config.max_header_size, config.max_header_fields)

    def feed(self, data: bytes) -> bytes:
        content = DataReader.feed(self, data)
        header = self._header
        if content and (header.done or header.feed(content) is None):
            return content
        return b""

    @property
    def refusal(self) -> Reply | None:
        problem = self.problem or self._header.problem
        return None if problem is None else CONTENT_REPLIES[problem]


class ChunkedContent:
    """BDAT content (RFC 3030), chunk by chunk: `size` counts it, `feed` and `admits`
    say whether the message must be refused (a reply) or may go on (None)."""

    __slots__ = ("_header", "_lines", "_max_size", "size")

    def __init__(self, config: SMTPServerConfig) -> None:
        self._header = HeaderLimits(config.max_header_size, config.max_header_fields)
        self._lines = LineMeter(MAX_MESSAGE_LINE)  # the DATA line rule
        self._max_size = config.max_message_size
        self.size = 0

    def admits(self, chunk_size: int) -> Reply | None:
        """Checked when a chunk is announced: the size it would bring the message to."""
        if self._max_size and self.size + chunk_size > self._max_size:
            return CONTENT_REPLIES[TOO_BIG]
        return None

    def feed(self, data: bytes) -> Reply | None:
        self.size += len(data)
        header = self._header
        if self._lines.feed(data):
            return CONTENT_REPLIES[LONG_LINE]
        problem = None if header.done else header.feed(data)
        return None if problem is None else CONTENT_REPLIES[problem]
