"""`postroom queue list` streams from disk (first line early, memory flat) and `--summary`
counts by domain and age like Postfix's qshape."""

from __future__ import annotations

import contextlib
import io
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from postroom import cli
from postroom.config import default_config
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.queuefile import envelope_line
from postroom.queue.store import QueueStore

MESSAGE = b"Subject: x\r\n\r\nhello\r\n"


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DATA_ENV, raising=False)
    return tmp_path


@pytest.fixture
def store(in_tmp: Path) -> QueueStore:
    return QueueStore(default_config(in_tmp / "var").queue_dir)


def fill(store: QueueStore, count: int, start: int = 0, **kw: Any) -> None:
    """Queue files written directly (unsynced: a fixture, not a durable add)."""
    now = time.time()
    for n in range(start, start + count):
        fields: dict[str, Any] = {"sender": "boss@corp.example", "created": now - 60,
                                  "recipients": [Recipient(f"u{n}@isp.example")]}
        fields.update(kw)
        env = Envelope(queue_id=f"Q{n:011d}", **fields)
        (store.messages / env.queue_id).write_bytes(envelope_line(env) + MESSAGE)


class Watcher(io.TextIOBase):
    """A stdout that keeps nothing: it notes how many envelopes had been read when
    the first line came, and counts the lines."""

    def __init__(self, reads: list[int]) -> None:
        self.reads = reads  # [envelopes read so far]
        self.at_first_line: int | None = None
        self.lines = 0

    def write(self, text: str) -> int:
        if self.at_first_line is None and text.strip():
            self.at_first_line = self.reads[0]
        self.lines += text.count("\n")
        return len(text)


def listing(monkeypatch: pytest.MonkeyPatch, *argv: str) -> Watcher:
    reads = [0]
    real = QueueStore.try_load

    def try_load(self: QueueStore, queue_id: str) -> Envelope | None:
        reads[0] += 1
        return real(self, queue_id)

    monkeypatch.setattr(QueueStore, "try_load", try_load)
    out = Watcher(reads)
    with contextlib.redirect_stdout(out):  # type: ignore[type-var]
        assert cli.main(["queue", "list", *argv]) == 0
    monkeypatch.setattr(QueueStore, "try_load", real)
    return out


def test_the_first_line_comes_before_the_whole_queue_is_read(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(store, 3500)
    out = listing(monkeypatch)
    assert out.at_first_line is not None and out.at_first_line <= 1000
    assert out.lines == 3500 + 1  # the heading, then one line per message


def test_listing_memory_does_not_grow_with_the_queue(
    store: QueueStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    def peak() -> int:
        tracemalloc.start()
        try:
            listing(monkeypatch)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    fill(store, 600)
    small = peak()
    fill(store, 5400, start=600)
    large = peak()
    # Ten times the messages: the same batches in memory, not ten times as much.
    assert large < small * 2, (small, large)


def test_summary_counts_pending_recipients_by_domain_and_age(
    store: QueueStore, capsys: pytest.CaptureFixture[str]
) -> None:
    now = time.time()
    fill(store, 3, created=now - 60)  # 1 minute old: the "5" bucket
    fill(store, 2, start=3, created=now - 30 * 60,  # 30 minutes: the "40" bucket
         recipients=[Recipient("a@far.example"), Recipient("b@far.example"),
                     Recipient("c@isp.example", state="delivered")])
    fill(store, 1, start=5, created=now - 3 * 86400,  # 3 days: the last bucket
         recipients=[Recipient("x@old.example")])
    assert cli.main(["queue", "list", "--summary"]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert lines[0] == ["T", "5", "10", "20", "40", "80", "160", "320", "640", "1280",
                        "1280+"]
    rows = {line[0]: [int(x) for x in line[1:]] for line in lines[1:-1]}
    assert rows["TOTAL"] == [8, 3, 0, 0, 4, 0, 0, 0, 0, 0, 1]
    assert rows["far.example"] == [4, 0, 0, 0, 4, 0, 0, 0, 0, 0, 0]
    assert rows["isp.example"] == [3, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    assert rows["old.example"] == [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    assert list(rows) == ["TOTAL", "far.example", "isp.example", "old.example"]
    assert lines[-1][0] == "(6"  # messages counted
    capsys.readouterr()
    assert cli.main(["queue", "list", "--summary", "--top", "1"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert names == ["TOTAL", "far.example"]


def test_summary_of_an_empty_queue(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["queue", "list", "--summary"]) == 0
    assert capsys.readouterr().out == "the queue is empty\n"
