"""`postroom demo` runs the whole story in-process and leaves nothing behind; a failure,
SIGTERM or Ctrl-C still stops everything."""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import os
import re
import signal
import socket
from pathlib import Path
from typing import Any

import pytest

from postroom import cli
from postroom.client import send
from postroom.demo import run
from postroom.demo.output import LogTap


def listening_ports(output: str) -> list[tuple[str, int]]:
    """The (kind, port) pairs the demo said it used, from its setting-up lines."""
    setup = output.split("\n1. ")[0].splitlines()
    return [("udp" if "(UDP)" in line else "tcp", int(port))
            for line in setup for port in re.findall(r"127\.0\.0\.1:(\d+)", line)]


def assert_nothing_left(output: str) -> None:
    ports = listening_ports(output)
    assert {kind for kind, _ in ports} == {"udp", "tcp"}
    assert len(ports) == 4  # DNS, submission, SMTP, POP3
    for kind, port in ports:
        if kind == "tcp":
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED, port
        else:  # a UDP port nobody holds can be bound again
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind(("127.0.0.1", port))
    folder = re.search(r"Setting up in (\S+)", output)
    assert folder is not None
    assert not Path(folder.group(1)).exists()
    assert not any(isinstance(h, LogTap) for h in logging.getLogger("postroom").handlers)


def test_demo_tells_the_story_and_leaves_nothing_running() -> None:
    out = io.StringIO()
    assert run.run_demo(out=out) == 0, out.getvalue()
    text = out.getvalue()
    steps = [re.search(rf"^{n}\. ", text, re.MULTILINE) for n in ("1", "2", "3", "4", "5a", "5b")]
    assert all(steps), text
    starts = [m.start() for m in steps if m]
    assert starts == sorted(starts)
    assert re.search(r"corp\.example MX\?\s+->\s+MX 10 mx\.corp\.example\.", text)
    assert "C: STARTTLS" in text and "TLSv1" in text
    assert "C: AUTH" in text and "hidden" in text
    assert "status=queued" in text and "status=sent" in text and "relay=local" in text
    assert "554 5.7.1" in text and "Relay access denied" in text
    for state in ("Authentication state", "Transaction state", "Update state"):
        assert state in text
    assert "maildrop on mx.corp.example: empty" in text
    # Ends with the message as received, its path, and the verdict.
    tail = text[text.index("The message as the boss received it"):]
    assert "  | .signed off by accounting" in tail
    assert "by    mail.isp.example (postroom)" in tail and "with  ESMTPSA (TLS, AUTH)" in tail
    assert "by    mx.corp.example (postroom)" in tail and "with  ESMTPS (TLS)" in tail
    assert text.rstrip().splitlines()[-2].startswith("OK: ")
    assert "\033[" not in text  # no colours when the output is not a terminal
    assert_nothing_left(text)


def test_cli_demo_keep_data_leaves_the_folder(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--keep-data"]) == 0
    out = capsys.readouterr().out
    kept = re.search(r"kept the demo's folder: (\S+)", out)
    assert kept is not None
    folder = Path(kept.group(1))
    try:
        assert (folder / "isp" / "postroom.toml").is_file()
        assert (folder / "corp" / "mail" / "corp.example" / "boss").is_dir()
        (download,) = (folder / "boss-laptop" / "new").iterdir()
        assert cli.main(["trace", str(download)]) == 0
        traced = capsys.readouterr().out
        assert "2 hops, oldest first" in traced and "ESMTPSA (TLS, AUTH)" in traced
        assert "queue: " in (folder / "postroom.log").read_text()
    finally:
        import shutil

        shutil.rmtree(folder)


def test_a_failing_step_says_so_and_still_cleans_up(monkeypatch: pytest.MonkeyPatch) -> None:
    async def refused(*args: Any, **kwargs: Any) -> None:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")

    monkeypatch.setattr(send, "submit", refused)
    out = io.StringIO()
    assert run.run_demo(out=out) == run.EXIT_FAILED
    assert "FAILED: ConnectionRefusedError" in out.getvalue()
    assert_nothing_left(out.getvalue())


@pytest.mark.parametrize(
    ("signum", "status"),
    [(signal.SIGTERM, run.EXIT_TERMINATED), (signal.SIGINT, run.EXIT_INTERRUPTED)],
)
def test_a_signal_mid_story_stops_everything(
    monkeypatch: pytest.MonkeyPatch, signum: int, status: int
) -> None:
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is not Python's default here; asyncio would not turn it into Ctrl-C")

    async def interrupted(*args: Any, **kwargs: Any) -> None:
        os.kill(os.getpid(), signum)
        await asyncio.sleep(30)

    monkeypatch.setattr(send, "submit", interrupted)
    out = io.StringIO()
    assert run.run_demo(out=out) == status
    assert "stopped the servers it started" in out.getvalue()
    assert_nothing_left(out.getvalue())
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_demo_on_postgresql(postgres: Any) -> None:
    import psycopg

    out = io.StringIO()
    assert run.run_demo(out=out, store=postgres.url) == 0, out.getvalue()
    text = out.getvalue()
    assert "keeps users and mail in PostgreSQL" in text
    assert "files it in PostgreSQL" in text and "PostgreSQL row of messages: UIDL" in text
    assert "maildrop on mx.corp.example: empty" in text
    assert text.rstrip().splitlines()[-2].startswith("OK: ")
    with psycopg.connect(postgres.url) as conn:
        left = conn.execute("SELECT datname FROM pg_database "
                            "WHERE datname LIKE 'postroom_demo_%'").fetchall()
    assert left == []  # its database is dropped
    assert_nothing_left(text)
