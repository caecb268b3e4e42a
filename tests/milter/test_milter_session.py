"""SMTP sessions through a scripted filter: every verdict and modification, every way to fail.

Each test runs postroom in-process with a fake filter (fakemilter.py) on the
MX listener and sends with smtplib. A filter that hangs, dies or answers
garbage gets the configured default action, one log line, and loses no mail:
with "tempfail" the client hears 451 4.7.1 and keeps the message; with
"accept" the message is filed as if the filter were not there.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from fakemilter import FakeMilter, Script, cstr, pkt

from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.factory import open_store

MESSAGE = (b"From: alice@isp.example\r\nTo: boss@corp.example\r\nSubject: hello\r\n"
           b"X-Old: 1\r\nX-Old: 2\r\n\r\nHello.\r\n")


@asynccontextmanager
async def served(tmp_path: Path, script: Script, milter_settings: str = "",
                 unix_path: str | None = None) -> AsyncIterator[tuple[Running, FakeMilter]]:
    milter = await FakeMilter(script, unix_path).start()
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\n'
        f'[milters]\nsmtp = ["{milter.socket}"]\n'
        'connect_timeout = "1s"\ncommand_timeout = "1s"\ncontent_timeout = "1s"\n'
        + milter_settings)
    config = load_config(tmp_path)
    users = open_store(config.store).users
    for user in ("boss", "alice", "carol"):
        users.add_user(f"{user}@corp.example", "secret")
    running = await start(config)
    try:
        yield running, milter
    finally:
        await running.stop(grace=2)
        await milter.stop()


def send(server: Running, rcpts: tuple[str, ...] = ("boss@corp.example",),
         message: bytes = MESSAGE) -> tuple[int, str, dict[str, tuple[int, bytes]]]:
    """One transaction; the end-of-data reply (0 when no recipient was taken) and the
    RCPT replies."""
    with smtplib.SMTP(*server.address("smtp"), timeout=20) as client:
        client.ehlo("client.example")
        code, text = client.mail("alice@isp.example")
        if code != 250:
            return code, text.decode(), {}
        answers = {r: client.rcpt(r) for r in rcpts}
        if not any(c == 250 for c, _ in answers.values()):
            return 0, "", answers
        code, text = client.data(message)
        return code, text.decode(), answers


def inbox(tmp_path: Path, address: str, folder: str = "") -> list[bytes]:
    local, _, domain = address.partition("@")
    path = tmp_path / "mail" / domain / local / folder / "new"
    return [p.read_bytes() for p in sorted(path.iterdir())] if path.is_dir() else []


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_a_filter_that_continues_sees_the_session_and_the_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path, Script()) as (server, milter):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 250, text
            # The client's QUIT ends the session: its Q may reach the filter before we look.
            commands = milter.commands()
            assert commands[:15] == [b"O", b"C", b"H", b"M", b"R", b"T", b"L", b"L", b"L",
                                     b"L", b"L", b"L", b"N", b"B", b"E"]
            assert commands[15:] in ([], [b"Q"])
            macros = milter.macros()
            assert macros["{client_addr}"] == "127.0.0.1"
            assert macros["j"] == "mx.corp.example"
            assert macros["{daemon_name}"] == "smtp"
            assert macros["{mail_addr}"] == "alice@isp.example"
            assert macros["{rcpt_addr}"] == "boss@corp.example"
            assert macros["i"] in text
            names = [name for name, _ in milter.headers()]
            assert names == ["Received", "From", "To", "Subject", "X-Old", "X-Old"]
            assert ("Subject", "hello") in milter.headers()
            assert milter.body() == b"Hello.\r\n"
        stored = inbox(tmp_path, "boss@corp.example")
        assert len(stored) == 1 and stored[0].endswith(MESSAGE)

    run(scenario())


@pytest.mark.parametrize(("answer", "code", "words"), [
    (pkt(b"r"), 550, "5.7.1 Command rejected"),
    (pkt(b"t"), 451, "4.7.1"),
    (pkt(b"y", cstr("554 5.7.1 Gtube pattern")), 554, "5.7.1 Gtube pattern"),
    (pkt(b"y", cstr("451 4.7.1 Soft reject")), 451, "4.7.1 Soft reject"),
])
def test_a_refusal_at_the_end_of_the_message_keeps_nothing(
        tmp_path: Path, answer: bytes, code: int, words: str) -> None:
    async def scenario() -> None:
        async with served(tmp_path, Script(answers={b"E": [answer]})) as (server, _milter):
            got, text, _ = await asyncio.to_thread(send, server)
            assert (got, words in text) == (code, True), text
        assert inbox(tmp_path, "boss@corp.example") == []

    run(scenario())


def test_refusals_at_mail_and_rcpt_answer_those_commands(tmp_path: Path) -> None:
    script = Script(answers={b"R": [pkt(b"y", cstr("550 5.1.1 no such user here"))]})

    async def scenario() -> None:
        async with served(tmp_path, script) as (server, _milter):
            code, _text, rcpts = await asyncio.to_thread(send, server)
            assert code == 0
            assert rcpts["boss@corp.example"] == (550, b"5.1.1 no such user here")
        async with served(tmp_path / "m", Script(answers={b"M": [pkt(b"t")]})) as (server, _m):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 451, text

    (tmp_path / "m").mkdir()
    run(scenario())


def test_a_filter_on_a_unix_socket(tmp_path: Path) -> None:
    edits = {b"E": [pkt(b"h", cstr("X-Unix", "yes")), pkt(b"c")]}

    async def scenario() -> None:
        path = str(tmp_path / "milter.sock")
        async with served(tmp_path, Script(answers=edits), unix_path=path) as (server, _m):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 250, text

    run(scenario())
    assert b"\r\nX-Unix: yes\r\n" in inbox(tmp_path, "boss@corp.example")[0]


def test_session_verdicts_at_connect(tmp_path: Path) -> None:
    """Reject at connect refuses every MAIL of the session (HELO still answered);
    accept at connect leaves the filter out for the whole session."""
    async def scenario() -> None:
        async with served(tmp_path, Script(answers={b"C": [pkt(b"r")]})) as (server, milter):
            code, text, _ = await asyncio.to_thread(send, server)
            assert (code, text) == (550, "5.7.1 Command rejected")
            await asyncio.wait_for(milter.closed.wait(), 10)  # the session's end
            assert milter.commands() == [b"O", b"C", b"Q"]
        async with served(tmp_path / "a", Script(answers={b"C": [pkt(b"a")]})) as (server, m):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 250, text
            await asyncio.wait_for(m.closed.wait(), 10)
            assert m.commands() == [b"O", b"C", b"Q"]

    (tmp_path / "a").mkdir()
    run(scenario())
    assert len(inbox(tmp_path / "a", "boss@corp.example")) == 1


@pytest.mark.parametrize("step", [b"C", b"M", b"E"])
def test_discard_answers_250_and_files_nothing(tmp_path: Path, step: bytes) -> None:
    async def scenario() -> None:
        async with served(tmp_path, Script(answers={step: [pkt(b"d")]})) as (server, _milter):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 250, text
        assert inbox(tmp_path, "boss@corp.example") == []

    run(scenario())


def test_header_changes_are_applied_in_order(tmp_path: Path) -> None:
    edits = [pkt(b"h", cstr("X-Spam-Flag", "YES")),
             pkt(b"i", struct.pack("!I", 0) + cstr("Authentication-Results", "mx; spf=pass")),
             pkt(b"m", struct.pack("!I", 2) + cstr("X-Old", "")),  # delete the second
             pkt(b"m", struct.pack("!I", 1) + cstr("Subject", "[SPAM] hello\n\tfolded")),
             pkt(b"a")]

    async def scenario() -> None:
        async with served(tmp_path, Script(answers={b"E": edits})) as (server, _milter):
            code, text, _ = await asyncio.to_thread(send, server)
            assert code == 250, text

    run(scenario())
    stored = inbox(tmp_path, "boss@corp.example")[0]
    head, _, body = stored.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0].startswith(b"Return-Path: <alice@isp.example>")
    assert lines[1] == b"Authentication-Results: mx; spf=pass"
    assert b"Subject: [SPAM] hello\r\n\tfolded\r\nX-Old: 1\r\nX-Spam-Flag: YES" in head
    assert b"X-Old: 2" not in head
    assert body == b"Hello.\r\n"


def test_a_new_body_replaces_a_large_spooled_message(tmp_path: Path) -> None:
    """Past the store's in-memory size, with body pieces over one packet each way."""
    big = MESSAGE + b"".join(b"line %06d of a long message body\r\n" % i for i in range(40000))
    new_body = [b"replacement %06d\r\n" % i for i in range(20000)]
    pieces = [b"".join(new_body[i:i + 3000]) for i in range(0, len(new_body), 3000)]
    script = Script(answers={b"E": [pkt(b"b", p) for p in pieces]
                             + [pkt(b"h", cstr("X-Scanned", "yes")), pkt(b"c")]})

    async def scenario() -> None:
        async with served(tmp_path, script) as (server, milter):
            code, text, _ = await asyncio.to_thread(send, server, ("boss@corp.example",), big)
            assert code == 250, text
            chunks = [data for c, data in milter.received if c == b"B"]
            assert max(len(c) for c in chunks) == 65535
            assert b"".join(chunks) == big.partition(b"\r\n\r\n")[2]

    run(scenario())
    stored = inbox(tmp_path, "boss@corp.example")[0]
    head, _, body = stored.partition(b"\r\n\r\n")
    assert head.endswith(b"X-Old: 2\r\nX-Scanned: yes")
    assert body == b"".join(new_body)


