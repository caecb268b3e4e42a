"""The POP3 server core's states and tables: transitions, and the commands each state takes.

Data only, read by pop3_server (its `_move` alone applies TRANSITIONS).
"""

from __future__ import annotations

from postroom.protocol._core import CoreState


class State(CoreState):
    """Session states: RFC 1939 3's three plus the waits this core needs around them."""

    GREETING = "GREETING"  # connected; the app has not sent the greeting yet
    AUTHORIZATION = "AUTHORIZATION"  # RFC 1939 4
    SASL = "SASL"  # inside an AUTH exchange: each line is a response (RFC 5034 4)
    STARTING_TLS = "STARTING_TLS"  # STLS accepted: input discarded until the handshake
    TRANSACTION = "TRANSACTION"  # RFC 1939 5
    UPDATE = "UPDATE"  # RFC 1939 6: QUIT seen, the app is removing messages
    CLOSED = "CLOSED"


# How the session moves: (state, trigger) -> next state. A trigger names what just
# happened (a reply the core or the app gave, an I/O signal). POP3Server._move is
# the only writer of the state; a pair not in the table raises LocalProtocolError
# naming both.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.GREETING, "greeting"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "challenge"): State.SASL,
    (State.SASL, "challenge"): State.SASL,
    (State.AUTHORIZATION, "auth_end"): State.AUTHORIZATION,
    (State.SASL, "auth_end"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "login"): State.TRANSACTION,
    (State.SASL, "login"): State.TRANSACTION,
    (State.AUTHORIZATION, "stls"): State.STARTING_TLS,
    (State.STARTING_TLS, "tls_started"): State.AUTHORIZATION,
    (State.AUTHORIZATION, "quit"): State.CLOSED,
    (State.TRANSACTION, "quit"): State.UPDATE,
    (State.UPDATE, "update_done"): State.CLOSED,
    # EOF, timeout, too many errors, refusal: any open session may end. RFC 1939 6:
    # only QUIT reaches UPDATE, so none of these ever deletes a message.
    **{(s, "close"): State.CLOSED for s in State if s is not State.CLOSED},
}

# Which commands each state accepts (RFC 1939 9; CAPA RFC 2449 5; STLS RFC 2595 4;
# AUTH RFC 5034 4). A known command elsewhere gets -ERR.
#
# UTF8 (RFC 6856) is neither offered nor understood. Offering it is a promise about
# every session: a client that has not sent UTF8 must never see UTF-8 header fields,
# so each message that has them must be served as a downgraded surrogate (RFC 6857,
# RFC 6858) whose size LIST reports exactly, and the USER, PASS and APOP arguments
# fall under SASLprep. Doing that means opening every message at login to learn
# whether it needs a surrogate, and serving a message other than the one stored.
# Without the extension, a client gets each message as it was filed, as from any
# RFC 1939 server (Dovecot's POP3 offers no UTF8 either), and this is what the
# clients postroom is tested with expect: curl, mpop, fetchmail, getmail and
# Python's poplib never send UTF8 unless told to. A user with a UTF-8 address
# still logs in: AUTH PLAIN carries UTF-8 (RFC 4616 2) and USER and PASS are read
# as UTF-8 (they are matched against the directory's canonical spelling).
COMMANDS: dict[State, frozenset[str]] = {
    State.AUTHORIZATION: frozenset(
        {"USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "QUIT"}
    ),
    State.TRANSACTION: frozenset(
        {"STAT", "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "CAPA", "QUIT"}
    ),
}
KNOWN_COMMANDS = frozenset().union(*COMMANDS.values())
