"""The scheduler with a fake courier and clock: due times, limits, notices sent, restarts.

What each result does to a recipient is postroom.queue.rules, tested without
the scheduler in test_queue_rules.py; these tests check that the scheduler
applies those rules at the right times and keeps what it decided on disk.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import functools
import logging
import random
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest

from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.reading import READ_IN_LOOP
from postroom.queue.result import DeliveryResult, Outcome
from postroom.queue.rules import JITTER, Rules
from postroom.queue.scheduler import Scheduler, SchedulerOptions
from postroom.queue.store import QueueStore

RETRY = (60.0, 300.0, 900.0, 3600.0)
GIVE_UP = 5 * 86400.0
T0 = 1_700_000_000.0
MESSAGE = b"From: boss@corp.example\r\nSubject: hi\r\n\r\nhello\r\n"

Decision = tuple[Outcome, str, str]


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return wrapper


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeDeliver:
    """Records calls; answers with `decide(envelope, recipient)`; can be made to wait."""

    def __init__(self, decide: Callable[[Envelope, Recipient], Decision] | None = None) -> None:
        self.decide = decide or (lambda env, r: ("delivered", "2.0.0", "250 2.0.0 Ok"))
        self.calls: list[tuple[str, str, list[str]]] = []  # (queue id, sender, recipients)
        self.gate: asyncio.Event | None = None
        self.active: dict[str, int] = {}
        self.peak: dict[str, int] = {}
        self.peak_total = 0
        self.seen_bytes: list[bytes] = []

    async def __call__(
        self, envelope: Envelope, recipients: list[Recipient], content: Content
    ) -> list[DeliveryResult]:
        domain = recipients[0].address.rpartition("@")[2]
        self.calls.append((envelope.queue_id, envelope.sender, [r.address for r in recipients]))
        with content.reader() as file:
            self.seen_bytes.append(file.read())
        assert len(self.seen_bytes[-1]) == content.size
        self.active[domain] = self.active.get(domain, 0) + 1
        self.peak[domain] = max(self.peak.get(domain, 0), self.active[domain])
        self.peak_total = max(self.peak_total, sum(self.active.values()))
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await asyncio.sleep(0)
        finally:
            self.active[domain] -= 1
        results = []
        for r in recipients:
            outcome, status, text = self.decide(envelope, r)
            remote = None if domain == "corp.example" else f"mx.{domain}[192.0.2.1]:25"
            results.append(DeliveryResult(r.address, outcome, status, text, remote_mta=remote))
        return results

    def recipients_of(self, sender: str | None = None) -> list[str]:
        return [a for _q, s, rs in self.calls if sender is None or s == sender for a in rs]


def options(**kw: Any) -> SchedulerOptions:
    """The test's settings; `delay_warning_after` and `postmaster` go to the rules."""
    rules = Rules(retry_after=RETRY, give_up_after=GIVE_UP,
                  **{k: kw.pop(k) for k in ("delay_warning_after", "postmaster") if k in kw})
    return SchedulerOptions(hostname=kw.pop("hostname", "mx.corp.example"), rules=rules, **kw)


class Harness:
    def __init__(
        self, tmp_path: Path, deliver: FakeDeliver | None = None, **kw: Any
    ) -> None:
        self.tmp_path = tmp_path
        self.store = QueueStore(tmp_path / "queue")
        self.clock = Clock()
        self.deliver = deliver or FakeDeliver()
        self.kw = kw
        self.scheduler = self.make()
        self.task: asyncio.Task[None] | None = None

    def make(self) -> Scheduler:
        return Scheduler(self.store, self.deliver, options(**self.kw), clock=self.clock,
                         rng=random.Random(7))

    def add(self, queue_id: str, *recipients: str | Recipient, **kw: Any) -> Envelope:
        fields: dict[str, Any] = {"sender": "boss@corp.example", "created": self.clock.now}
        fields.update(kw)
        rcpts = [r if isinstance(r, Recipient) else Recipient(r) for r in recipients]
        env = Envelope(queue_id=queue_id, recipients=rcpts, **fields)
        self.store.add(env, [MESSAGE])
        return env

    async def start(self) -> None:
        self.task = asyncio.create_task(self.scheduler.run())
        await self.scheduler.idle()

    async def advance(self, seconds: float) -> None:
        self.clock.now += seconds
        self.scheduler.rescan()
        await self.scheduler.idle()

    async def until_next_attempt(self, queue_id: str) -> None:
        self.clock.now = self.store.load(queue_id).next_attempt
        self.scheduler.rescan()
        await self.scheduler.idle()

    async def stop(self) -> None:
        self.scheduler.stop()
        assert self.task is not None
        await self.task

    def notices(self) -> list[Envelope]:
        return [e for e in self.store.list() if e.sender == ""]