def test_envelope_changes_and_quarantine(tmp_path: Path) -> None:
    edits = [pkt(b"+", cstr("<carol@corp.example>")),
             pkt(b"-", cstr("<alice@corp.example>")),
             pkt(b"e", cstr("<bounces@isp.example>")),
             pkt(b"q", cstr("looks like spam")), pkt(b"a")]

    async def scenario() -> None:
        async with served(tmp_path, Script(answers={b"E": edits})) as (server, _milter):
            code, text, _ = await asyncio.to_thread(
                send, server, ("boss@corp.example", "alice@corp.example"))
            assert code == 250, text

    run(scenario())
    assert inbox(tmp_path, "boss@corp.example") == []  # quarantined: not in the inbox
    junk = inbox(tmp_path, "boss@corp.example", ".Junk")
    assert len(junk) == 1 and junk[0].startswith(b"Return-Path: <bounces@isp.example>")
    assert len(inbox(tmp_path, "carol@corp.example", ".Junk")) == 1
    assert inbox(tmp_path, "alice@corp.example", ".Junk") == []


def test_unanswered_steps_progress_and_skip(tmp_path: Path) -> None:
    # rspamd's way: no replies before the end of headers; here also a SKIP and progress.
    protocol = 0x1000 | 0x2000 | 0x4000 | 0x8000 | 0x10000 | 0x80 | 0x40000 | 0x400
    script = Script(protocol=protocol, answers={
        b"B": [pkt(b"s")], b"E": [pkt(b"p"), pkt(b"p"), pkt(b"h", cstr("X-Seen", "1")),
                                  pkt(b"c")]})
    big = MESSAGE + b"x" * 200_000 + b"\r\n"

    async def scenario() -> None:
        async with served(tmp_path, script) as (server, milter):
            code, text, _ = await asyncio.to_thread(send, server, ("boss@corp.example",), big)
            assert code == 250, text
            assert milter.commands().count(b"B") == 1  # skipped after the first piece

    run(scenario())
    assert b"\r\nX-Seen: 1\r\n" in inbox(tmp_path, "boss@corp.example")[0]


