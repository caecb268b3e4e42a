"""The maildrop a POP3 session works on: the snapshot taken at login and its deletion marks.

A `Drop` keeps the application's `Snapshot` (RFC 1939 5: messages numbered from
1 as at login), answers STAT, LIST and UIDL, and keeps DELE's marks for QUIT.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from postroom.protocol._core import LocalProtocolError

# RFC 1939 7 (UIDL): a unique-id is 1 to 70 characters in the range 0x21 to 0x7E.
UID_RE = re.compile(r"[\x21-\x7e]{1,70}")


@dataclass(frozen=True, slots=True)
class MessageInfo:
    """One message of a maildrop snapshot.

    `size` is what LIST reports: the octets as sent, with CRLF line ends and before
    byte-stuffing (RFC 1939 5). `uid` is the UIDL unique-id (RFC 1939 7).
    """

    size: int
    uid: str

    def __post_init__(self) -> None:
        if self.size < 0:
            raise LocalProtocolError(f"negative message size: {self.size}")
        if not UID_RE.fullmatch(self.uid):
            raise LocalProtocolError(f"unique-id must be 1-70 chars 0x21-0x7E: {self.uid!r}")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The maildrop as it was at login; message N is at index N - 1 (RFC 1939 5).

    Two parallel sequences, not an object per message: a maildrop may hold
    hundreds of thousands, and the application's own arrays are kept as given.
    """

    sizes: Sequence[int] = ()  # what LIST reports (see MessageInfo)
    uids: Sequence[str] = ()  # what UIDL reports

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.uids):
            raise LocalProtocolError(f"{len(self.sizes)} sizes for {len(self.uids)} unique-ids")
        if min(self.sizes, default=0) < 0:
            raise LocalProtocolError(f"negative message size: {min(self.sizes)}")
        if not all(map(UID_RE.fullmatch, self.uids)):
            bad = next(uid for uid in self.uids if not UID_RE.fullmatch(uid))
            raise LocalProtocolError(f"unique-id must be 1-70 chars 0x21-0x7E: {bad!r}")

    @classmethod
    def of(cls, items: Iterable[tuple[int, str]]) -> Snapshot:
        """Build from (size, uid) pairs in message-number order."""
        infos = [MessageInfo(size, uid) for size, uid in items]
        return cls(tuple(m.size for m in infos), tuple(m.uid for m in infos))


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def decimal(text: str) -> int | None:
    """A decimal argument: ASCII digits only, no sign or spaces (RFC 1939 3)."""
    if text.isascii() and text.isdigit():
        return int(text)
    return None


class Drop:
    """A snapshot with its deletion marks; `count` and `octets` cover what is not marked."""

    __slots__ = ("_deleted", "_sizes", "_uids", "count", "octets")

    def __init__(self, snapshot: Snapshot) -> None:
        self._sizes = snapshot.sizes  # never changed: the marks are kept apart
        self._uids = snapshot.uids
        self._deleted: set[int] = set()
        self.count = len(self._sizes)
        self.octets = sum(self._sizes)

    def size(self, number: int) -> int:
        return self._sizes[number - 1]

    def uid(self, number: int) -> str:
        return self._uids[number - 1]

    def find(self, arg: str) -> int | str:
        """The number of the undeleted message `arg` names, or why it names none."""
        number = decimal(arg)
        if number is None:
            return f"not a message number: {arg[:20]!r}" if arg else "message number required"
        if not 1 <= number <= len(self._sizes):
            return f"no such message, only {plural(len(self._sizes), 'message')} in maildrop"
        if number in self._deleted:
            return f"message {number} already deleted"
        return number

    def delete(self, number: int) -> None:
        """DELE: marked now, removed only by QUIT (RFC 1939 6)."""
        self._deleted.add(number)
        self.count -= 1
        self.octets -= self._sizes[number - 1]

    def reset(self) -> None:
        """RSET: every mark taken off."""
        self._deleted.clear()
        self.count = len(self._sizes)
        self.octets = sum(self._sizes)

    def deleted(self) -> tuple[tuple[int, str], ...]:
        """The (number, uid) pairs QUIT must remove, in number order."""
        return tuple((n, self._uids[n - 1]) for n in sorted(self._deleted))

    def summary(self) -> str:
        return f"{plural(self.count, 'message')} ({self.octets} octets)"

    def scan_listing(self) -> Iterator[str]:
        """LIST's lines: "n size" for each message not marked (RFC 1939 5)."""
        deleted = self._deleted
        return (f"{i} {size}" for i, size in enumerate(self._sizes, 1) if i not in deleted)

    def uid_listing(self) -> Iterator[str]:
        """UIDL's lines: "n unique-id" for each message not marked (RFC 1939 7)."""
        deleted = self._deleted
        return (f"{i} {uid}" for i, uid in enumerate(self._uids, 1) if i not in deleted)
