"""SMTP replies as values (RFC 5321 4.2) with enhanced status codes (RFC 3463).

Policies and handlers return `Reply` values; only the server layer turns them
into bytes. A reply's text may hold several lines (separated by "\n"), which
become a multi-line reply ("250-first", ..., "250 last").
"""

from __future__ import annotations

from dataclasses import dataclass


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
        """Encode as the wire form: "CODE-text" lines, then "CODE text" (RFC 5321 4.2.1)."""
        lines = self.lines()
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{line}".rstrip(" ") + "\r\n")
        return "".join(out).encode("utf-8")

    def __str__(self) -> str:
        return " ".join(f"{self.code} {line}" for line in self.lines())