def temporary(env: Envelope, r: Recipient) -> Decision:
    return ("temporary", "4.4.1", "connect to mx: Connection refused")


def permanent_for(*bad: str) -> Callable[[Envelope, Recipient], Decision]:
    def decide(env: Envelope, r: Recipient) -> Decision:
        if r.address in bad:
            return ("permanent", "5.1.1", "550 5.1.1 no such user")
        return ("delivered", "2.0.0", "250 2.0.0 Ok")

    return decide


@async_test
async def test_delivered_message_is_removed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example", "b@isp.example", "c@other.example")
    with caplog.at_level(logging.INFO, logger="postroom.queue"):
        await h.start()
    assert sorted(h.deliver.recipients_of()) == ["a@isp.example", "b@isp.example",
                                                  "c@other.example"]
    # one call per domain, with the domain's recipients together
    assert sorted(len(rs) for _q, _s, rs in h.deliver.calls) == [1, 2]
    assert h.deliver.seen_bytes[0] == MESSAGE
    assert h.store.ids() == []
    assert list((tmp_path / "queue" / "messages").iterdir()) == []
    lines = [r.getMessage() for r in caplog.records]
    assert any(
        line.startswith("MSG000000001: to=<a@isp.example>, relay=mx.isp.example[192.0.2.1]:25, "
                        "delay=0, delays=0/0/0, dsn=2.0.0, status=sent (250 2.0.0 Ok)")
        for line in lines
    ), lines
    assert "MSG000000001: removed" in lines
    await h.stop()


@async_test
async def test_a_deferred_message_is_tried_again_when_due_and_not_before(
    tmp_path: Path,
) -> None:
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.add("MSG000000001", "a@isp.example")
    await h.start()
    for attempt in (1, 2, 3):
        env = h.store.load("MSG000000001")
        assert env.recipients[0].state == "deferred"
        assert env.recipients[0].attempts == attempt
        wait = env.next_attempt - h.clock.now
        interval = RETRY[attempt - 1]  # the rules' interval, jitter included
        assert interval * (1 - JITTER) <= wait <= interval * (1 + JITTER)
        await h.advance(wait * 0.5)  # nothing happens before the time comes ...
        assert len(h.deliver.calls) == attempt
        await h.until_next_attempt("MSG000000001")  # ... and the next attempt when it does
        assert len(h.deliver.calls) == attempt + 1
    await h.stop()


def test_the_scheduler_draws_its_jitter_within_ten_percent(tmp_path: Path) -> None:
    scheduler = Scheduler(QueueStore(tmp_path), FakeDeliver(), options(), rng=random.Random(1))
    for failures, base in [(1, 60.0), (2, 300.0), (4, 3600.0), (9, 3600.0)]:
        delays = [scheduler.retry_delay(failures) for _ in range(500)]
        assert all(base * 0.9 <= d <= base * 1.1 for d in delays)
        assert max(delays) - min(delays) > base * 0.15  # it really varies


@async_test
async def test_give_up_bounces_to_the_sender(tmp_path: Path) -> None:
    def decide(env: Envelope, r: Recipient) -> Decision:
        if env.sender == "":
            return ("delivered", "2.0.0", "delivered to maildir")
        return temporary(env, r)

    h = Harness(tmp_path, FakeDeliver(decide))
    h.add("MSG000000001", "a@isp.example", "b@isp.example")
    await h.start()
    await h.advance(GIVE_UP + 1)
    # the original is gone, and its notice went to the sender from <>
    assert "MSG000000001" not in h.store.ids()
    notice_calls = [c for c in h.deliver.calls if c[1] == ""]
    assert len(notice_calls) == 1
    assert notice_calls[0][2] == ["boss@corp.example"]
    dsn = email.message_from_bytes(h.deliver.seen_bytes[-1])
    assert dsn["Subject"] == "Undelivered Mail Returned to Sender"
    blocks = dsn.get_payload()[1].get_payload()
    assert [(b["Final-Recipient"], b["Action"], b["Status"]) for b in blocks[1:]] == [
        ("rfc822; a@isp.example", "failed", "5.4.7"),
        ("rfc822; b@isp.example", "failed", "5.4.7"),
    ]
    diagnostic = " ".join(blocks[1]["Diagnostic-Code"].split())
    assert diagnostic == (
        "X-Postroom; delivery time expired; last error: connect to mx: Connection refused"
    )
    assert h.store.ids() == []  # the notice was delivered and removed too
    await h.stop()


