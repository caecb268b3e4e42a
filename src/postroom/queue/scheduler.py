"""The queue's clock: decides when each queued message is tried, and records what each try did.

The scheduler owns time (couriers never sleep or retry). It keeps every
envelope of the queue folder in memory, starts the ones that are due, and
for each attempt groups the recipients still pending by domain and calls the
injected `deliver` once per domain, with the message open for reading
(postroom.queue.content), within two limits: `max_per_destination`
concurrent deliveries per domain and `max_total` overall. What a result does
to a recipient, when the message is tried again and which notices it owes
are the rules of postroom.queue.rules.

Each result is written to disk (the queue's envelope file) before anything else happens
(one write per `deliver` call, which returns all of a domain's results at
once). Notices owed are recorded in the same write (envelope.extra
"dsn_owed") and queued at the end of the attempt, then cleared: a crash in
between sends a notice twice, never zero times. When every recipient is
final the message is removed. After a crash (kill -9) a restart finds every
envelope on disk again; only the recipients that were in the middle of a
`deliver` call are tried again (at least once, never lost).

Every result is logged in Postfix's shape (`_log_result`), so grep finds a
message's whole life; `QUEUEID: removed` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from postroom.batch import BatchThread
from postroom.gathering import gather_few
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.notices import Notices
from postroom.queue.reading import EnvelopeReader
from postroom.queue.result import DeliveryResult
from postroom.queue.rules import (
    JITTER,
    OWED,
    Rules,
    judge,
    match_results,
    next_attempt,
    retry_delay,
)
from postroom.queue.store import CorruptEnvelope, NotQueued, QueueStore

log = logging.getLogger("postroom.queue")

Deliver = Callable[[Envelope, list[Recipient], Content], Awaitable[list[DeliveryResult]]]

RESCAN_INTERVAL = 30.0  # seconds: `postroom queue` and sendmail change the folder meanwhile
# Seconds the removing thread gathers finished messages before it removes them;
# a crash meanwhile delivers them again, as for any delivery in flight.
REMOVE_LINGER = 0.01
# RFC 3463 X.3.0: the queued message cannot be read now, or the courier failed.
SYSTEM_FAULT = "4.3.0"
# The envelope fields the scheduler writes; the others (`held`) are the command line's.
_SCHEDULER_FIELDS = ("recipients", "next_attempt", "warned", "extra")


@dataclass(frozen=True)
class SchedulerOptions:
    """The scheduler's settings (from the config's [queue] and hostname)."""

    hostname: str  # names this host in the notices it sends (Reporting-MTA, From)
    rules: Rules = field(default_factory=Rules)
    max_per_destination: int = 10  # concurrent deliveries to one domain
    max_total: int = 100  # concurrent deliveries in all
    # Adds DKIM signatures to a notice we send (postroom.mailauth.sign.Signer.sign).
    sign_notice: Callable[[bytes], bytes] | None = None


@dataclass(frozen=True)
class Timing:
    """When one delivery began and ended, and when its attempt started (clock values)."""

    started: float  # the attempt of the whole message
    begun: float  # this delivery, once it had its slot
    ended: float


@dataclass
class _Slot:
    """The concurrency limit of one destination domain, while anyone uses it."""

    semaphore: asyncio.Semaphore
    users: int = 0


@dataclass
class _Attempt:
    """Bookkeeping of one attempt of one envelope."""

    started: float  # clock() when the attempt began
    ran: int = 0  # deliver calls that actually happened (stop() may skip some)
    gone: bool = False  # the message was deleted behind our back
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class Scheduler:
    """Runs deliveries of the queued messages at the right times (see the module docstring).

    All methods except `run` are plain functions to be called from the
    event loop's thread (a signal handler installed with
    loop.add_signal_handler qualifies).
    """

    def __init__(
        self,
        store: QueueStore,
        deliver: Deliver,
        options: SchedulerOptions,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        if options.max_per_destination < 1 or options.max_total < 1:
            raise ValueError("delivery limits must be at least 1")
        self.store = store
        self._deliver = deliver
        self._rules = options.rules
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._max_per_destination = options.max_per_destination
        self._total = asyncio.Semaphore(options.max_total)
        self._view = EnvelopeReader(store)
        self._envelopes = self._view.envelopes  # the scheduler's copy of the queue
        self._in_flight = self._view.in_flight  # IDs of the attempts running
        self._notices = Notices(store, options.hostname, options.rules, self._adopt_notice,
                                sign=options.sign_notice)
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: dict[str, _Slot] = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._wake_ids: set[str] = set()
        # Finished messages are removed in batches, one sync of the folder for
        # many, their files kept for reuse: the scheduler alone reads a message
        # to deliver it, and removes one only when its deliveries are over.
        # Nothing waits on a removal but its log line, so the thread gathers
        # them for REMOVE_LINGER (see BatchThread).
        self._remover: BatchThread[str, None] = BatchThread(
            "postroom-queue-remove", functools.partial(self.store.remove_many, reuse=True),
            linger=REMOVE_LINGER,
        )
        self._flush_all = False
        self._rescan_requested = False
        self._stopping = False

    # -- control ---------------------------------------------------------------

    def wake(self, queue_id: str | None = None, *, envelope: Envelope | None = None) -> None:
        """Try `queue_id` now (a message just queued, or flushed); no ID: try every message now.

        `envelope`: the one just written for `queue_id` in this process, taken as
        it is instead of read back from disk. Held messages stay held.
        """
        if queue_id is None:
            self._flush_all = True
        elif envelope is not None and queue_id not in self._in_flight:
            envelope.next_attempt = 0.0
            self._view.take(envelope)
        else:
            self._wake_ids.add(queue_id)
        self._poke()

    def rescan(self) -> None:
        """Re-read the queue folder soon (it also happens every RESCAN_INTERVAL seconds)."""
        self._rescan_requested = True
        self._poke()

    def stop(self) -> None:
        """Start no more deliveries; `run` returns once those in flight have finished."""
        self._stopping = True
        self._wakeup.set()

    async def idle(self) -> None:
        """Wait until everything due has been tried and nothing is in flight (for tests)."""
        await self._idle.wait()

    def envelopes(self) -> list[Envelope]:
        """The scheduler's current view of the queue (copies are not made: do not change)."""
        return list(self._envelopes.values())

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt, jitter included."""
        return retry_delay(failures, self._rules, self._jitter())

    def _jitter(self) -> float:
        return self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _poke(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    def _adopt_notice(self, notice: Envelope) -> None:
        """A notice just queued: deliver it like any new message."""
        self._envelopes[notice.queue_id] = notice
        self._poke()

    # -- the main loop ---------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stop(): recover the folder, load it, then start what is due."""
        loop = asyncio.get_running_loop()
        removed = await asyncio.to_thread(self.store.recover)
        if removed:
            log.warning("queue: recovery removed %d leftover file(s)", removed)
        await self._view.load_all()
        next_rescan = loop.time() + RESCAN_INTERVAL
        log.info("queue: started with %d message(s)", len(self._envelopes))
        try:
            try:
                await self._loop(loop, next_rescan)
            except asyncio.CancelledError:
                for task in self._tasks:
                    task.cancel()
                raise
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._remover.close()
            self._view.close()
        self._idle.set()

    async def _loop(self, loop: asyncio.AbstractEventLoop, next_rescan: float) -> None:
        while not self._stopping:
            self._wakeup.clear()
            if self._rescan_requested or loop.time() >= next_rescan:
                self._rescan_requested = False
                await self._view.load_all()
                next_rescan = loop.time() + RESCAN_INTERVAL
            if self._wake_ids:
                ids, self._wake_ids = self._wake_ids, set()
                await self._view.load_ids(ids)
            if self._flush_all:
                self._flush_all = False
                for envelope in self._envelopes.values():
                    envelope.next_attempt = 0.0
            now = self._clock()
            next_due = self._start_due(now)
            if not self._tasks and not self._wakeup.is_set():
                self._idle.set()
            timeout = max(0.0, min(next_due - now, next_rescan - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _start_due(self, now: float) -> float:
        """Start every due envelope; return when the next waiting one is due."""
        next_due = float("inf")
        for queue_id, envelope in list(self._envelopes.items()):
            if queue_id in self._in_flight or envelope.held:
                continue
            if envelope.next_attempt <= now:
                self._in_flight.add(queue_id)
                task = asyncio.create_task(self._attempt(queue_id), name=f"queue {queue_id}")
                self._tasks.add(task)
                task.add_done_callback(functools.partial(self._finished, queue_id=queue_id))
            else:
                next_due = min(next_due, envelope.next_attempt)
        return next_due

    def _finished(self, task: asyncio.Task[None], *, queue_id: str) -> None:
        self._tasks.discard(task)
        self._in_flight.discard(queue_id)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: attempt failed", queue_id, exc_info=task.exception())
            envelope = self._envelopes.get(queue_id)
            if envelope is not None:  # never spin on a message that breaks us
                envelope.next_attempt = self._clock() + self.retry_delay(1)
        self._wakeup.set()

    # -- one attempt of one envelope -----------------------------------------------

    async def _attempt(self, queue_id: str) -> None:
        envelope = await self._view.for_attempt(queue_id)
        if envelope is None or envelope.held:
            return
        attempt = _Attempt(started=self._clock())
        if not envelope.done:
            groups: dict[str, list[Recipient]] = {}
            for recipient in envelope.pending():
                groups.setdefault(_domain(recipient.address), []).append(recipient)
            await gather_few(
                [self._deliver_group(envelope, d, rs, attempt) for d, rs in groups.items()]
            )
            if attempt.gone:
                self._envelopes.pop(queue_id, None)
                log.info("%s: removed from the queue during delivery", queue_id)
                return
            if not attempt.ran:
                return  # stopping: nothing was tried, nothing changes
        await self._conclude(envelope)

    async def _deliver_group(
        self, envelope: Envelope, domain: str, recipients: list[Recipient], attempt: _Attempt
    ) -> None:
        slot = self._slots.get(domain)
        if slot is None:
            slot = self._slots[domain] = _Slot(asyncio.Semaphore(self._max_per_destination))
        slot.users += 1
        try:
            async with slot.semaphore, self._total:
                if self._stopping or attempt.gone:
                    return
                attempt.ran += 1
                begun = self._clock()
                for recipient in recipients:
                    recipient.attempts += 1
                results = await self._try(envelope, domain, recipients)
                if results is None:
                    attempt.gone = True
                    return
                timing = Timing(attempt.started, begun, self._clock())
                # The slot is given up only once the results are on disk: nothing moves
                # on (not even another delivery) before what happened is durable.
                async with attempt.lock:
                    self._record(envelope, recipients, results, timing)
                    if not (envelope.done and not envelope.extra.get(OWED)):
                        await self._persist(envelope, attempt)
                    # else: every recipient is delivered or bounced with nothing owed,
                    # and _conclude removes the message next. Writing the final state
                    # first would only cost syncs: a crash in between redelivers, which
                    # at-least-once delivery allows for what was in flight.
        finally:
            slot.users -= 1
            if slot.users == 0:
                del self._slots[domain]

    async def _try(
        self, envelope: Envelope, domain: str, recipients: list[Recipient]
    ) -> list[DeliveryResult] | None:
        """One `deliver` call with the message open; None when the message is gone.

        What goes wrong around the courier (the message cannot be read, the
        courier raises) is a temporary result for every recipient: the
        message stays queued.
        """
        try:
            content = self.store.open_content(envelope.queue_id)
        except NotQueued:
            return None
        except (CorruptEnvelope, OSError) as e:
            text = f"cannot read the queued message: {getattr(e, 'strerror', None) or e}"
        else:
            try:
                with content:
                    return await self._deliver(envelope, list(recipients), content)
            except Exception as e:  # a courier bug must not lose the message
                log.exception("%s: delivery to %s failed", envelope.queue_id, domain)
                text = f"internal error: {e}"
        return [DeliveryResult(r.address, "temporary", SYSTEM_FAULT, text) for r in recipients]

    def _record(
        self, envelope: Envelope, recipients: list[Recipient],
        results: list[DeliveryResult], timing: Timing,
    ) -> None:
        """Apply the rules to the results of one deliver call, and log each."""
        matched, unmatched = match_results(recipients, results)
        for recipient, result in zip(recipients, matched, strict=True):
            verdict = judge(envelope, recipient, result, timing.ended, self._rules)
            verdict.record(envelope, recipient, timing.ended)
            if verdict.dropped is not None:
                log.warning("%s: undeliverable %s to <%s> discarded", envelope.queue_id,
                            verdict.dropped, recipient.address)
            _log_result(envelope, recipient, verdict.word, timing)
        for extra in unmatched:
            log.warning("%s: result for unknown recipient <%s> ignored",
                        envelope.queue_id, extra.recipient)

    async def _conclude(self, envelope: Envelope) -> None:
        """After an attempt: schedule the next one, send notices owed, remove when done."""
        now = self._clock()
        if not envelope.done:
            envelope.next_attempt = next_attempt(envelope, now, self._rules, self._jitter())
            await self._notices.warn_if_due(envelope, now)
        sent = await self._notices.send_owed(envelope, now)
        if envelope.done:
            if sent:
                try:
                    await self._remover.submit(envelope.queue_id)
                except NotQueued:
                    pass
                except OSError as e:
                    log.error("%s: cannot remove the finished message: %s", envelope.queue_id, e)
                    envelope.next_attempt = now + self.retry_delay(1)
                    return
                self._envelopes.pop(envelope.queue_id, None)
                log.info("%s: removed", envelope.queue_id)
                return
            # A notice could not be queued (disk trouble): keep the message, try again later.
            envelope.next_attempt = now + self.retry_delay(1)
        await self._persist(envelope, None)

    async def _persist(self, envelope: Envelope, attempt: _Attempt | None) -> None:
        """Write the scheduler's part of the envelope; the command line's `held` is kept."""
        snapshot = Envelope.from_json(envelope.to_json())

        def merge(on_disk: Envelope) -> None:
            for name in _SCHEDULER_FIELDS:
                setattr(on_disk, name, getattr(snapshot, name))

        try:
            stored = await asyncio.to_thread(self.store.update, envelope.queue_id, merge)
        except NotQueued:
            if attempt is not None:
                attempt.gone = True
            else:
                self._envelopes.pop(envelope.queue_id, None)
            return
        except (CorruptEnvelope, OSError) as e:
            # Memory stays ahead of the disk; the next write tries again.
            log.error("%s: cannot save the envelope: %s", envelope.queue_id, e)
            return
        envelope.held = stored.held


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()


def _log_result(envelope: Envelope, recipient: Recipient, word: str, timing: Timing) -> None:
    """Log what the attempt did to `recipient` (its state as just recorded), as Postfix does:

        QUEUEID: to=<x>, orig_to=<y>, relay=host[ip]:port, delay=12, delays=a/b/c,
        dsn=4.4.1, status=deferred (text)

    delay is the time since arrival; delays splits this attempt into the time
    queued before it / waiting for a delivery slot / the delivery itself. No
    remote MTA: relay=local when delivered here, relay=none when no host answered.
    """
    orig = ""
    if recipient.orcpt:
        original = (recipient.orcpt.partition(";")[2] or recipient.orcpt).strip()
        if original != recipient.address:
            orig = f", orig_to=<{original}>"
    delays = "/".join(
        _seconds(x) for x in (timing.started - envelope.created, timing.begun - timing.started,
                              timing.ended - timing.begun)
    )
    log.info(
        "%s: to=<%s>%s, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
        envelope.queue_id, recipient.address, orig,
        recipient.remote_mta or ("local" if recipient.state == "delivered" else "none"),
        _seconds(timing.ended - envelope.created), delays, recipient.dsn_status, word,
        " ".join((recipient.last_error or "").split()),
    )


def _seconds(value: float) -> str:
    """A duration as Postfix logs it: two decimals at most, whole seconds from 100 on."""
    value = max(0.0, value)
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"
