"""Every path that acknowledges mail makes it durable first, in postroom.store.durable's order.

One check (`durable_order.assert_durable`) runs over every caller: the SMTP
server's group commit (small and spooled messages, maildirs on two
filesystems), the queue behind a submission's 250 and behind `sendmail`, the
local courier, `atomic_write`, POP3's Update state and `fetch` into a Maildir
and into an mbox. Each scenario runs the real code with a recording
`durable.OS` and notes its acknowledgement in the same log: the reply written
to the client (250, +OK), the DELE `fetch` sends, or a blocking call
returning. A killed process cannot show a missing fsync (its written pages
survive in the page cache); this order can.

The second test leaves a data sync or a folder sync out of the log, as code
that forgot it would, and the check must then fail for that caller.
"""

from __future__ import annotations

import asyncio
import errno
import os
import poplib
import smtplib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from durable_order import Recorder, assert_durable, install_recorder
from message_content import content_of
from postroom.client.fetch import FetchOptions, fetch
from postroom.config import load_config
from postroom.delivery.local import LocalCourier
from postroom.net.channel import Channel
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.store import QueueStore
from postroom.server.main import Running, start
from postroom.server.stream import Stream
from postroom.store.api import Expansion
from postroom.store.atomic import atomic_write
from postroom.store.factory import open_store
from postroom.store.mailboxes import MaildirMailboxes

BOSS, ALICE, TEAM = "boss@corp.example", "alice@corp.example", "team@corp.example"
PASSWORD = "boss-secret"
QUEUED = "250 2.0.0 Ok: queued"


@dataclass
class Outcome:
    """What one scenario acknowledged (the index of its note) and promised."""

    ack: int
    published: list[Path] = field(default_factory=list)
    removed: list[Path] = field(default_factory=list)
    moved: list[Path] = field(default_factory=list)
    appended: list[Path] = field(default_factory=list)


Scenario = Callable[[Path, Recorder], Outcome]
SCENARIOS: dict[str, Scenario] = {}


def scenario(name: str) -> Callable[[Scenario], Scenario]:
    def register(fn: Scenario) -> Scenario:
        SCENARIOS[name] = fn
        return fn

    return register


