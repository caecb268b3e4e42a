"""The defences of a real `postroom serve` with two processes, against hostile clients.

Clients come from other loopback addresses (127.0.0.2 and on: all of 127/8 is
the loopback's) so that each is a client of its own, while 127.0.0.1 plays
the honest user or the harness. DNS lists are served on loopback by the suite's
DNS server (tests/mailauth/dnszone.py), which can also leave a zone unanswered.
"""

from __future__ import annotations

import importlib
import re
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from mailharness import LOOPBACK, Postroom

if TYPE_CHECKING:
    from dnszone import TestDNS

pytestmark = pytest.mark.interop

USER, PASSWORD = "boss@corp.example", "boss-secret"
ATTACKER = "127.0.0.2"


class Client:
    """A line-at-a-time SMTP or POP3 client bound to a source address of its own."""

    def __init__(self, port: int, source: str, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection((LOOPBACK, port), timeout=timeout,
                                             source_address=(source, 0))
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line

    def reply(self) -> bytes:
        """One SMTP reply, its lines joined; b"" when the server closed."""
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if len(line) < 4 or line[3:4] != b"-":
                return b"\n".join(lines)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def ask(self, command: bytes) -> bytes:
        self.send(command + b"\r\n")
        return self.reply()

    def closed(self) -> bool:
        """The server closed the connection (after what is buffered)."""
        try:
            return self.buffer == b"" and self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def logged(server: Postroom, pattern: str, timeout: float = 10.0) -> str:
    """The server's log once `pattern` shows in it (lines are flushed every 0.2 s)."""
    deadline = time.monotonic() + timeout
    while True:
        log = server.log_path.read_text(errors="replace")
        if re.search(pattern, log) or time.monotonic() > deadline:
            assert re.search(pattern, log), f"{pattern!r} not in the log:\n{log[-6000:]}"
            return log
        time.sleep(0.05)


def fail2ban_patterns() -> list[str]:
    """The failregex lines of the README's fail2ban filter, <HOST> as a named group."""
    from mailharness import REPO

    text = (REPO / "README.md").read_text()
    block = re.search(r"failregex = (.*?)\n(?=\S)", text, re.S)
    assert block is not None, "the README shows a fail2ban filter"
    # fail2ban matches after the time stamp it removed ("^ postroom..."): search instead.
    return [line.strip().removeprefix("^").replace("<HOST>", r"(?P<host>[0-9A-Fa-f.:]+)")
            for line in block.group(1).splitlines() if line.strip()]


def _server(factory: Callable[..., Postroom], toml: str, **options: Any) -> Postroom:
    return factory(workers=2, extra_toml=toml, **options)


# -- limits across processes ---------------------------------------------------------


def test_connection_count_holds_across_both_processes(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = _server(postroom_factory, "[limits]\nexceptions = []\nconnection_count = 3\n"
                     "connection_rate = 0\n")
    # Connections are opened (and held) until both processes have taken some: counted
    # per process, each would then greet 3.
    clients: list[Client] = []
    answers: list[bytes] = []
    pids: set[str] = set()
    while len(pids) < 2 and len(clients) < 120:
        batch = [Client(server.smtp_port, ATTACKER) for _ in range(6)]
        answers += [c.reply() for c in batch]
        clients += batch
        for client in batch:
            port = client.sock.getsockname()[1]
            log = logged(server, rf"smtp: connect from \[127\.0\.0\.2\]:{port}\n")
            pid = re.search(rf"\[(\d+)\]: smtp: connect from \[127\.0\.0\.2\]:{port}\n", log)
            assert pid is not None
            pids.add(pid.group(1))
    assert len(pids) == 2, "the kernel gave every connection to one process"
    greeted = [c for c, a in zip(clients, answers, strict=True) if a.startswith(b"220 ")]
    refused = [a for a in answers if not a.startswith(b"220 ")]
    assert len(greeted) == 3, answers
    # RFC 5321 3.8: 421 and our name in place of the greeting (no enhanced code before
    # EHLO, RFC 2034); the log line has it.
    assert all(a.startswith(b"421 mx.corp.example Too many connections") for a in refused), \
        refused
    assert all(c.closed() for c, a in zip(clients, answers, strict=True) if a in refused)
    # Another client is not held up; and a slot given back is free again.
    other = Client(server.smtp_port, "127.0.0.3")
    assert other.reply().startswith(b"220 ")
    greeted[0].ask(b"QUIT")
    deadline = time.monotonic() + 10
    while True:
        again = Client(server.smtp_port, ATTACKER)
        if again.reply().startswith(b"220 ") or time.monotonic() > deadline:
            break
        again.close()
    assert again.ask(b"EHLO client.example").startswith(b"250")
    log = logged(server, r"postroom\.defense\[\d+\]: smtp: defense: connection_count from "
                         r"\[127\.0\.0\.2\]: 421 4\.7\.0")


def _smtp_auth(client: Client, password: str) -> bytes:
    import base64

    token = base64.b64encode(f"\0{USER}\0{password}".encode()).decode()
    return client.ask(f"AUTH PLAIN {token}".encode())


def test_login_brute_force_is_slowed_then_refused_while_the_user_logs_in(
    postroom_factory: Callable[..., Postroom],
) -> None:
    """500 wrong passwords by SMTP AUTH, POP3 PASS and APOP from one address, over new
    connections that land in both processes: each failure is answered later than the
    one before, the address is then refused without a password check, and the real
    user logs in from another address."""
    limit = 8
    server = _server(
        postroom_factory,
        "allow_plaintext_auth = true\n\n"
        "[pop3]\nallow_plaintext_auth = true\napop = true\nauth_failure_delay = \"10ms\"\n\n"
        f"[limits]\nexceptions = []\nconnection_rate = 0\nauth_failure_limit = {limit}\n",
        listeners=("smtp", "submission", "pop3"))
    submission, pop3 = server.ports["submission"], server.ports["pop3"]
    answers: list[bytes] = []
    smtp: Client | None = None
    pop: Client | None = None
    for attempt in range(500):
        kind = attempt % 3
        if kind == 0:
            if smtp is None:
                smtp = Client(submission, ATTACKER)
                smtp.reply()
                smtp.ask(b"EHLO attacker.example")
            answer = _smtp_auth(smtp, f"guess{attempt}")
            if not answer.startswith(b"535"):
                smtp.close()
                smtp = None
        else:
            if pop is None:
                pop = Client(pop3, ATTACKER)
                greeting = pop.line()
            if kind == 1:
                pop.ask(f"USER {USER}".encode())
                answer = pop.ask(f"PASS guess{attempt}".encode())
            else:
                stamp = re.search(rb"<[^>]+>", greeting)
                assert stamp is not None
                answer = pop.ask(f"APOP {USER} {'0' * 32}".encode())
            if not answer.startswith(b"-ERR [AUTH]"):
                pop.close()
                pop = None
        answers.append(answer)
    failed = [a for a in answers if a.startswith((b"535 5.7.8", b"-ERR [AUTH]"))]
    refused = [a for a in answers if a.startswith((b"421 4.7.0", b"-ERR [SYS/TEMP]"))]
    assert len(failed) == limit, answers[:20]
    assert answers[:limit] == failed  # the failures came first, then only refusals
    assert len(refused) == 500 - limit
    assert any(a.startswith(b"421 4.7.0") for a in refused)
    assert any(a.startswith(b"-ERR [SYS/TEMP]") for a in refused)
    deadline = time.monotonic() + 10
    while server.log_path.read_text().count("defense: auth_lockout from [127.0.0.2]") < \
            500 - limit and time.monotonic() < deadline:
        time.sleep(0.05)
    log = server.log_path.read_text()
    delays = [float(d) for d in re.findall(
        r"authentication failed for '[^']*' from \[127\.0\.0\.2\]:\d+ \(answer delayed "
        r"([0-9.]+)s\)", log)]
    assert len(delays) == limit
    assert delays == sorted(delays) and delays[-1] >= 8 * delays[0]  # slowed: doubling
    assert len(re.findall(r"defense: auth_lockout from \[127\.0\.0\.2\]", log)) == 500 - limit
    # The README's fail2ban filter finds the attacker in every one of those lines.
    banned = [m.group("host") for pattern in fail2ban_patterns()
              for m in re.finditer(pattern, log, re.MULTILINE)]
    assert banned.count(ATTACKER) == 500 and set(banned) == {ATTACKER}
    # The real user, from another address, is let in by both protocols at once.
    user = Client(submission, LOOPBACK)
    user.reply()
    user.ask(b"EHLO user.example")
    assert _smtp_auth(user, PASSWORD).startswith(b"235 ")
    pop_user = Client(pop3, LOOPBACK)
    pop_user.line()
    pop_user.ask(f"USER {USER}".encode())
    assert pop_user.ask(f"PASS {PASSWORD}".encode()).startswith(b"+OK")
    pop_user.ask(b"QUIT")


def _session(port: int, source: str, commands: list[bytes]) -> list[bytes]:
    client = Client(port, source)
    replies = [client.reply()] + [client.ask(command) for command in commands]
    client.ask(b"QUIT")
    client.close()
    return replies


def test_message_and_recipient_rates_per_address_and_per_user(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = _server(
        postroom_factory,
        "allow_plaintext_auth = true\n\n[limits]\nexceptions = []\nconnection_rate = 0\n"
        "message_rate = 2\nrecipient_rate = 3\nuser_message_rate = 1\n",
        listeners=("smtp", "submission"))
    mail, rcpt = b"MAIL FROM:<a@client.example>", b"RCPT TO:<boss@corp.example>"
    first = _session(server.smtp_port, ATTACKER, [b"EHLO c.example", mail, rcpt, rcpt])
    second = _session(server.smtp_port, ATTACKER, [b"EHLO c.example", mail, rcpt, rcpt])
    third = _session(server.smtp_port, ATTACKER, [b"EHLO c.example", mail])
    assert [r[:3] for r in first[2:]] == [b"250", b"250", b"250"]
    assert [r[:3] for r in second[2:4]] == [b"250", b"250"]
    assert second[4].startswith(b"450 4.7.1 Too many recipients"), second  # the 4th
    assert third[2].startswith(b"450 4.7.1 Too many messages"), third  # the 3rd MAIL
    # Submission: one message a minute for the user, whichever address it comes from.
    import base64

    auth = b"AUTH PLAIN " + base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())
    port = server.ports["submission"]
    own = f"MAIL FROM:<{USER}>".encode()
    once = _session(port, "127.0.0.3", [b"EHLO u.example", auth, own])
    twice = _session(port, "127.0.0.4", [b"EHLO u.example", auth, own])
    assert once[3].startswith(b"250") and twice[2].startswith(b"235")
    assert twice[3].startswith(b"450 4.7.1 Too many messages from boss@corp.example"), twice
    logged(server, r"submission: defense: user_message_rate from \[127\.0\.0\.4\]: 450 4\.7\.1")
    logged(server, r"smtp: defense: recipient_rate from \[127\.0\.0\.2\]: 450 4\.7\.1 .*count=4")


# -- postscreen's protocol tests -------------------------------------------------------


def test_pregreet_and_unnegotiated_pipelining_are_told_off_and_dropped(
    postroom_factory: Callable[..., Postroom],
) -> None:
    server = _server(postroom_factory, '[limits]\nexceptions = ["127.0.0.1"]\n\n'
                     '[screen]\ngreet_wait = "300ms"\n')
    port = server.smtp_port
    talker = Client(port, ATTACKER)
    talker.send(b"EHLO bot.example\r\n")
    assert talker.reply().startswith(b"554 mx.corp.example Protocol error")  # no 220 first
    assert talker.closed()
    polite = Client(port, ATTACKER)
    assert polite.reply().startswith(b"220 ")
    assert polite.ask(b"EHLO polite.example").startswith(b"250")
    # EHLO negotiated PIPELINING: a group of commands is fine (RFC 2920 3.1).
    polite.send(b"MAIL FROM:<a@client.example>\r\nRCPT TO:<boss@corp.example>\r\n")
    assert polite.reply().startswith(b"250") and polite.reply().startswith(b"250")
    # After HELO there is no PIPELINING: commands sent ahead end the session.
    rusher = Client(port, "127.0.0.3")
    assert rusher.reply().startswith(b"220 ")
    rusher.send(b"HELO rusher.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert rusher.reply().startswith(b"554 5.5.1 ")
    assert rusher.closed()
    log = logged(server, r"defense: pipelining from")
    assert re.search(r"smtp: defense: pregreet from \[127\.0\.0\.2\]: 554 5\.5\.1 ", log), log
    assert re.search(r"smtp: defense: pipelining from \[127\.0\.0\.3\]: 554 5\.5\.1", log), log


# -- DNS lists, client names and greylisting against DNS on loopback ------------------------


def _dnszone() -> Any:
    """tests/mailauth/dnszone.py, the suite's DNS server (that folder is not a package)."""
    folder = str(Path(__file__).resolve().parents[1] / "mailauth")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("dnszone")


@pytest.fixture
def zones(require_peer: Callable[..., str]) -> Iterator[TestDNS]:
    require_peer("dnslib", module=True)
    records = {
        ("2.0.0.127.bl.test", "A"): ["127.0.0.2"],  # listed
        ("3.0.0.127.bl.test", "A"): ["127.0.0.100"],  # an answer the filter leaves out
        ("4.0.0.127.wl.test", "A"): ["127.0.0.2"],  # allowlisted
    }
    for n in (2, 3, 4):
        records[(f"{n}.0.0.127.in-addr.arpa", "PTR")] = [f"host{n}.client.test."]
        records[(f"host{n}.client.test", "A")] = [f"127.0.0.{n}"]
    records[("6.0.0.127.in-addr.arpa", "PTR")] = ["liar.client.test."]
    records[("liar.client.test", "A")] = ["192.0.2.1"]
    with _dnszone().serve_dns(records, silent=("dead.test",)) as server:
        yield server


def _dns_toml(zones: TestDNS, greylist: str) -> str:
    return (f'[dns]\nnameservers = ["127.0.0.1:{zones.port}"]\n\n'
            '[limits]\nexceptions = ["127.0.0.1"]\n\n'
            '[screen]\nreverse_dns = "reject"\n\n'
            '[dnsbl]\nsites = ["bl.test=127.0.0.[2..11]*2", "wl.test*-2", "dead.test"]\n'
            'threshold = 2\ntimeout = "500ms"\n\n' + greylist)


def _transaction(port: int, source: str, helo: bytes = b"EHLO client.test") -> list[bytes]:
    client = Client(port, source)
    replies = [client.reply(), client.ask(helo)]
    if replies[-1].startswith(b"250"):
        replies.append(client.ask(b"MAIL FROM:<news@client.test>"))
        replies.append(client.ask(b"RCPT TO:<boss@corp.example>"))
    client.ask(b"QUIT")
    client.close()
    return replies


def test_dns_lists_client_names_and_greylisting(
    postroom_factory: Callable[..., Postroom], zones: TestDNS,
) -> None:
    server = _server(postroom_factory, _dns_toml(
        zones, '[greylist]\nenabled = true\ndelay = "1h"\n'))
    port = server.smtp_port
    # Listed by bl.test (weight 2 >= threshold 2): refused after the greeting, by name.
    listed = _transaction(port, "127.0.0.2")
    assert listed[0].startswith(b"220 ")
    assert listed[1].startswith(b"554 5.7.1 ") and b"bl.test" in listed[1], listed
    # Answered outside the filter, and by a list that never answers: not listed; so
    # greylisted at RCPT.
    grey = _transaction(port, "127.0.0.3")
    assert grey[1].startswith(b"250") and grey[2].startswith(b"250")
    assert grey[3].startswith(b"450 4.7.1 "), grey
    # Allowlisted by wl.test: no greylisting.
    allowed = _transaction(port, "127.0.0.4")
    assert allowed[3].startswith(b"250 "), allowed
    # No PTR record, and a PTR name that does not lead back: 450 4.7.25 (RFC 7372).
    for source in ("127.0.0.5", "127.0.0.6"):
        nameless = _transaction(port, source)
        assert nameless[1].startswith(b"450 4.7.25 "), nameless
    # HELO names: bad syntax, and a claim to be this host.
    assert _transaction(port, "127.0.0.4", b"EHLO bad_name!")[1].startswith(b"501 5.5.2 ")
    assert _transaction(port, "127.0.0.4", b"EHLO mx.corp.example")[1].startswith(
        b"550 5.7.1 ")
    log = logged(server, r"defense: helo_ours from")
    assert re.search(r"smtp: defense: dnsbl from \[127\.0\.0\.2\]: 554 5\.7\.1 .*bl\.test; "
                     r"score=2 \(bl\.test=127\.0\.0\.2\)", log), log
    assert re.search(r"smtp: defense: greylist from \[127\.0\.0\.3\]: 450 4\.7\.1", log)
    assert re.search(r"smtp: defense: reverse_dns from \[127\.0\.0\.5\]: 450 4\.7\.25", log)
    assert re.search(r"smtp: defense: helo_syntax from \[127\.0\.0\.4\]", log)
    assert re.search(r"smtp: defense: helo_ours from \[127\.0\.0\.4\]", log)


def test_greylisting_survives_a_restart(
    postroom_factory: Callable[..., Postroom], zones: TestDNS,
) -> None:
    delay = 2.0
    server = _server(postroom_factory, _dns_toml(
        zones, f'[greylist]\nenabled = true\ndelay = "{delay}s"\n'))
    first = _transaction(server.smtp_port, "127.0.0.3")
    first_try = time.monotonic()
    assert first[3].startswith(b"450 4.7.1 "), first
    server.stop()
    server.start()
    while time.monotonic() < first_try + delay + 0.2:  # the retry must come after `delay`
        time.sleep(0.1)
    retry = _transaction(server.smtp_port, "127.0.0.3")
    assert retry[3].startswith(b"250 "), retry  # a forgotten triplet would be a new 450


# -- the same hostile clients against Postfix (smtpd and anvil), for the README's table ------


def test_postfix_anvil_answers_the_same_hostile_clients(
    private_postfix: Callable[..., Any],
) -> None:
    """Postfix 3.7's smtpd with anvil limits, no postscreen: the reference the README
    compares postroom with. Over the connection count: 421 4.7.0 in place of the
    greeting; over the message rate: 450 4.7.1; commands pipelined after HELO:
    logged, and answered all the same (postscreen, not smtpd, drops such clients)."""
    postfix = private_postfix(
        mailbox_domain="corp.example", mailbox_users=["boss"],
        extra_main_cf={"smtpd_client_event_limit_exceptions": "",
                       "smtpd_client_connection_count_limit": "3",
                       "smtpd_client_message_rate_limit": "2"})
    held = [Client(postfix.port, ATTACKER) for _ in range(3)]
    assert all(c.reply().startswith(b"220 ") for c in held)
    over = Client(postfix.port, ATTACKER)
    assert over.reply().startswith(b"421 4.7.0 "), "Postfix names the limit's code"
    for c in held:
        c.ask(b"QUIT")
    mail = b"MAIL FROM:<a@client.example>"
    replies = [_session(postfix.port, "127.0.0.3", [b"EHLO c.example", mail])[2]
               for _ in range(3)]
    assert [r[:9] for r in replies] == [b"250 2.1.0", b"250 2.1.0", b"450 4.7.1"], replies
    rusher = Client(postfix.port, "127.0.0.4")
    rusher.reply()
    rusher.send(b"HELO rusher.example\r\nMAIL FROM:<a@client.example>\r\n")
    assert rusher.reply().startswith(b"250 ") and rusher.reply().startswith(b"250 ")