@pytest.mark.parametrize("postmaster_fails", [False, True])
def test_undeliverable_mail_from_null_goes_to_the_postmaster_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, postmaster_fails: bool
) -> None:
    """A bounce to a sender who does not exist is reported to the postmaster (a
    double bounce, Postfix's 2bounce); if that fails too, it is logged and dropped."""
    bad = ("gone@isp.example", "postmaster@corp.example") if postmaster_fails else (
        "gone@isp.example",)
    h = Harness(tmp_path, FakeDeliver(permanent_for(*bad)), postmaster="postmaster@corp.example")
    h.add("BOUNCE000001", Recipient("gone@isp.example", notify=("NEVER",)), sender="",
          extra={"dsn_for": "MSG000000001"})

    async def scenario() -> None:
        await h.start()
        await h.stop()

    with caplog.at_level(logging.INFO, logger="postroom.queue"):
        asyncio.run(asyncio.wait_for(scenario(), 60))
    assert h.store.ids() == []
    calls = [(sender, rcpts) for _q, sender, rcpts in h.deliver.calls]
    assert calls == [("", ["gone@isp.example"]), ("", ["postmaster@corp.example"])]
    report = email.message_from_bytes(h.deliver.seen_bytes[1], policy=email.policy.default)
    assert report["To"].addresses[0].addr_spec == "postmaster@corp.example"
    assert report["Subject"] == "Postmaster Copy: Undeliverable Mail from <>"
    assert report.get_content_type() == "multipart/report"
    text, status, returned = report.iter_parts()
    assert "comes to the postmaster" in text.get_content()
    assert status.get_content_type() == "message/delivery-status"
    per_message, block = status.get_payload()
    assert per_message["X-Postroom-Queue-ID"] == "BOUNCE000001"
    assert (block["Final-Recipient"], block["Action"], block["Status"]) == (
        "rfc822; gone@isp.example", "failed", "5.1.1")
    assert returned.get_content_type() == "message/rfc822"
    assert returned.get_payload()[0].as_bytes().endswith(b"hello\n")  # the bounce itself
    log = caplog.text
    assert "BOUNCE000001: postmaster non-delivery notification" in log
    dropped = "undeliverable postmaster notice to <postmaster@corp.example> discarded"
    assert (dropped in log) is postmaster_fails


@async_test
async def test_permanent_failure_bounces_only_that_recipient(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeDeliver(permanent_for("bad@isp.example")))
    h.deliver.gate = asyncio.Event()  # hold the notice back to look at it
    h.add("MSG000000001", "good@isp.example", "bad@isp.example", "x@corp.example")
    task = asyncio.create_task(h.scheduler.run())
    while len(h.deliver.calls) < 2:
        await asyncio.sleep(0.01)
    h.deliver.gate.set()
    h.task = task
    await h.scheduler.idle()
    assert h.store.ids() == []
    notices = [c for c in h.deliver.calls if c[1] == ""]
    assert len(notices) == 1
    dsn = email.message_from_bytes(h.deliver.seen_bytes[h.deliver.calls.index(notices[0])])
    finals = [b["Final-Recipient"] for b in dsn.get_payload()[1].get_payload()[1:]]
    assert finals == ["rfc822; bad@isp.example"]
    await h.stop()


@async_test
async def test_per_domain_and_total_limits(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_per_destination=2, max_total=3)
    h.deliver.gate = asyncio.Event()
    for i in range(6):
        h.add(f"MSG00000000{i}", f"u{i}@busy.example")
    h.add("MSG000000009", "v@quiet.example")
    h.task = asyncio.create_task(h.scheduler.run())
    while sum(h.deliver.active.values()) < 3:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    assert h.deliver.active == {"busy.example": 2, "quiet.example": 1}
    h.deliver.gate.set()
    await h.scheduler.idle()
    assert h.deliver.peak["busy.example"] == 2
    assert h.deliver.peak_total == 3
    assert len(h.deliver.calls) == 7
    assert h.store.ids() == []
    await h.stop()


