"""The scheduler's cost follows what is due: due-only wake-ups, notifications instead of
rescans, dead destinations probed once per interval, deferrals written in batches.

Queues of thousands of messages are written straight into the queue folder
(the queue file format of postroom.queue.queuefile, without syncs): these
tests are about the scheduler, and `QueueStore.add`'s durability has its own.
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from durable_order import assert_durable, install_recorder
from postroom.config.model import Route
from postroom.control import ServerLock, serve_control
from postroom.delivery.remote import RemoteCourier
from postroom.delivery.routing import Router, RouterOptions
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.queuefile import envelope_line
from postroom.queue.result import DeliveryResult
from postroom.queue.rules import Rules
from postroom.queue.schedule import PARKED
from postroom.queue.scheduler import Scheduler, SchedulerOptions
from postroom.queue.store import QueueStore
from postroom.server.relay import client_tls_context

T0 = 1_700_000_000.0
MESSAGE = b"From: boss@corp.example\r\nSubject: hi\r\n\r\nhello\r\n"
RETRY = (60.0, 300.0, 900.0, 3600.0)


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 120))

    return wrapper


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write_queue(store: QueueStore, envelopes: list[Envelope]) -> None:
    """Queue files written directly, unsynced (a test's fixture, not a durable add)."""
    for env in envelopes:
        (store.messages / env.queue_id).write_bytes(envelope_line(env) + MESSAGE)


def envelope(queue_id: str, rcpt: str, *, tried: bool = False, **kw: Any) -> Envelope:
    """An envelope for one recipient; `tried`: deferred once already."""
    fields: dict[str, Any] = {"sender": "boss@corp.example", "created": T0}
    fields.update(kw)
    recipient = Recipient(rcpt, state="deferred", attempts=1) if tried else Recipient(rcpt)
    return Envelope(queue_id=queue_id, recipients=[recipient], **fields)


class Counting:
    """A courier that records the queue IDs it is given and delivers them."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    async def __call__(self, env: Envelope, rs: list[Recipient],
                       content: Content) -> list[DeliveryResult]:
        self.calls.append(env.queue_id)
        return [DeliveryResult(r.address, "delivered", "2.0.0", "250 ok",
                               "mx.isp.example[192.0.2.1]:25") for r in rs]


def options(**kw: Any) -> SchedulerOptions:
    return SchedulerOptions(hostname="mx.corp.example",
                            rules=Rules(retry_after=RETRY, give_up_after=5 * 86400.0), **kw)


@async_test
async def test_a_wake_up_reads_only_the_envelope_that_is_due(tmp_path: Path) -> None:
    """10,000 messages wait; when one comes due, the wake-up reads one envelope and
    attempts one message: nothing else is looked at again."""
    store = QueueStore(tmp_path / "queue")
    waiting = [envelope(f"W{n:011d}", f"u{n}@isp.example", next_attempt=T0 + 3600 + n)
               for n in range(10_000)]
    write_queue(store, [*waiting, envelope("DUE000000001", "due@isp.example",
                                           next_attempt=T0 + 60)])
    clock = Clock()
    courier = Counting()
    scheduler = Scheduler(store, courier, options(), clock=clock, rng=random.Random(1))
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    assert scheduler.envelope_reads == 10_001  # the schedule loaded once, at start
    assert courier.calls == []
    clock.now = T0 + 61
    scheduler.poke()
    await scheduler.idle()
    assert courier.calls == ["DUE000000001"]
    assert scheduler.envelope_reads == 10_002  # the due one, read for its attempt
    assert len(scheduler.schedule) == 10_000
    scheduler.stop()
    await task


@async_test
async def test_the_schedule_keeps_no_envelope(tmp_path: Path) -> None:
    """In memory per message: its next attempt, destination, arrival and where it
    waits; the envelope is read from disk when the attempt starts."""
    store = QueueStore(tmp_path / "queue")
    write_queue(store, [envelope("AAAA00000001", "a@ISP.example", next_attempt=T0 + 99)])
    scheduler = Scheduler(store, Counting(), options(), clock=Clock())
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    entry = scheduler.schedule.entries["AAAA00000001"]
    assert (entry.next_attempt, entry.dest, entry.created) == (T0 + 99, "isp.example", T0)
    assert not hasattr(entry, "__dict__")  # __slots__ only: no room for more
    scheduler.stop()
    await task


# -- notification from another process, without a rescan ------------------------------


@async_test
async def test_sendmail_in_another_process_notifies_without_a_rescan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`postroom sendmail` (a separate process) queues a message and names it on the
    control socket: the scheduler reads that one envelope and delivers it, with no
    rescan of the folder."""
    data = tmp_path / "var"
    data.mkdir()
    (data / "postroom.toml").write_text('hostname = "mx.corp.example"\n')
    store = QueueStore(data / "queue")
    write_queue(store, [envelope(f"W{n:011d}", f"u{n}@isp.example", next_attempt=T0 + 3600)
                        for n in range(500)])
    courier = Counting()
    delivered = asyncio.Event()

    async def deliver(env: Envelope, rs: list[Recipient], c: Content) -> list[DeliveryResult]:
        delivered.set()
        return await courier(env, rs, c)

    scheduler = Scheduler(store, deliver, options(), clock=Clock())
    rescans: list[str] = []
    monkeypatch.setattr(scheduler, "rescan", lambda: rescans.append("rescan"))
    monkeypatch.setattr(scheduler, "recover", lambda: rescans.append("recover"))
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    reads = scheduler.envelope_reads
    with ServerLock.acquire(data) as lock:
        control = await serve_control(lock, scheduler.rescan, lambda: False, scheduler.wake)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "postroom", "sendmail", "--data", str(data),
            "-f", "boss@corp.example", "friend@far.example",
            stdin=subprocess.PIPE, env=env,
        )
        await process.communicate(b"Subject: from sendmail\n\nhello\n")
        assert process.returncode == 0
        await delivered.wait()
        await scheduler.idle()
        control.close()
    assert len(courier.calls) == 1 and courier.calls[0] not in scheduler.schedule.entries
    assert rescans == []
    assert scheduler.envelope_reads == reads + 1  # the new message's envelope, once
    scheduler.stop()
    await task


