"""What the four protocol cores share: non-event results, the two errors, state machinery.

`next_event` returns NEED_DATA when a core must be fed more bytes, and (server
cores) PAUSED while an event awaits the application's answer. Errors, split as
h11 splits them: LocalProtocolError when the application calls a core out of
turn (the message names state and call; the refused call changes nothing),
RemoteProtocolError when the peer breaks the protocol, raised by the client
cores only (closed after it): the server cores never raise for what a client
sends, they answer it with an error reply.

Each core keeps its states in an enum and its legal moves in one table, which
its `_move` alone applies. The client cores share `ClientCore`: commands are
paired with answers in order; the state is what the answers so far confirm,
and the next command is checked against the state once every command in flight
succeeds (`_projected`: RCPTs may follow an unanswered MAIL).
"""

from __future__ import annotations

import abc
import enum
from collections import deque
from collections.abc import Container, Mapping
from typing import Final, Generic, NamedTuple, NoReturn, TypeVar


class Signal(enum.Enum):
    """What `next_event` returns when it has no event (compare with `is`)."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # waiting for the application: an answer, a greeting, a TLS handshake

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Signal.NEED_DATA
PAUSED: Final = Signal.PAUSED


class LocalProtocolError(Exception):
    """The application called the core out of turn (see the module docstring)."""


class RemoteProtocolError(Exception):
    """The peer broke the protocol: a client core's view of a malformed or unexpected reply."""


class CoreState(enum.Enum):
    """Base of the cores' state enums: a state prints as its value, in messages and logs."""

    # Members are singletons compared by identity: hash them by identity too, in C
    # (Enum's own __hash__ is Python code, on every transition-table lookup).
    __hash__ = object.__hash__

    def __str__(self) -> str:
        return str(self.value)


def illegal_move(state: CoreState, trigger: str) -> LocalProtocolError:
    """The error for a move the state table does not have, naming state and trigger."""
    return LocalProtocolError(f"{trigger!r} is not allowed in state {state}")


def shown(data: bytes) -> str:
    """Peer text safe to quote in an error message: printable ASCII, bounded."""
    return repr("".join(chr(b) if 0x20 <= b <= 0x7E else "?" for b in data[:60]))


def check_text(value: str, what: str) -> None:
    """ValueError for a control character in a command argument: a CR or LF would end
    the command early, and the rest would be read as a command of its own (command
    injection). The value is not shown: it may be a password."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        raise ValueError(f"control character in {what}")


S = TypeVar("S", bound=CoreState)

# Which kind of answer came: an index into a Step.
OK, MORE, FAILED = 0, 1, 2
# Rows that no command sends: the session's own moves.
TLS_STARTED = "TLS started"  # the handshake after the server's yes to STARTTLS/STLS
CLOSE = "close"  # the end: QUIT answered, EOF, a 421 or -ERR on its own, a broken server


class Step(NamedTuple, Generic[S]):
    """What a command does in the state it is answered in: the state after a positive
    answer (2xx, +OK), an intermediate one (3xx, a "+ " continuation) and a negative
    one (4xx/5xx, -ERR); None: that answer cannot come. `sendable` False marks a
    row for answers only (a command pipelined behind one that failed)."""

    ok: S | None
    more: S | None
    failed: S
    sendable: bool = True

    def after(self, answer: int) -> S | None:
        return self.ok if answer == OK else self.more if answer == MORE else self.failed

    @property
    def hoped(self) -> S | None:
        """The state once the command succeeds: an intermediate answer for those that
        expect one (DATA's 354, a SASL challenge), else a positive one."""
        return self.more if self.more is not None else self.ok


class ClientCore(abc.ABC, Generic[S]):
    """The plumbing of a client core; a core sets the class attributes below."""

    _steps: Mapping[tuple[S, str], Step[S]]
    _closed: S
    _tls_wait: S
    _tls_rule: str  # the RFC section that forbids data before the TLS handshake
    _alone: frozenset[str]  # sent only when no command awaits an answer
    _ends_group: frozenset[str]  # nothing may follow them before their answer

    def __init__(self, connected: S, greeting: str) -> None:
        self._state = connected  # what the answers so far confirm
        self._projected = connected  # once every pending command succeeds
        self._pending: deque[tuple[str, str]] = deque([(greeting, "")])  # (command, argument)
        self._out = bytearray()
        self._eof = False
        self._violation: str | None = None
        self._unanswered: tuple[str, ...] = ()  # when the session ended
        self._tls = False

    @property
    def state(self) -> S:
        """The state the answers so far confirm."""
        return self._state

    @property
    def closing(self) -> bool:
        return self._state is self._closed

    @property
    def tls_active(self) -> bool:
        return self._tls

    @property
    def pending(self) -> tuple[str, ...]:
        """Commands sent and not yet answered, oldest first."""
        return tuple(command for command, _ in self._pending)

    @property
    @abc.abstractmethod
    def _pipelining(self) -> bool:
        """Whether the server lets commands follow before their answers."""

    @abc.abstractmethod
    def _take(self, data: bytes) -> None:
        """Keep bytes from the server for reading."""

    def receive_data(self, data: bytes) -> None:
        """Bytes from the server; b"" means it closed its side (EOF)."""
        if self._state is self._closed:
            return
        if not data:
            self._eof = True
        elif self._state is self._tls_wait:
            self._violation = f"the server sent data before the TLS handshake ({self._tls_rule})"
        else:
            self._take(data)

    def data_to_send(self) -> bytes:
        data = bytes(self._out)
        self._out.clear()
        return data

    def _send(self, command: str, data: bytes, argument: str = "", limit: int = 0) -> None:
        """Queue a command's bytes and await its answer; `limit`: its line's most octets."""
        pending = self.pending
        if pending:
            last = pending[-1]
            if command in self._alone or last in self._ends_group:
                raise LocalProtocolError(f"cannot send {command} before {last} is answered")
            if not self._pipelining:
                raise LocalProtocolError(
                    f"cannot send {command} before {last} is answered: no PIPELINING"
                )
        step = self._steps.get((self._projected, command))
        hoped = step.hoped if step is not None and step.sendable else None
        if hoped is None:
            raise LocalProtocolError(f"cannot send {command} in state {self._projected}")
        if limit and len(data) > limit:
            raise ValueError(f"{command} line longer than {limit} octets")
        self._out += data
        self._pending.append((command, argument))
        self._projected = hoped

    def _move(self, command: str, answer: int, what: str = "") -> S:
        """Move by the answer to `command` (`what` names it for the error when it cannot
        answer); a command without a row was pipelined behind one that failed, and its
        answers leave the state as it is."""
        step = self._steps.get((self._state, command)) or Step(self._state, None, self._state)
        state = step.after(answer)
        if state is None:
            self._fail(f"{what} cannot answer {command} (in state {self._state})")
        self._state = state
        return state

    def _fail(self, why: str) -> NoReturn:
        self._close()
        raise RemoteProtocolError(why)

    def _close(self) -> tuple[str, ...]:
        """End the session; the commands that had no answer."""
        if self._state is not self._closed:
            self._unanswered = self.pending
        self._move(CLOSE, OK)
        self._projected = self._state
        self._pending.clear()
        self._violation = None
        return self._unanswered


class Offered:
    """A flag of a server's list of extensions or capabilities: whether it names
    `keyword` (the list's own `in` decides)."""

    __slots__ = ("keyword",)

    def __init__(self, keyword: str) -> None:
        self.keyword = keyword

    def __get__(self, listing: Container[str] | None, owner: object = None) -> bool:
        return listing is not None and self.keyword in listing
