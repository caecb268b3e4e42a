"""`postroom queue`: list, show, flush, delete, hold and release in a temporary data folder."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from postroom import cli
from postroom.config import default_config
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.store import QueueStore


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DATA_ENV, raising=False)
    return tmp_path


@pytest.fixture
def store(in_tmp: Path) -> QueueStore:
    return QueueStore(default_config(in_tmp / "var").queue_dir)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    sys.stdin = io.StringIO("")
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def add(store: QueueStore, queue_id: str, **kw: object) -> Envelope:
    fields: dict[str, object] = {
        "sender": "boss@corp.example",
        "recipients": [
            Recipient("a@isp.example", state="deferred", attempts=3, dsn_status="4.4.1",
                      last_error="connect to mx.isp.example[192.0.2.1]:25: Connection refused",
                      remote_mta="mx.isp.example[192.0.2.1]:25"),
            Recipient("b@corp.example", state="delivered", attempts=1, last_error="250 ok"),
        ],
        "created": time.time() - 7500,
        "next_attempt": time.time() + 780,
    }
    fields.update(kw)
    env = Envelope(queue_id=queue_id, **fields)  # type: ignore[arg-type]
    store.add(env, [b"Subject: x\r\n\r\n" + b"y" * 5000 + b"\r\n"])
    return env


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("postroom: error: ")
    return lines[0]


def test_empty_queue(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    assert run(capsys, "queue", "list") == (0, "the queue is empty\n", "")
    assert not (in_tmp / "var").exists()  # looking creates nothing


@pytest.mark.parametrize(
    "argv", [["queue", "--help"], ["queue", "list", "--help"], ["queue", "show", "--help"],
             ["queue", "flush", "--help"], ["queue", "hold", "--help"]],
)
def test_help(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv)
    assert code == 0 and "usage:" in out


def test_list(capsys: pytest.CaptureFixture[str], store: QueueStore) -> None:
    add(store, "AAAA00000001")
    add(store, "AAAA00000002", held=True, sender="", created=time.time() - 30,
        recipients=[Recipient("c@isp.example")])
    code, out, _ = run(capsys, "queue", "list")
    assert code == 0
    header, first, second = out.splitlines()
    assert header.split() == ["QUEUE", "ID", "AGE", "SIZE", "SENDER", "RECIPIENTS", "NEXT",
                              "TRY", "LAST", "ERROR"]
    assert first.startswith("AAAA00000001")
    for part in ("2h 5m", "4.9K", "<boss@corp.example>", "1/2 pending", "in 12m",
                 "(connect to mx.isp.example[192.0.2.1]:25: Connection refused)"):
        assert part in first, (part, first)
    assert "HELD" not in first
    for part in ("30s", "<>", "1/1 pending", "HELD"):
        assert part in second, (part, second)
    # Each value starts under its heading (right-aligned ones end under it).
    for heading, value in (("SENDER", "<"), ("RECIPIENTS", "1/"), ("NEXT TRY", "in 12m"),
                           ("LAST ERROR", "(connect")):
        assert first.index(value) == header.index(heading), (heading, out)
    assert first.index("2h 5m") + len("2h 5m") == header.index("AGE") + len("AGE")


def test_list_shortens_long_errors(capsys: pytest.CaptureFixture[str], store: QueueStore) -> None:
    add(store, "AAAA00000001", recipients=[
        Recipient("a@isp.example", state="deferred", last_error="421 " + "x" * 200)
    ])
    _, out, _ = run(capsys, "queue", "list")
    assert "(421 xxxx" in out and "...)" in out and len(out.splitlines()[1]) < 200


def test_show_says_why_and_when(capsys: pytest.CaptureFixture[str], store: QueueStore) -> None:
    add(store, "AAAA00000001", envid="ENV1", auth_user="boss@corp.example",
        client="[192.0.2.9]")
    code, out, _ = run(capsys, "queue", "show", "AAAA00000001")
    assert code == 0
    for part in (
        "message AAAA00000001",
        "sender:    <boss@corp.example> (by boss@corp.example, from [192.0.2.9])",
        "2h 5m ago",
        "envid:     ENV1",
        "waiting: next try at",
        "(in 12m",
        "gives up:",
        "<a@isp.example>  deferred, 3 attempts, dsn=4.4.1",
        "last answer: mx.isp.example[192.0.2.1]:25: connect to mx.isp.example[192.0.2.1]:25: "
        "Connection refused",
        "<b@corp.example>  delivered, 1 attempt",
    ):
        assert part in out, (part, out)


def test_unknown_or_bad_id_is_one_line_exit_2(
    capsys: pytest.CaptureFixture[str], store: QueueStore
) -> None:
    for action in ("show", "flush", "delete", "hold", "release"):
        code, _, err = run(capsys, "queue", action, "NOPE00000001")
        assert code == 2
        assert one_error_line(err) == "postroom: error: no message NOPE00000001 in the queue"
    code, _, err = run(capsys, "queue", "show", "../../etc/passwd")
    assert code == 2
    assert "not a queue ID" in one_error_line(err)


def test_hold_release_delete(capsys: pytest.CaptureFixture[str], store: QueueStore) -> None:
    add(store, "AAAA00000001")
    code, out, _ = run(capsys, "queue", "hold", "AAAA00000001")
    assert code == 0 and out.startswith("held AAAA00000001; the server is not running")
    assert store.load("AAAA00000001").held
    _, out, _ = run(capsys, "queue", "show", "AAAA00000001")
    assert "HELD: not tried until `postroom queue release AAAA00000001`" in out
    assert run(capsys, "queue", "release", "AAAA00000001")[0] == 0
    assert not store.load("AAAA00000001").held
    code, out, _ = run(capsys, "queue", "delete", "AAAA00000001")
    assert code == 0 and out.startswith("deleted AAAA00000001")
    assert store.ids() == []
    assert list(store.messages.iterdir()) == []


def test_flush_one_and_all(capsys: pytest.CaptureFixture[str], store: QueueStore) -> None:
    add(store, "AAAA00000001")
    add(store, "AAAA00000002")
    code, out, _ = run(capsys, "queue", "flush", "AAAA00000001")
    assert code == 0 and out.startswith("flushed AAAA00000001")
    assert store.load("AAAA00000001").next_attempt == 0.0
    assert store.load("AAAA00000002").next_attempt > 0
    _, out, _ = run(capsys, "queue", "show", "AAAA00000001")
    assert "due: tried as soon as the server gets to it" in out
    code, out, _ = run(capsys, "queue", "flush")
    assert code == 0 and out.startswith("flushed 2 messages")
    assert store.load("AAAA00000002").next_attempt == 0.0


def test_flush_of_a_held_message_says_how_to_release_it(
    capsys: pytest.CaptureFixture[str], store: QueueStore
) -> None:
    add(store, "AAAA00000001")
    held = add(store, "AAAA00000002", held=True)
    code, out, err = run(capsys, "queue", "flush", "AAAA00000002")
    assert (code, out) == (2, "")
    assert one_error_line(err) == ("postroom: error: AAAA00000002 is held: it is not tried "
                                   "until `postroom queue release AAAA00000002`")
    assert store.load("AAAA00000002").next_attempt == held.next_attempt  # untouched
    code, out, _ = run(capsys, "queue", "flush")
    assert code == 0
    assert out == ("flushed 1 message (1 held, left alone: `postroom queue release ID` lets "
                   "one be tried); the server is not running\n")
    assert store.load("AAAA00000001").next_attempt == 0.0
    assert store.load("AAAA00000002").next_attempt == held.next_attempt


def test_flush_tells_the_running_server_which_tries_at_once(
    capsys: pytest.CaptureFixture[str], store: QueueStore, in_tmp: Path
) -> None:
    """A real `postroom serve`: the flushed message is tried now, not in 13 minutes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed, smtp = s.getsockname()[1], 0  # nothing listens on `closed` once s is gone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        smtp = s.getsockname()[1]
    (in_tmp / "var" / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\nworkers = 1\n[listen]\nsmtp = "127.0.0.1:{smtp}"\n'
        f'[routes]\n"isp.example" = "127.0.0.1:{closed}"\n'
    )
    add(store, "AAAA00000001")  # 3 attempts so far, the next in 13 minutes
    log = in_tmp / "serve.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "postroom", "--data",
                                   str(in_tmp / "var"), "serve"],
                                  stdout=subprocess.DEVNULL, stderr=out)
    try:
        deadline = time.monotonic() + 30
        while "queue: started with 1 message(s)" not in log.read_text():
            assert server.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        code, out_text, _ = run(capsys, "queue", "flush", "AAAA00000001")
        assert (code, out_text) == (0, f"flushed AAAA00000001; told the server "
                                       f"(pid {server.pid})\n")
        while store.load("AAAA00000001").recipients[0].attempts < 4:
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
    finally:
        server.terminate()
        assert server.wait(30) == 0