# -- dead destinations -------------------------------------------------------------------


class Sink:
    """Postfix's smtp-sink on `port`, dumping each message into a folder."""

    def __init__(self, program: str, port: int) -> None:
        # Not under pytest's 0700 temp folder: smtp-sink writes as "nobody".
        self.folder = Path(tempfile.mkdtemp(prefix="postroom-sink-"))
        self.folder.chmod(0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen(
            [program, *user, "-d", f"{self.folder}/%M.", f"127.0.0.1:{port}", "100"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:  # wait until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail("smtp-sink did not start")
                time.sleep(0.05)

    def messages(self) -> int:
        return len(list(self.folder.iterdir()))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def sinks(require_peer: Callable[..., str]) -> Iterator[Callable[[int], Sink]]:
    program = require_peer("smtp-sink")
    started: list[Sink] = []

    def start(port: int) -> Sink:
        started.append(Sink(program, port))
        return started[-1]

    yield start
    for sink in started:
        sink.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@async_test
async def test_a_dead_destination_is_probed_once_per_interval_then_all_go(
    tmp_path: Path, sinks: Callable[[int], Sink]
) -> None:
    """Forty messages for a host that refuses connections: once it is found dead, one
    message probes it per interval, whatever the number waiting, and nothing is
    written for the others. When the host answers (a real SMTP server, Postfix's
    smtp-sink), the probe gets through and every waiting message follows."""
    messages = 40
    port = free_port()  # nothing listens there yet: connections are refused
    store = QueueStore(tmp_path / "queue")
    write_queue(store, [envelope(f"M{n:011d}", f"u{n}@down.example") for n in range(messages)])
    router = Router(RouterOptions(routes={"down.example": Route("127.0.0.1", port)}),
                    lambda domain: False)
    courier = RemoteCourier(router, "mx.corp.example", client_tls_context())
    tried: list[str] = []

    async def deliver(env: Envelope, rs: list[Recipient], c: Content) -> list[DeliveryResult]:
        tried.append(env.queue_id)
        return await courier.deliver(env, rs, c)

    clock = Clock()
    interval = 60.0
    scheduler = Scheduler(store, deliver, options(max_per_destination=2,
                                                  probe_interval=interval), clock=clock)
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    # The first attempts (at most the destination's concurrency: the second may
    # start after the first found it dead) find it dead; the rest are deferred
    # without a connection ("delivery temporarily suspended"), and parked once
    # they come due again.
    first = len(tried)
    assert 1 <= first <= 2
    assert scheduler.schedule.is_dead("down.example")
    last = store.load("M00000000039").recipients[0]
    assert last.state == "deferred" and last.last_error is not None
    assert last.last_error.startswith("delivery temporarily suspended: ")
    for probe in range(1, 4):
        clock.now += interval + 1
        scheduler.poke()
        await scheduler.idle()
        assert len(tried) == first + probe  # one probe per interval
    # Every message but the three probes (waiting their own retry) is parked.
    assert scheduler.schedule.counts()["parked"] == messages - 3
    assert store.load("M00000000039").recipients[0].attempts == 1  # parked: not again
    sink = sinks(port)
    clock.now += interval + 1
    scheduler.poke()
    await scheduler.idle()
    assert not scheduler.schedule.is_dead("down.example")
    # Every parked message went at once; the probes wait for their own retry time.
    assert scheduler.schedule.counts()["parked"] == 0
    assert len(store.ids()) <= 3
    clock.now += RETRY[1] * 2
    scheduler.poke()
    await scheduler.idle()
    assert store.ids() == []  # every message delivered and removed
    assert sink.messages() == messages
    scheduler.stop()
    await task
    await courier.close()


@async_test
async def test_parked_mail_past_its_lifetime_still_bounces(tmp_path: Path) -> None:
    """A destination that never comes back cannot keep mail forever: a parked message
    past give_up_after is attempted (untried on the wire) and bounced."""
    store = QueueStore(tmp_path / "queue")
    write_queue(store, [envelope(f"M{n:011d}", f"u{n}@down.example", sender="", tried=True)
                        for n in range(5)])

    async def refused(env: Envelope, rs: list[Recipient], c: Content) -> list[DeliveryResult]:
        return [DeliveryResult(r.address, "temporary", "4.4.1",
                               "connect to 192.0.2.1:25: Connection refused") for r in rs]

    clock = Clock()
    scheduler = Scheduler(store, refused, options(max_per_destination=1), clock=clock)
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    assert scheduler.schedule.counts()["parked"] == 4
    clock.now += 6 * 86400.0
    scheduler.poke()
    await scheduler.idle()
    clock.now += 1  # the expired ones were lined up by the probe: now they go
    scheduler.poke()
    await scheduler.idle()
    assert store.ids() == []  # bounced (mail from <>: dropped, logged)
    scheduler.stop()
    await task


# -- deferrals written in batches ------------------------------------------------------------


def test_update_many_syncs_each_file_then_the_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = QueueStore(tmp_path / "queue")
    ids = [f"AAAA0000000{n}" for n in range(5)]
    write_queue(store, [envelope(q, "a@isp.example") for q in ids])
    recorder = install_recorder(monkeypatch)

    def defer(env: Envelope) -> None:
        env.recipients[0].state = "deferred"
        env.next_attempt = T0 + 60

    changes: list[tuple[str, Callable[[Envelope], object]]] = [(q, defer) for q in ids]
    results = store.update_many([*changes, ("NOSUCH000001", defer)])
    ack = recorder.note("written")
    assert [isinstance(r, Envelope) for r in results] == [True] * 5 + [False]
    assert_durable(recorder.log, ack, published=[store.envelope_path(q) for q in ids])
    assert [c.name for c in recorder.log].count("sync_dir") == 1
    fresh = QueueStore(tmp_path / "queue")  # what a restart reads
    assert all(fresh.load(q).recipients[0].state == "deferred" for q in ids)


@async_test
async def test_concurrent_deferrals_share_their_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attempts that end together are written with one folder sync between them, and
    each result is on disk before the scheduler goes on."""
    store = QueueStore(tmp_path / "queue")
    ids = [f"M{n:011d}" for n in range(30)]
    write_queue(store, [envelope(q, f"u@d{n}.example") for n, q in enumerate(ids)])
    batches: list[int] = []
    real = QueueStore.update_many

    def update_many(self: QueueStore, changes: list[Any]) -> list[Any]:
        batches.append(len(changes))
        return real(self, changes)

    monkeypatch.setattr(QueueStore, "update_many", update_many)
    gate = asyncio.Event()

    async def greylisted(env: Envelope, rs: list[Recipient],
                         c: Content) -> list[DeliveryResult]:
        await gate.wait()
        return [DeliveryResult(r.address, "temporary", "4.7.1", "451 4.7.1 try later",
                               "mx[192.0.2.1]:25") for r in rs]

    scheduler = Scheduler(store, greylisted, options(), clock=Clock())
    task = asyncio.create_task(scheduler.run())
    while scheduler.schedule.active < len(ids):
        await asyncio.sleep(0.01)
    gate.set()
    await scheduler.idle()
    assert sum(batches) == len(ids) and len(batches) < len(ids)
    assert all(store.load(q).recipients[0].state == "deferred" for q in ids)
    scheduler.stop()
    await task


# -- parked entries are not re-read ----------------------------------------------------------


@async_test
async def test_a_probe_wake_up_reads_one_envelope(tmp_path: Path) -> None:
    store = QueueStore(tmp_path / "queue")
    write_queue(store, [envelope(f"M{n:011d}", f"u{n}@down.example", tried=True)
                        for n in range(1000)])

    async def refused(env: Envelope, rs: list[Recipient], c: Content) -> list[DeliveryResult]:
        return [DeliveryResult(r.address, "temporary", "4.4.1", "Connection refused")
                for r in rs]

    clock = Clock()
    scheduler = Scheduler(store, refused, options(max_per_destination=1), clock=clock)
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    reads = scheduler.envelope_reads
    parked = [q for q, e in scheduler.schedule.entries.items() if e.where == PARKED]
    assert len(parked) == 999
    clock.now += RETRY[0] + 1
    scheduler.poke()
    await scheduler.idle()
    assert scheduler.envelope_reads == reads + 1
    scheduler.stop()
    await task


@async_test
async def test_flush_of_a_running_server_writes_nothing_per_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`postroom queue flush` asks the running server, as `postqueue -f` asks Postfix's
    queue manager: every waiting message is tried now, and no envelope is rewritten."""
    from postroom import cli

    data = tmp_path / "var"
    data.mkdir()
    (data / "postroom.toml").write_text('hostname = "mx.corp.example"\n')
    store = QueueStore(data / "queue")
    ids = [f"W{n:011d}" for n in range(50)]
    write_queue(store, [envelope(q, f"u@d{n % 3}.example", next_attempt=T0 + 3600)
                        for n, q in enumerate(ids)])
    rewritten: list[str] = []
    real_update = QueueStore.update
    monkeypatch.setattr(QueueStore, "update", lambda self, queue_id, change: (
        rewritten.append(queue_id), real_update(self, queue_id, change))[1])
    courier = Counting()
    scheduler = Scheduler(store, courier, options(), clock=Clock())
    task = asyncio.create_task(scheduler.run())
    await scheduler.idle()
    assert courier.calls == []
    with ServerLock.acquire(data) as lock:
        control = await serve_control(lock, scheduler.rescan, lambda: False, scheduler.wake)
        code = await asyncio.to_thread(cli.main, ["--data", str(data), "queue", "flush"])
        assert code == 0
        assert capsys.readouterr().out == "flushed 50 messages; told the server " \
            f"(pid {os.getpid()})\n"
        while len(courier.calls) < len(ids):
            await asyncio.sleep(0.01)
        await scheduler.idle()
        control.close()
    assert sorted(courier.calls) == ids and store.ids() == []
    assert rewritten == []
    scheduler.stop()
    await task
