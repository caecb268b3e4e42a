"""The SMTP server core's states and tables: transitions, commands per state, sequence errors.

Data only, read by smtp_server (its `_move` alone applies TRANSITIONS).
"""

from __future__ import annotations

from postroom.protocol import smtp_events as events
from postroom.protocol._core import CoreState
from postroom.protocol.replies import Reply
from postroom.protocol.smtp_input import VERBS


class State(CoreState):
    """Session states (RFC 5321 3 and 4.1.4) and the waits the core needs around them."""

    CONNECTED = "connected"  # banner not sent yet
    GREETED = "greeted"  # banner sent, no accepted HELO/EHLO
    REFUSED = "refused"  # 554 banner: only QUIT (RFC 5321 3.1)
    READY = "ready"  # greeted by the client, no transaction
    MAIL = "mail"  # MAIL accepted, no recipient yet
    RCPT = "rcpt"  # at least one recipient accepted
    DATA = "data"  # reading DATA content
    BDAT = "bdat"  # reading a BDAT chunk of the message
    CHUNKING = "chunking"  # between BDAT chunks of one message
    AUTH = "auth"  # in a SASL exchange: lines are responses
    TLS_WAIT = "tls_wait"  # 220 sent to STARTTLS: input discarded (RFC 3207 4.2)
    CLOSED = "closed"


# How the session moves: (state, trigger) -> next state. A trigger names what
# just happened: the application's answer to an event ("MailFrom ok" is a
# positive reply to MailFrom, "MailFrom refused" a 4xx/5xx), or a step the core
# takes by itself. SMTPServer._move is the only writer of the state; a pair not
# in the table raises LocalProtocolError naming both.
TRANSITIONS: dict[tuple[State, str], State] = {
    (State.CONNECTED, "banner"): State.GREETED,
    (State.CONNECTED, "banner refused"): State.REFUSED,
    **{(s, "Hello ok"): State.READY for s in (State.GREETED, State.READY)},
    **{(s, "Hello refused"): State.GREETED for s in (State.GREETED, State.READY)},
    (State.READY, "MailFrom ok"): State.MAIL,
    (State.READY, "MailFrom refused"): State.READY,
    **{(s, "RcptTo ok"): State.RCPT for s in (State.MAIL, State.RCPT)},
    (State.MAIL, "RcptTo refused"): State.MAIL,
    (State.RCPT, "RcptTo refused"): State.RCPT,
    (State.RCPT, "DataStart ok"): State.DATA,
    (State.RCPT, "DataStart refused"): State.RCPT,
    (State.RCPT, "bdat"): State.BDAT,  # the first chunk (RFC 3030 2)
    (State.CHUNKING, "bdat"): State.BDAT,
    (State.BDAT, "chunk end"): State.CHUNKING,
    # The message ends answered either way, or refused by the core for its content.
    **{(s, t): State.READY for s in (State.DATA, State.BDAT)
       for t in ("MessageEnd ok", "MessageEnd refused", "content refused")},
    (State.READY, "StartTLS ok"): State.TLS_WAIT,
    (State.READY, "StartTLS refused"): State.READY,
    (State.TLS_WAIT, "tls_started"): State.GREETED,  # RFC 3207 4.2: a fresh session
    (State.READY, "AuthStart ok"): State.AUTH,  # 334: a SASL exchange (RFC 4954 4)
    (State.AUTH, "AuthResponse ok"): State.AUTH,
    (State.READY, "AuthStart refused"): State.READY,
    (State.AUTH, "AuthResponse refused"): State.READY,
    # auth_succeeded(), or the client cancelled or broke the exchange.
    **{(s, "auth end"): State.READY for s in (State.READY, State.AUTH)},
    # RSET, or HELO/EHLO inside a transaction (RFC 5321 4.1.4).
    **{(s, "reset"): State.READY for s in (State.MAIL, State.RCPT, State.CHUNKING)},
    **{(s, "close"): State.CLOSED for s in State if s is not State.CLOSED},
}
TRANSACTION_STATES = frozenset({State.MAIL, State.RCPT, State.CHUNKING})

# Which commands each state reads. A known command that its state does not
# list gets the reply SEQUENCE_ERRORS names for (state, command), else
# BAD_SEQUENCE. States absent here read no commands (content, SASL lines, TLS).
_ANYTIME = frozenset({"HELO", "EHLO", "NOOP", "RSET", "QUIT", "VRFY", "EXPN", "HELP"})
COMMANDS: dict[State, frozenset[str]] = {
    State.GREETED: _ANYTIME,
    State.READY: _ANYTIME | {"MAIL", "AUTH", "STARTTLS"},
    State.MAIL: _ANYTIME | {"RCPT"},
    State.RCPT: _ANYTIME | {"RCPT", "DATA", "BDAT"},
    State.CHUNKING: _ANYTIME | {"BDAT"},
    State.REFUSED: frozenset({"QUIT"}),
}
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
_NEED_HELO = Reply(503, "5.5.1", "Send HELO/EHLO first")
_NEED_MAIL = Reply(503, "5.5.1", "Send MAIL first")
_NO_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")  # RFC 5321 3.3
_NESTED_MAIL = Reply(503, "5.5.1", "Nested MAIL command")
_IN_TRANSACTION = Reply(503, "5.5.1", "Not permitted during a mail transaction")
_REFUSED = Reply(503, "5.5.1", "No SMTP service here, only QUIT")  # RFC 5321 3.1
SEQUENCE_ERRORS: dict[tuple[State, str], Reply] = {
    **{(State.GREETED, v): _NEED_HELO for v in VERBS - _ANYTIME},
    (State.READY, "RCPT"): _NEED_MAIL,
    (State.READY, "DATA"): _NEED_MAIL,
    (State.READY, "BDAT"): _NEED_MAIL,
    (State.MAIL, "DATA"): _NO_RECIPIENTS,
    (State.MAIL, "BDAT"): _NO_RECIPIENTS,
    **{(s, "MAIL"): _NESTED_MAIL for s in TRANSACTION_STATES},
    # RFC 4954 4 (AUTH) and RFC 3207 4 (STARTTLS) outside transactions only.
    **{(s, v): _IN_TRANSACTION for s in TRANSACTION_STATES for v in ("AUTH", "STARTTLS")},
    (State.CHUNKING, "DATA"): Reply(503, "5.5.1", "DATA cannot follow BDAT (RFC 3030 2)"),
    (State.CHUNKING, "RCPT"): Reply(503, "5.5.1", "RCPT cannot follow BDAT"),
    **{(State.REFUSED, v): _REFUSED for v in VERBS if v != "QUIT"},
}

# The positive codes each event may be answered with (4xx/5xx always fit), and
# the triggers of a positive and a negative answer. 235 is given through
# auth_succeeded(), which records the identity.
ANSWERS: dict[type[events.Event], tuple[frozenset[int], str, str]] = {
    event: (frozenset(codes), f"{event.__name__} ok", f"{event.__name__} refused")
    for event, codes in (
        (events.Hello, {250}),
        (events.MailFrom, {250}),
        (events.RcptTo, {250, 251, 252}),
        (events.DataStart, {354}),
        (events.MessageEnd, {250}),
        (events.StartTLS, {220}),
        (events.AuthStart, {334}),
        (events.AuthResponse, {334}),
    )
}
