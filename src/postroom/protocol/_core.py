"""What the four protocol cores share: the non-event results, the two errors, the state writer.

Every core (SMTP server and client, POP3 server and client) returns `NEED_DATA`
from `next_event` when it must be fed more bytes; the server cores return
`PAUSED` while an event awaits the application's answer. Both are members of
one enum, compared with `is`.

A core raises two kinds of error, as h11 splits them:

- `LocalProtocolError`: the application used the core out of turn (an answer
  no event awaits, a command its state does not allow); the message names the
  state and the call, and the refused call changes nothing.
- `RemoteProtocolError`: the peer broke the protocol. Only the client cores
  raise it (from `next_event`, and they are closed after it). The server
  cores never raise for what a client sends: they answer it with an error
  reply, and close the session when it goes on.

Each core keeps its states in an enum and its legal moves in one table, which
its `_move` alone applies; a move the table lacks raises `illegal_move`.
"""

from __future__ import annotations

import enum
from typing import Final


class Signal(enum.Enum):
    """What `next_event` returns when it has no event (compare with `is`)."""

    NEED_DATA = "NEED_DATA"  # feed more bytes with receive_data()
    PAUSED = "PAUSED"  # waiting for the application: an answer, a greeting, a TLS handshake

    def __repr__(self) -> str:
        return self.value


NEED_DATA: Final = Signal.NEED_DATA
PAUSED: Final = Signal.PAUSED


class ProtocolError(Exception):
    """Base of the two errors a protocol core raises."""


class LocalProtocolError(ProtocolError):
    """The application called the core out of turn (see the module docstring)."""


class RemoteProtocolError(ProtocolError):
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