def message(subject: str, body_size: int = 200, sender: str = "smith@isp.example") -> bytes:
    line = b"x" * 78 + b"\r\n"
    body = line * (body_size // len(line) + 1)
    return (f"From: {sender}\r\nTo: {BOSS}\r\nSubject: {subject}\r\n\r\n".encode() + body)


def new_files(data: Path, address: str) -> list[Path]:
    local, domain = address.split("@")
    folder = data / "mail" / domain / local / "new"
    return sorted(folder.iterdir()) if folder.is_dir() else []


@asynccontextmanager
async def server(tmp_path: Path, *listeners: str, extra: str = "") -> AsyncIterator[Running]:
    data = tmp_path / "server"
    data.mkdir()
    (data / "postroom.toml").write_text("\n".join([
        'hostname = "mx.corp.example"',
        'domains = ["corp.example"]',
        "[listen]",
        *(f'{name} = "127.0.0.1:0"' for name in listeners),
        "[smtp]",
        "allow_plaintext_auth = true",
        "[pop3]",
        "allow_plaintext_auth = true",
        'auth_failure_delay = "0.1s"',
        extra,
    ]) + "\n")
    config = load_config(data)
    directory = open_store(config.store).users
    directory.add_user(BOSS, PASSWORD)
    directory.add_user(ALICE, "alice-secret")
    directory.add_alias(TEAM, [BOSS, ALICE])
    running = await start(config)
    try:
        yield running
    finally:
        await running.stop(grace=2)


def note_replies(monkeypatch: pytest.MonkeyPatch, recorder: Recorder) -> None:
    """Log what servers write to clients and what `fetch` sends to its server."""
    def noting(real: Callable[[Any, bytes], None], who: str) -> Callable[[Any, bytes], None]:
        def write(self: Any, data: bytes) -> None:
            recorder.note(f"{who} {bytes(data)!r}")
            real(self, data)

        return write

    monkeypatch.setattr(Stream, "write", noting(Stream.write, "server wrote"))
    monkeypatch.setattr(Channel, "write", noting(Channel.write, "client sent"))


async def smtp_send(running: Running, recipients: list[str], data: bytes) -> None:
    def send() -> None:
        with smtplib.SMTP(*running.address("smtp"), timeout=10) as client:
            client.sendmail("smith@isp.example", recipients, data)

    await asyncio.to_thread(send)


# -- the scenarios ------------------------------------------------------------------------


def _smtp(tmp_path: Path, recorder: Recorder, body_size: int) -> Outcome:
    async def run() -> None:
        async with server(tmp_path, "smtp") as running:
            await smtp_send(running, [TEAM], message("to the team", body_size))

    asyncio.run(run())
    data = tmp_path / "server"
    return Outcome(recorder.note_index(QUEUED),
                   published=new_files(data, BOSS) + new_files(data, ALICE))


@scenario("smtp: a message held in memory, to two maildirs")
def smtp_small(tmp_path: Path, recorder: Recorder) -> Outcome:
    return _smtp(tmp_path, recorder, 2_000)


@scenario("smtp: a message spooled to a file, to two maildirs")
def smtp_large(tmp_path: Path, recorder: Recorder) -> Outcome:
    return _smtp(tmp_path, recorder, 700 * 1024)


@scenario("smtp: hard links refused (EXDEV), copied instead")
def smtp_no_links(tmp_path: Path, recorder: Recorder) -> Outcome:
    recorder.fail("link", lambda call: OSError(errno.EXDEV, os.strerror(errno.EXDEV)))
    return _smtp(tmp_path, recorder, 2_000)


@scenario("submission: a message queued for relay")
def submission_queued(tmp_path: Path, recorder: Recorder) -> Outcome:
    replies: list[bytes] = []

    async def run() -> None:
        # Nothing listens on port 1: the message stays queued, deferred.
        async with server(tmp_path, "smtp", "submission",
                          extra='[routes]\n"isp.example" = "127.0.0.1:1"') as running:
            def send() -> None:
                with smtplib.SMTP(*running.address("submission"), timeout=10) as client:
                    client.login(BOSS, PASSWORD)
                    client.mail(BOSS)
                    client.rcpt("smith@isp.example")
                    replies.append(client.data(message("relayed", sender=BOSS))[1])

            await asyncio.to_thread(send)

    asyncio.run(run())
    queue_id = replies[0].split()[-1].decode()
    final = tmp_path / "server" / "queue" / "messages" / queue_id
    return Outcome(recorder.note_index(QUEUED), published=[final])


@scenario("queue: a message added (sendmail)")
def queue_add(tmp_path: Path, recorder: Recorder) -> Outcome:
    queue = QueueStore(tmp_path / "queue")
    queue.add(Envelope("QUEUED000001", BOSS, [Recipient(ALICE)], created=0.0),
              [message("queued")])
    return Outcome(recorder.note("add returned"),
                   published=[queue.message_path("QUEUED000001")])


@scenario("queue: messages added in a batch")
def queue_add_many(tmp_path: Path, recorder: Recorder) -> Outcome:
    queue = QueueStore(tmp_path / "queue")
    ids = ["BATCH0000001", "BATCH0000002"]
    errors = queue.add_many([(Envelope(i, BOSS, [Recipient(ALICE)], created=0.0),
                              [message(i)]) for i in ids])
    assert errors == [None, None]
    return Outcome(recorder.note("add_many returned"),
                   published=[queue.message_path(i) for i in ids])


@scenario("local courier: a queued message into maildirs")
def local_courier(tmp_path: Path, recorder: Recorder) -> Outcome:
    store = MaildirMailboxes(tmp_path / "mail", "mx.corp.example")
    queued = tmp_path / "queued.eml"
    queued.write_bytes(message("bounce"))

    async def expand(address: str) -> Expansion:
        return Expansion((BOSS, ALICE) if address == TEAM else (address,), (), ())

    envelope = Envelope("LOCAL0000001", "", [Recipient(TEAM)], created=0.0)
    with content_of(queued) as content:
        results = asyncio.run(LocalCourier(store, expand).deliver(
            envelope, envelope.recipients, content))
    store.close()
    assert [r.outcome for r in results] == ["delivered"]
    finals = [p for box in (BOSS, ALICE)
              for p in sorted((store.maildir_for(box) / "new").iterdir())]
    return Outcome(recorder.note("delivered"), published=finals)


@scenario("atomic_write: a state file replaced")
def atomic(tmp_path: Path, recorder: Recorder) -> Outcome:
    atomic_write(tmp_path / "state", b"old")
    atomic_write(tmp_path / "state", b"new")
    return Outcome(recorder.note("returned"), published=[tmp_path / "state"])


@scenario("pop3: QUIT's Update state (DELE and RETR)")
def pop3_update(tmp_path: Path, recorder: Recorder) -> Outcome:
    before: list[Path] = []

    async def run() -> None:
        async with server(tmp_path, "smtp", "pop3") as running:
            for n in range(2):  # the maildrop lists them in this order
                await smtp_send(running, [BOSS], message(f"pop {n}"))
                before.extend(set(new_files(tmp_path / "server", BOSS)) - set(before))

            def session() -> None:
                client = poplib.POP3(*running.address("pop3"), timeout=10)
                client.user(BOSS)
                client.pass_(PASSWORD)
                client.retr(1)
                client.dele(2)
                client.quit()

            await asyncio.to_thread(session)

    asyncio.run(run())
    read, deleted = before
    cur = tmp_path / "server" / "mail" / "corp.example" / "boss" / "cur"
    return Outcome(recorder.note_index("signing off"), removed=[deleted],
                   moved=[cur / f"{read.name}:2,S"])


def _fetch(tmp_path: Path, recorder: Recorder, *, mbox: bool) -> Outcome:
    dest = tmp_path / ("inbox.mbox" if mbox else "Maildir")
    state = tmp_path / "state" / "fetch-state"  # apart: its folder sync is its own
    paths: list[Path] = []

    async def run() -> None:
        async with server(tmp_path, "smtp", "pop3s") as running:
            await smtp_send(running, [BOSS], message("fetched"))
            host, port = running.address("pop3s")
            result = await fetch(FetchOptions(
                host=host, port=port, security="tls", user=BOSS, password=PASSWORD, dest=dest,
                mbox=mbox, state_file=state, cafile=str(tmp_path / "server" / "tls" / "cert.pem")))
            assert result.downloaded == 1 and result.deleted == 1
            paths.extend(result.paths)

    asyncio.run(run())
    ack = recorder.note_index("client sent b'DELE 1")
    if mbox:
        return Outcome(ack, appended=[dest], published=[state])
    return Outcome(ack, published=[*paths, state])


@scenario("fetch: a message into a Maildir, then DELE")
def fetch_maildir(tmp_path: Path, recorder: Recorder) -> Outcome:
    return _fetch(tmp_path, recorder, mbox=False)


@scenario("fetch: a message into a new mbox, then DELE")
def fetch_mbox(tmp_path: Path, recorder: Recorder) -> Outcome:
    return _fetch(tmp_path, recorder, mbox=True)


# -- the tests --------------------------------------------------------------------------


def _run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
         omit: str | None = None) -> tuple[Recorder, Outcome]:
    recorder = install_recorder(monkeypatch)
    if omit is not None:
        recorder.omit(omit)
    note_replies(monkeypatch, recorder)
    return recorder, SCENARIOS[name](tmp_path, recorder)


def _check(recorder: Recorder, outcome: Outcome) -> None:
    assert_durable(recorder.log, outcome.ack, published=outcome.published,
                   removed=outcome.removed, moved=outcome.moved, appended=outcome.appended)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_acknowledged_only_once_durable(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, outcome = _run(name, tmp_path, monkeypatch)
    _check(recorder, outcome)


WRITES_NO_DATA = {"pop3: QUIT's Update state (DELE and RETR)"}  # removals and moves only


@pytest.mark.parametrize(("name", "omit"), [
    (name, omit) for name in sorted(SCENARIOS) for omit in ("datasync", "sync_dir")
    if not (omit == "datasync" and name in WRITES_NO_DATA)
])
def test_the_check_catches_a_left_out_sync(
    name: str, omit: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder, outcome = _run(name, tmp_path, monkeypatch, omit=omit)
    with pytest.raises(AssertionError):
        _check(recorder, outcome)
