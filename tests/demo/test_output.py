"""The demo's output: the POP3 trace split by RFC 1939 state."""

from __future__ import annotations

from postroom.demo.output import pop3_states


def test_pop3_states_user_pass() -> None:
    lines = ["S: +OK ready", "C: STLS", "S: +OK go", "TLS: TLSv1.3", "C: USER b", "S: +OK",
             "C: PASS (hidden)", "S: +OK 1 message", "C: STAT", "S: +OK 1 9", "C: QUIT",
             "S: +OK bye"]
    auth, transaction, update = pop3_states(lines)
    assert auth[-2:] == ["C: PASS (hidden)", "S: +OK 1 message"]
    assert transaction == ["C: STAT", "S: +OK 1 9"]
    assert update == ["C: QUIT", "S: +OK bye"]


def test_pop3_states_failed_login_stays_in_authentication() -> None:
    lines = ["S: +OK ready", "C: AUTH PLAIN (credentials hidden)", "S: -ERR no", "C: QUIT",
             "S: +OK bye"]
    auth, transaction, update = pop3_states(lines)
    assert auth == lines and transaction == [] and update == []