@async_test
async def test_restart_picks_up_everything(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example")
    h.add("MSG000000002", Recipient("done@isp.example", state="delivered"),
          Recipient("todo@isp.example", state="deferred", attempts=2))
    h.add("MSG000000003", "later@isp.example", next_attempt=T0 + 1000)
    await h.start()
    assert sorted(h.deliver.recipients_of()) == ["a@isp.example", "todo@isp.example"]
    assert h.store.ids() == ["MSG000000003"]
    await h.advance(1000)
    assert h.store.ids() == []
    await h.stop()


@async_test
async def test_a_crash_redelivers_only_what_was_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_total=1)
    h.add("MSG000000001", "a@one.example", "b@two.example")
    blocked = asyncio.Event()

    async def deliver(env: Envelope, rs: list[Recipient], content: Content) -> list[DeliveryResult]:
        if rs[0].address == "b@two.example":
            blocked.set()
            await asyncio.Event().wait()  # hangs until the "crash"
        return [DeliveryResult(r.address, "delivered", "2.0.0", "250 ok") for r in rs]

    h.scheduler = Scheduler(h.store, deliver, options(max_total=1), clock=h.clock)
    task = asyncio.create_task(h.scheduler.run())
    await blocked.wait()
    # The first domain's result is on disk before the second delivery started.
    states = {r.address: r.state for r in h.store.load("MSG000000001").recipients}
    assert states == {"a@one.example": "delivered", "b@two.example": "pending"}
    task.cancel()  # kill: nothing after this point is written
    with pytest.raises(asyncio.CancelledError):
        await task
    h2 = Harness(tmp_path)
    await h2.start()
    assert h2.deliver.recipients_of() == ["b@two.example"]
    assert h2.store.ids() == []
    await h2.stop()


