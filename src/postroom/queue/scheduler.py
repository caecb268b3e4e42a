"""The queue's clock: decides when each queued message is tried, and records what each try did.

The scheduler owns time (couriers never sleep or retry). Its cost follows the
work that is due, not the work that waits: it keeps a small entry per queued
message ordered by next attempt (postroom.queue.schedule: no envelope in
memory), wakes when the earliest is due, and reads a message's envelope
only when its attempt starts. New messages reach it by notification: a
session of this process hands over its envelope (`wake(id, envelope=)`),
worker processes, `postroom sendmail` and `postroom queue` send their queue
IDs (`wake(id)`). The folder is read whole only to load the schedule, in the
background after a start (the server takes mail meanwhile), on an
operator's `rescan`, and, to recover a notification lost, its names are
compared with the schedule every RECOVERY_INTERVAL seconds.

For each attempt it groups the recipients still pending by domain and calls
the injected `deliver` once per domain, with the message open for reading
(postroom.queue.content), within two limits: `max_per_destination`
concurrent attempts per domain and `max_total` overall. A domain where no
host answered is dead for a while: its messages wait without attempts and
one probes it per interval (postroom.queue.schedule). What a result does to a
recipient, when the message is tried again and which notices it owes are the
rules of postroom.queue.rules.

Each result is written to disk (the queue's envelope file) before anything
else happens (one write per `deliver` call, which returns all of a domain's
results at once; writes of concurrent attempts share one folder sync,
QueueStore.update_many). Notices owed are recorded in the same write
(envelope.extra "dsn_owed") and queued at the end of the attempt, then
cleared: a crash in between sends a notice twice, never zero times. When
every recipient is final the message is removed. After a crash (kill -9) a
restart finds every envelope on disk again; only the recipients that were in
the middle of a `deliver` call are tried again (at least once, never lost).

Every result is logged in Postfix's shape (postroom.queue.logline), so grep finds a
message's whole life; `QUEUEID: removed` ends it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from postroom.batch import BatchThread
from postroom.gathering import gather_few
from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.loading import load_schedule, recover_schedule
from postroom.queue.logline import Timing, log_result
from postroom.queue.notices import Notices
from postroom.queue.reading import EnvelopeReader, entry_of
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
from postroom.queue.schedule import ACTIVE, Entry, Schedule
from postroom.queue.store import CorruptEnvelope, NotQueued, QueueStore, check_queue_id

log = logging.getLogger("postroom.queue")

Deliver = Callable[[Envelope, list[Recipient], Content], Awaitable[list[DeliveryResult]]]

# Seconds between two comparisons of the folder's names with the schedule, which
# find what a lost notification left out (a process killed between queuing a
# message and telling us); Postfix's queue manager scans its incoming queue
# every queue_run_delay (300 s) for the same reason.
RECOVERY_INTERVAL = 300.0
# Seconds: the scheduler's timer resolution (Postfix's queue manager counts whole
# seconds too). Messages due within one tick are taken in one wake-up, so a
# queue whose retries come due a few milliseconds apart does not wake the
# process for each.
TICK = 1.0
# RFC 3463 X.4.1: no answer from the destination's hosts; what a delivery to a
# dead destination is deferred with, untried (Postfix: "delivery temporarily
# suspended").
SUSPENDED_STATUS = "4.4.1"
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
    # Seconds a domain whose hosts did not answer stays dead before the next probe;
    # None: the first retry interval (Postfix waits minimal_backoff_time).
    probe_interval: float | None = None
    # Adds DKIM signatures to a notice we send (postroom.mailauth.sign.Signer.sign).
    sign_notice: Callable[[bytes], bytes] | None = None


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
    groups: int = 0  # domains whose results are not recorded yet
    rescheduled: bool = False  # next_attempt was set with the last group's results
    written: bytes | None = None  # the envelope as last written by this attempt


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
        self._max_total = options.max_total
        self._total = asyncio.Semaphore(options.max_total)
        probe = options.probe_interval
        if probe is None:
            probe = options.rules.retry_after[0] if options.rules.retry_after else 60.0
        self._schedule = Schedule(options.max_per_destination, probe,
                                  options.rules.give_up_after)
        self._reader = EnvelopeReader(store)
        self._notices = Notices(store, options.hostname, options.rules, self._adopt_notice,
                                sign=options.sign_notice)
        self._tasks: set[asyncio.Task[Entry | None]] = set()
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
        # Envelope writes of concurrent attempts share one folder sync (update_many).
        self._writer: BatchThread[tuple[str, Callable[[Envelope], object]],
                                  Envelope] = BatchThread(
            "postroom-queue-write", self.store.update_many
        )
        self._flush_all = False
        self._rescan_requested = False
        self._recover_requested = False
        self._loading = 0  # loads of the folder under way
        self._jobs: set[asyncio.Task[None]] = set()  # those loads (a reference keeps them)
        self._stopping = False

    # -- control ---------------------------------------------------------------

    def wake(self, queue_id: str | None = None, *, envelope: Envelope | None = None) -> None:
        """Try `queue_id` now (a message just queued, flushed, held or released); no ID:
        try every message now, dead destinations included (a flush).

        `envelope`: the one just written for `queue_id` in this process, taken as
        it is instead of read back from disk. Held messages stay held.
        """
        if queue_id is None:
            self._flush_all = True
        elif envelope is not None:
            if self._take(envelope):
                self._reader.keep(envelope)
        else:
            self._wake_ids.add(queue_id)
        self._poke()

    def rescan(self) -> None:
        """Read every envelope of the queue folder again, in the background (an operator's
        request; each message's own changes come by `wake`)."""
        self._rescan_requested = True
        self._poke()

    def recover(self) -> None:
        """Compare the folder's names with the schedule soon: read what is new, forget what
        is gone (a worker's notifications were lost; also every RECOVERY_INTERVAL)."""
        self._recover_requested = True
        self._poke()

    def poke(self) -> None:
        """Look at the clock again now (for a clock that jumps, as tests' clocks do)."""
        self._poke()

    def stop(self) -> None:
        """Start no more deliveries; `run` returns once those in flight have finished."""
        self._stopping = True
        self._wakeup.set()

    async def idle(self) -> None:
        """Wait until the schedule is loaded, everything due has been tried and nothing
        is in flight (for tests)."""
        await self._idle.wait()

    @property
    def schedule(self) -> Schedule:
        """The schedule (read only: for tests, logs and counts)."""
        return self._schedule

    @property
    def envelope_reads(self) -> int:
        """Envelopes read from disk so far (for tests that count the work)."""
        return self._reader.reads

    def envelopes(self) -> list[Envelope]:
        """The envelopes of the messages in the schedule, read from disk (for tests and
        tools: the scheduler itself keeps none)."""
        found = (self.store.try_load(queue_id) for queue_id in list(self._schedule.entries))
        return [envelope for envelope in found if envelope is not None]

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt, jitter included."""
        return retry_delay(failures, self._rules, self._jitter())

    def _jitter(self) -> float:
        return self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _poke(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    def _take(self, envelope: Envelope) -> bool:
        """Schedule a message just queued or woken, due now (unless held); False when
        its attempt is under way (that attempt writes its state)."""
        current = self._schedule.entries.get(envelope.queue_id)
        if current is not None and current.where == ACTIVE:
            return False
        entry = entry_of(envelope)
        entry.next_attempt = 0.0
        self._schedule.put(envelope.queue_id, entry)
        return True

    def _adopt_notice(self, notice: Envelope) -> None:
        """A notice just queued: deliver it like any new message."""
        if self._take(notice):
            self._reader.keep(notice)
        self._poke()

    # -- the main loop ---------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stop(): recover the folder, load the schedule in the background
        while delivering what is due, then wait for what comes due."""
        loop = asyncio.get_running_loop()
        removed = await asyncio.to_thread(self.store.recover)
        if removed:
            log.warning("queue: recovery removed %d leftover file(s)", removed)
        loader = self._background(self._load("started with"))
        try:
            try:
                await self._loop(loop)
            except asyncio.CancelledError:
                for task in self._tasks:
                    task.cancel()
                raise
            finally:
                loader.cancel()
                for job in list(self._jobs):
                    job.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
        finally:
            self._remover.close()
            self._writer.close()
            self._reader.close()
        self._idle.set()

    async def _loop(self, loop: asyncio.AbstractEventLoop) -> None:
        next_recovery = loop.time() + RECOVERY_INTERVAL
        while not self._stopping:
            self._wakeup.clear()
            if self._rescan_requested:
                self._rescan_requested = False
                self._background(self._load("rescanned:", reread=True))
            if self._recover_requested or loop.time() >= next_recovery:
                self._recover_requested = False
                next_recovery = loop.time() + RECOVERY_INTERVAL
                self._background(self._recover())
            if self._wake_ids:
                ids, self._wake_ids = self._wake_ids, set()
                await self._read_woken(ids)
            if self._flush_all:
                self._flush_all = False
                self._schedule.flush()
            now = self._clock()
            self._start_due(now)
            if not self._tasks and not self._loading and not self._wakeup.is_set():
                self._idle.set()
            due = self._schedule.next_time()
            if now < due < math.inf:  # wake on the next whole TICK: one for all due in it
                due = math.ceil(due / TICK) * TICK
            timeout = max(0.0, min(due - now, next_recovery - loop.time()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), timeout)

    def _start_due(self, now: float) -> None:
        """Start what is due, as many as `max_total` leaves room for."""
        room = self._max_total - self._schedule.active
        if room <= 0 or self._stopping:
            return
        for queue_id in self._schedule.take_due(now, room):
            task = asyncio.create_task(self._attempt(queue_id), name=f"queue {queue_id}")
            self._tasks.add(task)
            task.add_done_callback(functools.partial(self._finished, queue_id=queue_id))

    def _finished(self, task: asyncio.Task[Entry | None], *, queue_id: str) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error("%s: attempt failed", queue_id, exc_info=error)
            old = self._schedule.entries.get(queue_id)
            if old is None:
                return
            # never spin on a message that breaks us
            entry: Entry | None = Entry(self._clock() + self.retry_delay(1), old.created,
                                        old.dest, old.held)
        else:
            entry = task.result()
        self._schedule.finished(queue_id, entry)
        self._wakeup.set()

    def _background(self, job: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run a load of the folder beside the loop; `idle` waits for it."""
        self._loading += 1
        task = asyncio.get_running_loop().create_task(job)
        self._jobs.add(task)
        task.add_done_callback(self._jobs.discard)
        return task

    async def _read_woken(self, ids: set[str]) -> None:
        """Read the envelopes of woken messages and make them due now; an ID that is
        malformed, gone or unreadable leaves the schedule."""
        wanted = []
        for queue_id in ids:
            try:
                check_queue_id(queue_id)
            except ValueError:
                continue
            current = self._schedule.entries.get(queue_id)
            if current is None or current.where != ACTIVE:
                wanted.append(queue_id)
        for queue_id, envelope in await self._reader.read_woken(sorted(wanted)):
            if envelope is None:
                self._schedule.remove(queue_id)
            elif not self._take(envelope):
                self._reader.fresh.pop(queue_id, None)

    async def _load(self, words: str, *, reread: bool = False) -> None:
        try:
            await load_schedule(self._reader, self._schedule, self._poke, words, reread=reread)
        finally:
            self._loading -= 1
            self._poke()

    async def _recover(self) -> None:
        try:
            await recover_schedule(self._reader, self._schedule, self._poke)
        finally:
            self._loading -= 1
            self._poke()

    # -- one attempt of one envelope -----------------------------------------------

    async def _attempt(self, queue_id: str) -> Entry | None:
        """Attempt one message; returns its new schedule entry, None once it left the queue."""
        old = self._schedule.entries[queue_id]
        envelope = await self._reader.for_attempt(queue_id)
        if envelope is None:
            return None
        if envelope.held:
            return entry_of(envelope)
        attempt = _Attempt(started=self._clock())
        if not envelope.done:
            groups: dict[str, list[Recipient]] = {}
            for recipient in envelope.pending():
                groups.setdefault(_domain(recipient.address), []).append(recipient)
            attempt.groups = len(groups)
            await gather_few(
                [self._deliver_group(envelope, d, rs, attempt) for d, rs in groups.items()]
            )
            if attempt.gone:
                log.info("%s: removed from the queue during delivery", queue_id)
                return None
            if not attempt.ran:
                return old  # stopping: nothing was tried, nothing changes
            # The results are on disk (or, for a message all done, about to be removed):
            # the destination's next message need not wait for the removal or notices.
            self._schedule.release_slot(queue_id)
            self._wakeup.set()
        return await self._conclude(envelope, attempt)

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
                suspended = self._schedule.suspended(domain, envelope.queue_id, begun)
                if suspended is not None:
                    results: list[DeliveryResult] | None = [
                        DeliveryResult(r.address, "temporary", SUSPENDED_STATUS,
                                       f"delivery temporarily suspended: {suspended}")
                        for r in recipients]
                else:
                    results = await self._try(envelope, domain, recipients)
                    if results is not None:
                        self._judge_destination(domain, results)
                if results is None:
                    attempt.gone = True
                    return
                timing = Timing(attempt.started, begun, self._clock())
                # The slot is given up only once the results are on disk: nothing moves
                # on (not even another delivery) before what happened is durable.
                async with attempt.lock:
                    self._record(envelope, recipients, results, timing)
                    attempt.groups -= 1
                    if not attempt.groups and not envelope.done:
                        # The last results of the attempt: the next attempt's time goes
                        # into the same write, so a deferral costs one write, not two.
                        envelope.next_attempt = next_attempt(envelope, timing.ended,
                                                             self._rules, self._jitter())
                        attempt.rescheduled = True
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

    def _judge_destination(self, domain: str, results: list[DeliveryResult]) -> None:
        """Tell the schedule whether `domain` answered: a host that replied (any remote
        MTA named) makes it alive; no host reached at all (every result temporary,
        no remote MTA, an X.4 network or routing status of RFC 3463 section 3.5)
        makes it dead for a probe interval. Anything else says nothing of it."""
        if any(r.remote_mta is not None for r in results):
            self._schedule.destination_result(domain, down=False, now=self._clock())
        elif results and all(r.outcome == "temporary" and r.dsn_status.startswith("4.4.")
                             for r in results):
            self._schedule.destination_result(domain, down=True, now=self._clock(),
                                              reason=results[0].text)

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
            log_result(envelope, recipient, verdict.word, timing)
        for extra in unmatched:
            log.warning("%s: result for unknown recipient <%s> ignored",
                        envelope.queue_id, extra.recipient)

    async def _conclude(self, envelope: Envelope, attempt: _Attempt) -> Entry | None:
        """After an attempt: schedule the next one, send notices owed, remove when done.
        Returns the message's new entry, None once it has left the queue."""
        now = self._clock()
        if not envelope.done:
            if not attempt.rescheduled:
                envelope.next_attempt = next_attempt(envelope, now, self._rules,
                                                     self._jitter())
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
                    return entry_of(envelope)
                log.info("%s: removed", envelope.queue_id)
                return None
            # A notice could not be queued (disk trouble): keep the message, try again later.
            envelope.next_attempt = now + self.retry_delay(1)
        if attempt.written is not None and envelope.to_json() == attempt.written:
            return entry_of(envelope)  # on disk already, as the last results were written
        if not await self._persist(envelope, None):
            return None
        return entry_of(envelope)

    async def _persist(self, envelope: Envelope, attempt: _Attempt | None) -> bool:
        """Write the scheduler's part of the envelope; the command line's `held` is kept.
        False when the message is no longer queued."""
        snapshot = Envelope.from_json(envelope.to_json())

        def merge(on_disk: Envelope) -> None:
            for name in _SCHEDULER_FIELDS:
                setattr(on_disk, name, getattr(snapshot, name))

        try:
            stored = await self._writer.submit((envelope.queue_id, merge))
        except NotQueued:
            if attempt is not None:
                attempt.gone = True
            return False
        except (CorruptEnvelope, OSError) as e:
            # Memory stays ahead of the disk; the next write tries again.
            log.error("%s: cannot save the envelope: %s", envelope.queue_id, e)
            return True
        envelope.held = stored.held
        if attempt is not None:
            attempt.written = envelope.to_json()
        return True


def _domain(address: str) -> str:
    return address.rpartition("@")[2].lower()
