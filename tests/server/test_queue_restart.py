"""A restart serves at once: the listeners take mail while the relay queue's schedule
is still being loaded in the background."""

from __future__ import annotations

import asyncio
import smtplib
import threading
import time
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.queuefile import envelope_line
from postroom.queue.store import QueueStore
from postroom.server.main import start
from postroom.store.factory import open_store

QUEUED = 300


def test_mail_is_taken_before_the_schedule_is_loaded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "var"
    root.mkdir()
    (root / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\n'
    )
    config = load_config(root)
    open_store(config.store).users.add_user("boss@corp.example", "secret")
    queue = QueueStore(config.queue_dir)
    later = time.time() + 3600
    for n in range(QUEUED):  # a deferred queue, written directly (unsynced)
        env = Envelope(queue_id=f"Q{n:011d}", sender="boss@corp.example", created=time.time(),
                       recipients=[Recipient(f"u{n}@far.example", state="deferred")],
                       next_attempt=later)
        (queue.messages / env.queue_id).write_bytes(envelope_line(env) + b"x\r\n")
    # Loading the schedule reads envelopes in its thread: hold it there until the
    # test has had its mail taken.
    loading = threading.Event()
    go_on = threading.Event()
    real = QueueStore.try_load

    def try_load(self: QueueStore, queue_id: str) -> Envelope | None:
        loading.set()
        assert go_on.wait(60), "the test never let the load go on"
        return real(self, queue_id)

    monkeypatch.setattr(QueueStore, "try_load", try_load)

    def send(address: tuple[str, int]) -> None:
        with smtplib.SMTP(*address, timeout=10) as client:
            client.sendmail("friend@far.example", ["boss@corp.example"],
                            b"Subject: while loading\r\n\r\nhello\r\n")

    async def scenario() -> None:
        running = await start(config)
        try:
            await asyncio.to_thread(loading.wait, 30)
            assert loading.is_set()
            scheduler = running.relay.scheduler
            await asyncio.to_thread(send, running.address("smtp"))
            assert len(scheduler.schedule) == 0  # not loaded yet, and mail was taken
            inbox = root / "mail" / "corp.example" / "boss" / "new"
            assert len(list(inbox.iterdir())) == 1
            go_on.set()
            await scheduler.idle()
            assert len(scheduler.schedule) == QUEUED
        finally:
            go_on.set()
            await running.stop(grace=2)

    asyncio.run(scenario())
