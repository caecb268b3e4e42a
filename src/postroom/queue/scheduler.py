"""The queue's clock: decides when each queued message is tried, and what each result means.

The scheduler owns time (couriers never sleep or retry). It keeps every
envelope of the queue folder in memory, starts the ones that are due, and
for each attempt groups the recipients still pending by domain and calls the
injected `deliver` once per domain, with the message open for reading
(postroom.queue.content), within two limits: `max_per_destination`
concurrent deliveries per domain and `max_total` overall.

What a result does to a recipient (a table, by outcome):

    delivered  -> "delivered"  (a success notice if NOTIFY asked for one, RFC 3461)
    permanent  -> "bounced"    (a failure notice to the sender)
    temporary  -> "deferred"   (retried later) or, once the message is older than
                  give_up_after, "bounced" with 5.4.7 and a failure notice

A failure notice cannot go to the null sender <>: mail from <> that bounces
(a bounce to a sender who does not exist) is reported to the `postmaster`
instead (a double bounce); one of those that bounces too is logged and
dropped, never reported again (RFC 5321 6.1: no loops).

Each result is written to disk (the queue's envelope file) before anything else happens
(one write per `deliver` call, which returns all of a domain's results at
once). Notices owed are recorded in the same write (envelope.extra
"dsn_owed") and queued at the end of the attempt, then cleared: a crash in
between sends a notice twice, never zero times. When every recipient is
final the message is removed. After a crash (kill -9) a restart finds every
envelope on disk again; only the recipients that were in the middle of a
`deliver` call are tried again (at least once, never lost).

Retries wait `config.queue.retry_after[n-1]` after the n-th failed attempt
(the last interval repeats), times a random factor in [0.9, 1.1]: the +-10 %
jitter spreads out messages that failed together, so they do not all hit a
recovering host in the same second.

Log lines carry the queue ID, in Postfix's shape:
`QUEUEID: to=<x>, relay=host[ip]:port, delay=12, delays=a/b/c, dsn=4.4.1,
status=deferred (text)`, where delay is the time since arrival and delays
splits this attempt into: time queued before it / waiting for a delivery
slot / the delivery itself. `QUEUEID: removed` ends a message's life.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from postroom.batch import BatchThread
from postroom.config import Config
from postroom.gathering import gather_few
from postroom.queue.content import Content
from postroom.queue.dsn import DOUBLE_BOUNCE, Action, queue_dsn, wants_dsn
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult
from postroom.queue.store import CorruptEnvelope, NotQueued, QueueError, QueueStore

log = logging.getLogger("postroom.queue")

Deliver = Callable[[Envelope, list[Recipient], Content], Awaitable[list[DeliveryResult]]]

RESCAN_INTERVAL = 30.0  # seconds: `postroom queue` and sendmail change the folder meanwhile
JITTER = 0.1  # retry intervals vary by +-10 %
# Seconds the removing thread gathers finished messages before it removes them;
# a crash meanwhile delivers them again, as for any delivery in flight.
REMOVE_LINGER = 0.01
# At most this many envelopes are read in the event loop at once; more go to the
# reading thread (see Scheduler._read).
READ_IN_LOOP = 8
EXPIRED_STATUS = "5.4.7"  # RFC 3463 X.4.7: delivery time expired
UNREADABLE_STATUS = "4.3.0"  # RFC 3463 X.3.0: the queued message cannot be read now
DEFAULT_RETRY = 300.0  # used only if a config lists no retry interval at all
OWED = "dsn_owed"  # envelope.extra key: {address: action} of notices not yet queued
TO_POSTMASTER = "postmaster"  # the action owed for mail from <> that bounced (see OWED)


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
        config: Config,
        *,
        bounce_sender_hostname: str,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        max_per_destination: int = 10,
        max_total: int = 100,
        delay_warning_after: float | None = None,
        postmaster: str | None = None,
    ) -> None:
        """`postmaster`: where failure reports about mail from <> go (None: dropped)."""
        if max_per_destination < 1 or max_total < 1:
            raise ValueError("delivery limits must be at least 1")
        self.store = store
        self._deliver = deliver
        self._retry_after = tuple(config.queue.retry_after) or (DEFAULT_RETRY,)
        self._give_up_after = config.queue.give_up_after
        self.hostname = bounce_sender_hostname
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self._max_per_destination = max_per_destination
        self._total = asyncio.Semaphore(max_total)
        self._delay_warning_after = delay_warning_after
        self._postmaster = postmaster
        self._envelopes: dict[str, Envelope] = {}
        self._in_flight: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: dict[str, _Slot] = {}
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        self._wake_ids: set[str] = set()
        self._fresh: set[str] = set()  # envelopes just read by _load_ids
        # Finished messages are removed in batches: one sync of the folder for many.
        # Their files are kept for reuse: the scheduler alone reads a message
        # to deliver it, and it removes one only when its deliveries are over.
        # Nothing waits on a removal but the "removed" log line, so the thread
        # gathers them for REMOVE_LINGER: four alternating relay-benchmark pairs
        # gave 327-380 msg/s with it, 273-341 without (see BatchThread).
        self._remover: BatchThread[str, None] = BatchThread(
            "postroom-queue-remove", functools.partial(self.store.remove_many, reuse=True),
            linger=REMOVE_LINGER,
        )
        # Envelopes queued by the other server processes are read here, a batch of
        # IDs per job, when there are more than READ_IN_LOOP (see _read): a pool
        # thread per read (asyncio.to_thread) cost more in futures and hand-offs
        # than the read of a small, just-written file.
        self._reader: BatchThread[list[str], list[Envelope | Exception]] = BatchThread(
            "postroom-queue-read", lambda jobs: [self._read_envelopes(ids) for ids in jobs]
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
            self._envelopes[queue_id] = envelope
            self._fresh.add(queue_id)  # _attempt need not read it either
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

    @property
    def in_flight(self) -> frozenset[str]:
        return frozenset(self._in_flight)

    def envelopes(self) -> list[Envelope]:
        """The scheduler's current view of the queue (copies are not made: do not change)."""
        return list(self._envelopes.values())

    def retry_delay(self, failures: int) -> float:
        """Seconds to wait after the `failures`-th failed attempt, jitter included."""
        index = min(max(failures, 1), len(self._retry_after)) - 1
        return self._retry_after[index] * self._rng.uniform(1 - JITTER, 1 + JITTER)

    def _poke(self) -> None:
        self._idle.clear()
        self._wakeup.set()

    # -- the main loop ---------------------------------------------------------

    async def run(self) -> None:
        """Deliver until stop(): recover the folder, load it, then start what is due."""
        loop = asyncio.get_running_loop()
        removed = await asyncio.to_thread(self.store.recover)
        if removed:
            log.warning("queue: recovery removed %d leftover file(s)", removed)
        await self._load_all()
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
            self._reader.close()
        self._idle.set()

    async def _loop(self, loop: asyncio.AbstractEventLoop, next_rescan: float) -> None:
        while not self._stopping:
            self._wakeup.clear()
            if self._rescan_requested or loop.time() >= next_rescan:
                self._rescan_requested = False
                await self._load_all()
                next_rescan = loop.time() + RESCAN_INTERVAL
            if self._wake_ids:
                ids, self._wake_ids = self._wake_ids, set()
                await self._load_ids(ids)
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

    async def _load_all(self) -> None:
        """Adopt the folder's envelopes; those in flight keep their in-memory state."""
        try:
            on_disk = await asyncio.to_thread(self.store.list)
        except OSError as e:
            log.error("queue: cannot read the queue folder: %s", e)
            return
        seen = set()
        for envelope in on_disk:
            seen.add(envelope.queue_id)
            if envelope.queue_id not in self._in_flight:
                self._envelopes[envelope.queue_id] = envelope
        for queue_id in list(self._envelopes):
            if queue_id not in seen and queue_id not in self._in_flight:
                del self._envelopes[queue_id]

    async def _load_ids(self, ids: set[str]) -> None:
        """Read the envelopes of messages just queued (or flushed), all in one trip to
        the reading thread, and make them due now."""
        wanted = [queue_id for queue_id in ids if queue_id not in self._in_flight]
        if not wanted:
            return
        read = await self._read(wanted)
        for queue_id, result in zip(wanted, read, strict=True):
            envelope = self._adopt(queue_id, result)
            if envelope is not None:
                envelope.next_attempt = 0.0
                self._fresh.add(queue_id)  # _attempt need not read it again

    async def _reload(self, queue_id: str) -> Envelope | None:
        """Read one envelope again (the command line may have changed it). In the
        reading thread: a message waiting for its retry may have left the page
        cache long ago."""
        read = await self._reader.submit([queue_id])
        return self._adopt(queue_id, read[0])

    async def _read(self, queue_ids: list[str]) -> list[Envelope | Exception]:
        """Each envelope of messages just queued (or flushed), or why it could not be read.

        A few are read right here, blocking the loop for a moment: each is the
        first line of a small file, usually just written by another server
        process (in the page cache), and reading it costs less than waking the
        reading thread and handing it the interpreter lock, then being woken
        by it (four alternating relay-benchmark pairs: 332-380 msg/s against
        313-352). Postfix's queue manager reads its queue files in its event
        loop too. A burst (many sessions at once, a flush of many) goes to the
        reading thread, so the loop never stalls on many files at once.
        """
        if len(queue_ids) <= READ_IN_LOOP:
            return self._read_envelopes(queue_ids)
        return await self._reader.submit(queue_ids)

    def _read_envelopes(self, queue_ids: list[str]) -> list[Envelope | Exception]:
        """BLOCKING: each envelope, or why it could not be read."""
        read: list[Envelope | Exception] = []
        for queue_id in queue_ids:
            try:
                read.append(self.store.load(queue_id))
            except (QueueError, OSError) as e:  # NotQueued is a QueueError
                read.append(e)
        return read

    def _adopt(self, queue_id: str, read: Envelope | Exception) -> Envelope | None:
        """Take a freshly read envelope as the scheduler's copy; None if it is gone."""
        if isinstance(read, NotQueued):
            if self._envelopes.pop(queue_id, None) is not None:
                log.info("%s: removed from the queue by someone else", queue_id)
            return None
        if isinstance(read, Exception):
            # Forget it until a rescan finds it readable again (never spin on it).
            log.error("%s: cannot read its envelope: %s", queue_id, read)
            self._envelopes.pop(queue_id, None)
            return None
        self._envelopes[queue_id] = read
        return read

    # -- one attempt of one envelope -----------------------------------------------

    async def _attempt(self, queue_id: str) -> None:
        if queue_id in self._fresh:  # read from disk a moment ago by _load_ids
            self._fresh.discard(queue_id)
            envelope = self._envelopes.get(queue_id)
        else:
            envelope = await self._reload(queue_id)
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
                ended = self._clock()
                # The slot is given up only once the results are on disk: nothing moves
                # on (not even another delivery) before what happened is durable.
                async with attempt.lock:
                    self._apply(envelope, recipients, results, attempt, begun, ended)
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
            return [DeliveryResult(r.address, "temporary", UNREADABLE_STATUS, text)
                    for r in recipients]
        try:
            with content:
                return await self._deliver(envelope, list(recipients), content)
        except Exception as e:  # a courier bug must not lose the message
            log.exception("%s: delivery to %s failed", envelope.queue_id, domain)
            return [DeliveryResult(r.address, "temporary", "4.3.0", f"internal error: {e}")
                    for r in recipients]

    def _apply(
        self,
        envelope: Envelope,
        recipients: list[Recipient],
        results: Sequence[DeliveryResult],
        attempt: _Attempt,
        begun: float,
        ended: float,
    ) -> None:
        """Record the results of one deliver call (see the table in the module docstring)."""
        unmatched = list(results)
        for recipient in recipients:
            result = _take_result(unmatched, recipient.address) or DeliveryResult(
                recipient.address, "temporary", "4.3.0", "the courier gave no result"
            )
            recipient.remote_mta = result.remote_mta
            recipient.dsn_status = result.dsn_status
            recipient.last_error = result.text
            owed: Action | None = None
            if result.outcome == "delivered":
                recipient.state, recipient.done_at, word = "delivered", ended, "sent"
                action: Action = (
                    "relayed" if result.relayed_without_dsn
                    else "expanded" if result.expanded else "delivered"
                )
                # A DSN-capable next hop took over the notice (RFC 3461 5.2.2); only
                # local deliveries and hops without DSN are reported by us.
                if result.relayed_without_dsn or result.remote_mta is None:
                    owed = action
            elif result.outcome == "permanent":
                recipient.state, recipient.done_at, word = "bounced", ended, "bounced"
                owed = "failed"
            elif ended - envelope.created > self._give_up_after:
                recipient.state, recipient.done_at, word = "bounced", ended, "bounced"
                recipient.dsn_status = EXPIRED_STATUS
                recipient.last_error = f"delivery time expired; last error: {result.text}"
                owed = "failed"
            else:
                recipient.state, word = "deferred", "deferred"
            if owed is not None and wants_dsn(envelope, recipient, owed):
                envelope.extra.setdefault(OWED, {})[recipient.address] = owed
            elif owed == "failed" and envelope.sender == "" and self._to_postmaster(envelope,
                                                                                   recipient):
                envelope.extra.setdefault(OWED, {})[recipient.address] = TO_POSTMASTER
            self._log_result(envelope, recipient, word, attempt, begun, ended)
        for extra in unmatched:
            log.warning("%s: result for unknown recipient <%s> ignored",
                        envelope.queue_id, extra.recipient)

    def _to_postmaster(self, envelope: Envelope, recipient: Recipient) -> bool:
        """Whether mail from <> that bounced is reported to the postmaster: not when
        it is such a report already (or there is no postmaster); that is logged."""
        if envelope.extra.get(DOUBLE_BOUNCE) or self._postmaster is None:
            what = "postmaster notice" if envelope.extra.get(DOUBLE_BOUNCE) else "mail from <>"
            log.warning("%s: undeliverable %s to <%s> discarded", envelope.queue_id, what,
                        recipient.address)
            return False
        return True

    def _log_result(
        self,
        envelope: Envelope,
        recipient: Recipient,
        word: str,
        attempt: _Attempt,
        begun: float,
        ended: float,
    ) -> None:
        orig = ""
        if recipient.orcpt:
            original = recipient.orcpt.partition(";")[2] or recipient.orcpt
            if original.strip() != recipient.address:
                orig = f", orig_to=<{original.strip()}>"
        delays = "/".join(
            _seconds(x)
            for x in (attempt.started - envelope.created, begun - attempt.started, ended - begun)
        )
        log.info(
            "%s: to=<%s>%s, relay=%s, delay=%s, delays=%s, dsn=%s, status=%s (%s)",
            envelope.queue_id, recipient.address, orig,
            # No remote MTA: delivered here, or never reached one (Postfix: relay=none).
            recipient.remote_mta or ("local" if recipient.state == "delivered" else "none"),
            _seconds(ended - envelope.created), delays, recipient.dsn_status, word,
            " ".join((recipient.last_error or "").split()),
        )

    async def _conclude(self, envelope: Envelope) -> None:
        """After an attempt: schedule the next one, send notices owed, remove when done."""
        now = self._clock()
        if not envelope.done:
            failures = max(r.attempts for r in envelope.pending())
            envelope.next_attempt = now + self.retry_delay(failures)
            await self._maybe_warn(envelope, now)
        sent = await self._send_owed(envelope, now)
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

    async def _maybe_warn(self, envelope: Envelope, now: float) -> None:
        """RFC 3464 delayed notice, once per message, after delay_warning_after."""
        after = self._delay_warning_after
        if after is None or envelope.warned or now - envelope.created < after:
            return
        waiting = [r for r in envelope.pending() if r.state == "deferred"]
        if not waiting:
            return
        if await self._notify(envelope, waiting, "delayed", now):
            envelope.warned = True

    async def _send_owed(self, envelope: Envelope, now: float) -> bool:
        """Queue the notices recorded as owed; False if one could not be queued."""
        owed: dict[str, str] = envelope.extra.get(OWED) or {}
        ok = True
        for kind in ("failed", TO_POSTMASTER, "relayed", "expanded", "delivered"):
            addresses = {a for a, act in owed.items() if act == kind}
            recipients = [r for r in envelope.recipients if r.address in addresses]
            if not recipients:
                continue
            to = self._postmaster if kind == TO_POSTMASTER else None
            action = cast(Action, "failed" if kind == TO_POSTMASTER else kind)
            if await self._notify(envelope, recipients, action, now, to=to):
                for address in addresses:
                    owed.pop(address, None)
            else:
                ok = False
        if not owed:
            envelope.extra.pop(OWED, None)
        return ok

    async def _notify(
        self, envelope: Envelope, recipients: list[Recipient], action: Action, now: float,
        *, to: str | None = None,
    ) -> bool:
        """Queue one DSN about `recipients` (to the sender, or `to`); True when it is
        queued (or nobody wants it)."""
        items = [(r, _result_of(r)) for r in recipients]
        retry_until = envelope.created + self._give_up_after if action == "delayed" else None
        try:
            notice = await asyncio.to_thread(
                queue_dsn, self.store, envelope, items, action, self.hostname, now,
                retry_until=retry_until, to=to,
            )
        except OSError as e:
            log.error("%s: cannot queue the %s notice: %s", envelope.queue_id, action, e)
            return False
        if notice is not None:
            kind = {"failed": "non-delivery", "delayed": "delay"}.get(action, "success")
            whom = "postmaster" if to is not None else "sender"
            log.info("%s: %s %s notification: %s", envelope.queue_id, whom, kind,
                     notice.queue_id)
            self._envelopes[notice.queue_id] = notice
            self._idle.clear()
            self._wakeup.set()
        return True

    async def _persist(self, envelope: Envelope, attempt: _Attempt | None) -> None:
        """Write the scheduler's part of the envelope; the command line's `held` is kept."""
        snapshot = Envelope.from_json(envelope.to_json())

        def merge(on_disk: Envelope) -> None:
            on_disk.recipients = snapshot.recipients
            on_disk.next_attempt = snapshot.next_attempt
            on_disk.warned = snapshot.warned
            on_disk.extra = snapshot.extra

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


def _take_result(results: list[DeliveryResult], address: str) -> DeliveryResult | None:
    """Remove and return the result for `address` (exact spelling first, then any case)."""
    for exact in (True, False):
        for i, result in enumerate(results):
            if result.recipient == address or (
                not exact and result.recipient.lower() == address.lower()
            ):
                return results.pop(i)
    return None


def _result_of(recipient: Recipient) -> DeliveryResult:
    """The last result of a recipient, rebuilt from its stored state (for notices)."""
    outcome = {"delivered": "delivered", "bounced": "permanent"}.get(recipient.state, "temporary")
    return DeliveryResult(
        recipient=recipient.address,
        outcome=outcome,  # type: ignore[arg-type]
        dsn_status=recipient.dsn_status or "",
        text=recipient.last_error or "",
        remote_mta=recipient.remote_mta,
    )


def _seconds(value: float) -> str:
    value = max(0.0, value)
    if value >= 100:
        return f"{value:.0f}"
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"