FAULTS = [
    ("down", None),
    ("hang", Script(hang=b"E")),
    ("die", Script(die=b"B")),
    ("garbage", Script(garbage=b"E")),
    ("hang at rcpt", Script(hang=b"R")),
]


@pytest.mark.parametrize(("fault", "script"), FAULTS, ids=[f for f, _ in FAULTS])
@pytest.mark.parametrize("action", ["tempfail", "accept"])
def test_a_failing_filter_gets_the_default_action_and_loses_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, fault: str, script: Script | None,
        action: str) -> None:
    caplog.set_level(logging.INFO, logger="postroom")

    async def scenario() -> None:
        async with served(tmp_path, script or Script(),
                          f'default_action = "{action}"\n') as (server, milter):
            if script is None:
                await milter.stop()  # nothing listens on its port any more
            # Two recipients: a filter that failed at the first one must not let the
            # second one through unfiltered.
            code, text, rcpts = await asyncio.to_thread(
                send, server, ("boss@corp.example", "alice@corp.example"))
            if action == "tempfail":
                refused = code if code else rcpts["alice@corp.example"][0]
                assert refused == 451, (code, text, rcpts)
            else:
                assert code == 250, text

    run(scenario())
    for rcpt in ("boss@corp.example", "alice@corp.example"):
        assert len(inbox(tmp_path, rcpt)) == (0 if action == "tempfail" else 1)
    lines = [r.getMessage() for r in caplog.records if "milter" in r.getMessage()
             and "default action" in r.getMessage()]
    assert len(lines) == 1 and f"default action {action}" in lines[0], lines