@async_test
async def test_held_messages_wait_until_released(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example", held=True)
    await h.start()
    h.scheduler.wake()  # a flush does not release
    await h.scheduler.idle()
    assert h.deliver.calls == []
    h.store.update("MSG000000001", lambda e: setattr(e, "held", False))  # `queue release`
    h.scheduler.rescan()
    await h.scheduler.idle()
    assert h.deliver.recipients_of() == ["a@isp.example"]
    await h.stop()


@async_test
async def test_hold_during_delivery_is_kept(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.deliver.gate = asyncio.Event()
    h.add("MSG000000001", "a@isp.example")
    h.task = asyncio.create_task(h.scheduler.run())
    while not h.deliver.calls:
        await asyncio.sleep(0.01)
    h.store.update("MSG000000001", lambda e: setattr(e, "held", True))
    h.deliver.gate.set()
    await h.scheduler.idle()
    env = h.store.load("MSG000000001")
    assert env.held and env.recipients[0].state == "deferred"
    await h.until_next_attempt("MSG000000001")
    assert len(h.deliver.calls) == 1
    await h.stop()


@async_test
async def test_wake_and_flush(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.add("MSG000000001", "a@isp.example")
    h.add("MSG000000002", "b@isp.example")
    await h.start()
    assert len(h.deliver.calls) == 2
    h.scheduler.wake("MSG000000001")  # one message now
    await h.scheduler.idle()
    assert [c[0] for c in h.deliver.calls[2:]] == ["MSG000000001"]
    h.scheduler.wake()  # every message now
    await h.scheduler.idle()
    assert sorted(c[0] for c in h.deliver.calls[3:]) == ["MSG000000001", "MSG000000002"]
    # a new message added behind the scheduler's back, then woken by its ID
    h.add("MSG000000003", "c@isp.example")
    h.scheduler.wake("MSG000000003")
    await h.scheduler.idle()
    assert h.deliver.calls[-1][0] == "MSG000000003"
    # the CLI's flush: next_attempt = 0 on disk, then a rescan
    h.store.update("MSG000000002", lambda e: setattr(e, "next_attempt", 0.0))
    h.scheduler.rescan()
    await h.scheduler.idle()
    assert h.deliver.calls[-1][0] == "MSG000000002"
    # unknown or malformed IDs are ignored, and the scheduler keeps running
    calls = len(h.deliver.calls)
    h.scheduler.wake("NOSUCHID0001")
    h.scheduler.wake("../../etc/passwd")
    await h.scheduler.idle()
    assert len(h.deliver.calls) == calls and h.task is not None and not h.task.done()
    await h.stop()


@async_test
async def test_woken_messages_are_read_once_and_removed_together(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of new messages: each envelope is read from disk once (the wake reads
    it; the attempt uses that copy), and the finished ones leave the queue in
    batches, each batch with one sync of the queue folder."""
    batches: list[list[str]] = []
    real_remove_many = QueueStore.remove_many

    def remove_many(
        store: QueueStore, ids: list[str], *, reuse: bool = False
    ) -> list[BaseException | None]:
        batches.append(list(ids))
        assert reuse  # its own finished deliveries: the files are kept for reuse
        return real_remove_many(store, ids, reuse=reuse)

    monkeypatch.setattr(QueueStore, "remove_many", remove_many)
    h = Harness(tmp_path)
    await h.start()
    loads: list[str] = []
    real_load = h.store.load
    monkeypatch.setattr(h.store, "load", lambda qid: (loads.append(qid), real_load(qid))[1])
    ids = [f"MSG00000010{n}" for n in range(6)]
    for queue_id in ids:
        h.add(queue_id, "a@isp.example")
        h.scheduler.wake(queue_id)
    await h.scheduler.idle()
    assert sorted(loads) == ids
    assert sorted(qid for batch in batches for qid in batch) == ids
    assert h.store.ids() == []
    assert len(list(h.store.spares.folder.iterdir())) == len(ids)
    await h.stop()


@async_test
async def test_a_few_envelopes_are_read_in_the_loop_a_burst_in_the_reading_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = Harness(tmp_path)
    await h.start()
    readers: dict[str, int] = {}
    real_load = h.store.load

    def load(queue_id: str) -> Envelope:
        readers[queue_id] = threading.get_ident()
        return real_load(queue_id)

    monkeypatch.setattr(h.store, "load", load)
    few = [f"FEW00000000{n}" for n in range(READ_IN_LOOP)]
    burst = [f"BURST000000{n:02d}" for n in range(READ_IN_LOOP + 1)]
    for group in (few, burst):
        for queue_id in group:
            h.add(queue_id, "a@isp.example")
            h.scheduler.wake(queue_id)
        await h.scheduler.idle()
    loop_thread = threading.get_ident()
    assert {readers[q] for q in few} == {loop_thread}
    assert len({readers[q] for q in burst}) == 1 and readers[burst[0]] != loop_thread
    assert len(h.deliver.calls) == len(few) + len(burst)
    await h.stop()


@async_test
async def test_a_retry_reads_its_envelope_again_in_the_reading_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message waiting for its retry may be long out of the page cache: its
    envelope is read again off the event loop."""
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.add("MSG000000001", "a@isp.example")
    await h.start()
    readers: list[int] = []
    real_load = h.store.load

    def load(queue_id: str) -> Envelope:
        readers.append(threading.get_ident())
        return real_load(queue_id)

    monkeypatch.setattr(h.store, "load", load)
    h.clock.now = real_load("MSG000000001").next_attempt
    h.scheduler.rescan()
    await h.scheduler.idle()
    assert len(h.deliver.calls) == 2
    assert readers and threading.get_ident() not in readers
    await h.stop()


@async_test
async def test_wake_with_the_envelope_reads_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A session of the scheduler's own process hands over the envelope it queued:
    the attempt uses it, and nothing is read back from disk."""
    h = Harness(tmp_path)
    await h.start()
    loads: list[str] = []
    real_load = h.store.load
    monkeypatch.setattr(h.store, "load", lambda qid: (loads.append(qid), real_load(qid))[1])
    env = h.add("MSG000000200", "a@isp.example")
    h.scheduler.wake(env.queue_id, envelope=env)
    await h.scheduler.idle()
    assert loads == []
    assert h.deliver.recipients_of() == ["a@isp.example"]
    assert h.store.ids() == []
    await h.stop()


@async_test
async def test_rescan_drops_deleted_messages(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.add("MSG000000001", "a@isp.example")
    await h.start()
    h.store.remove("MSG000000001")  # `queue delete`
    await h.advance(10 * RETRY[-1])
    assert len(h.deliver.calls) == 1
    assert h.scheduler.envelopes() == []
    await h.stop()


@async_test
async def test_delete_during_delivery_does_not_resurrect(tmp_path: Path) -> None:
    h = Harness(tmp_path, FakeDeliver(temporary))
    h.deliver.gate = asyncio.Event()
    h.add("MSG000000001", "a@isp.example")
    h.task = asyncio.create_task(h.scheduler.run())
    while not h.deliver.calls:
        await asyncio.sleep(0.01)
    h.store.remove("MSG000000001")
    h.deliver.gate.set()
    await h.scheduler.idle()
    assert h.store.ids() == []
    assert list((tmp_path / "queue" / "messages").iterdir()) == []
    await h.stop()


@async_test
async def test_courier_exception_defers(tmp_path: Path) -> None:
    async def broken(env: Envelope, rs: list[Recipient], content: Content) -> list[DeliveryResult]:
        raise RuntimeError("boom")

    h = Harness(tmp_path)
    h.scheduler = Scheduler(h.store, broken, options(), clock=h.clock)
    h.add("MSG000000001", "a@isp.example")
    await h.start()
    r = h.store.load("MSG000000001").recipients[0]
    assert (r.state, r.dsn_status, r.last_error) == ("deferred", "4.3.0", "internal error: boom")
    await h.stop()


@async_test
async def test_a_delay_notice_is_sent_once(tmp_path: Path) -> None:
    def decide(env: Envelope, r: Recipient) -> Decision:
        if env.sender == "":
            return ("delivered", "2.0.0", "ok")
        return temporary(env, r)

    h = Harness(tmp_path, FakeDeliver(decide), delay_warning_after=4 * 3600.0)
    h.add("MSG000000001", "a@isp.example")
    await h.start()
    assert h.deliver.recipients_of("") == []  # too early for a warning
    await h.advance(5 * 3600)
    assert h.deliver.recipients_of("") == ["boss@corp.example"]
    dsn = email.message_from_bytes(h.deliver.seen_bytes[-1])
    assert dsn["Subject"] == "Delayed Mail (still being retried)"
    [block] = dsn.get_payload()[1].get_payload()[1:]
    assert (block["Final-Recipient"], block["Action"]) == ("rfc822; a@isp.example", "delayed")
    assert block["Will-Retry-Until"] is not None
    assert h.store.load("MSG000000001").warned
    await h.until_next_attempt("MSG000000001")
    assert h.deliver.recipients_of("") == ["boss@corp.example"]  # only once
    await h.stop()


@async_test
async def test_success_notices_are_sent(tmp_path: Path) -> None:
    async def deliver(
        env: Envelope, rs: list[Recipient], content: Content
    ) -> list[DeliveryResult]:
        with content.reader() as file:
            seen.append((env.sender, file.read()))
        return [
            DeliveryResult(r.address, "delivered", "2.0.0", "250 ok",
                           "mx.isp.example[192.0.2.1]:25", relayed_without_dsn=True)
            if r.address.endswith("isp.example")  # a next hop without DSN support
            else DeliveryResult(r.address, "delivered", "2.0.0", "delivered")  # local
            for r in rs
        ]

    seen: list[tuple[str, bytes]] = []
    h = Harness(tmp_path)
    h.scheduler = Scheduler(h.store, deliver, options(), clock=h.clock)
    success = ("SUCCESS",)
    h.add("MSG000000001", Recipient("relayed@isp.example", notify=success),
          Recipient("local@corp.example", notify=success, orcpt="rfc822;old@corp.example"))
    await h.start()
    notices = [email.message_from_bytes(data) for sender, data in seen if sender == ""]
    actions = sorted(
        (b["Action"], b["Final-Recipient"], b["Original-Recipient"])
        for n in notices for b in n.get_payload()[1].get_payload()[1:]
    )
    assert actions == [("delivered", "rfc822; local@corp.example", "rfc822; old@corp.example"),
                       ("relayed", "rfc822; relayed@isp.example", None)]
    assert h.store.ids() == []
    await h.stop()


@async_test
async def test_stop_finishes_deliveries_in_flight(tmp_path: Path) -> None:
    h = Harness(tmp_path, max_total=1)
    h.deliver.gate = asyncio.Event()
    h.add("MSG000000001", "a@one.example")
    h.add("MSG000000002", "b@two.example")
    h.task = asyncio.create_task(h.scheduler.run())
    while not h.deliver.calls:
        await asyncio.sleep(0.01)
    h.scheduler.stop()
    await asyncio.sleep(0.05)
    assert not h.task.done()  # waits for the delivery in flight
    h.deliver.gate.set()
    await h.task
    assert len(h.deliver.calls) == 1  # the second never started
    assert len(h.store.ids()) == 1
    remaining = h.store.list()[0]
    assert remaining.recipients[0].attempts == 0 and remaining.next_attempt == 0.0


@async_test
async def test_notice_owed_at_a_crash_is_sent_on_restart(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", Recipient("bad@isp.example", state="bounced", dsn_status="5.1.1",
                                    last_error="550 5.1.1 no such user"),
          extra={"dsn_owed": {"bad@isp.example": "failed"}})
    await h.start()
    assert h.deliver.recipients_of("") == ["boss@corp.example"]
    assert h.store.ids() == []
    await h.stop()


@async_test
async def test_corrupt_envelope_does_not_stop_the_rest(tmp_path: Path) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example")
    (tmp_path / "queue" / "messages" / "BAD000000001").write_bytes(b"x")
    (tmp_path / "queue" / "envelopes" / "BAD000000001.json").write_bytes(b"{broken")
    await h.start()
    assert h.deliver.recipients_of() == ["a@isp.example"]
    assert h.store.ids() == ["BAD000000001"]  # left for a person to look at
    await h.stop()


@async_test
async def test_a_message_that_cannot_be_read_is_deferred_untried(tmp_path: Path) -> None:
    """The queue opens the message for the courier: a queue file that lost its
    envelope line is never handed over, and the message waits (4.3.0)."""
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example")
    h.store.update("MSG000000001", lambda e: None)  # the envelope file keeps it listed
    h.store.message_path("MSG000000001").write_bytes(MESSAGE)  # no envelope line
    await h.start()
    assert h.deliver.calls == []
    r = h.store.load("MSG000000001").recipients[0]
    assert (r.state, r.dsn_status) == ("deferred", "4.3.0")
    assert r.last_error is not None and "cannot read the queued message" in r.last_error
    await h.stop()


@async_test
async def test_a_message_gone_before_its_delivery_is_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = Harness(tmp_path)
    h.add("MSG000000001", "a@isp.example")
    real_open = h.store.open_content

    def open_content(queue_id: str) -> Content:
        h.store.remove(queue_id)  # `postroom queue delete` just before the open
        return real_open(queue_id)

    monkeypatch.setattr(h.store, "open_content", open_content)
    with caplog.at_level(logging.INFO, logger="postroom.queue"):
        await h.start()
    assert h.deliver.calls == []
    assert h.scheduler.envelopes() == [] and h.store.ids() == []
    assert "MSG000000001: removed from the queue during delivery" in caplog.text
    await h.stop()


@async_test
async def test_delay_notices_and_bounces_go_through_the_signer(tmp_path: Path) -> None:
    def sign(message: bytes) -> bytes:  # as postroom.mailauth.sign.Signer.sign does
        return b"DKIM-Signature: v=1; d=corp.example\r\n" + message

    def decide(env: Envelope, r: Recipient) -> Decision:
        if env.sender == "":
            return ("delivered", "2.0.0", "ok")
        return temporary(env, r) if r.address == "slow@isp.example" else (
            "permanent", "5.1.1", "no such user")

    h = Harness(tmp_path, FakeDeliver(decide), delay_warning_after=4 * 3600.0, sign_notice=sign)
    h.add("MSG000000001", "slow@isp.example", "gone@isp.example")
    await h.start()
    await h.advance(5 * 3600)
    subjects = []
    for raw in h.deliver.seen_bytes:
        if b"multipart/report" in raw:
            assert raw.startswith(b"DKIM-Signature: v=1; d=corp.example\r\nFrom: MAILER-DAEMON")
            subjects.append(email.message_from_bytes(raw)["Subject"])
    assert sorted(subjects) == ["Delayed Mail (still being retried)",
                                "Undelivered Mail Returned to Sender"]
    await h.stop()