def test_stale_pid_file_is_left_alone(
    capsys: pytest.CaptureFixture[str], store: QueueStore, in_tmp: Path
) -> None:
    add(store, "AAAA00000001")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (in_tmp / "var" / "postroom.pid").write_text(f"{dead.pid}\n")
    _, out, _ = run(capsys, "queue", "flush", "AAAA00000001")
    assert out.endswith("; the server is not running\n")
    # a pid file naming a process that is not postroom (here: `sleep`) is not signalled
    other = subprocess.Popen(["sleep", "30"])
    try:
        (in_tmp / "var" / "postroom.pid").write_text(str(other.pid))
        _, out, _ = run(capsys, "queue", "flush", "AAAA00000001")
        assert out.endswith("; the server is not running\n")
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()
    (in_tmp / "var" / "postroom.pid").write_text("garbage")
    assert run(capsys, "queue", "flush", "AAAA00000001")[0] == 0


def test_data_option_after_the_action(
    capsys: pytest.CaptureFixture[str], in_tmp: Path
) -> None:
    other = QueueStore(default_config(in_tmp / "elsewhere").queue_dir)
    add(other, "BBBB00000001")
    code, out, _ = run(capsys, "queue", "list", "--data", str(in_tmp / "elsewhere"))
    assert code == 0 and out.splitlines()[1].startswith("BBBB00000001")
    assert os.listdir(in_tmp) == ["elsewhere"]
