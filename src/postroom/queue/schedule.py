"""The relay queue's schedule in memory: per message only what scheduling needs, ordered by time.

One small Entry per queued message (its next attempt, its destination domain,
when it arrived, whether it is held, where it waits): never the envelope,
which the scheduler reads from disk when an attempt starts. Waiting entries
sit in a heap keyed by their next attempt, so a wake-up costs what is due,
not what waits: `take_due` pops the due ones and nothing else. A heap item
whose entry has moved on since (rescheduled, held, removed) is skipped when
it comes up (lazy deletion): removing from the middle of a heap would cost
more than the stale item.

Destinations. Each domain has a limit of attempts in flight; a due message
whose domain is at its limit waits in that domain's ready line, and goes when
one of them finishes. A domain whose hosts did not answer (`destination_result`
with down=True) is dead until `probe_interval` has passed, as Postfix's queue
manager marks a destination dead and throttles it: its due messages are
parked, with no attempt and no write, and once per interval one parked
message is tried as a probe. (A message never tried yet is deferred untried
instead, once, so that the queue says why it waits.) When a probe (or any delivery there) gets an
answer, the domain is alive again and all its parked messages move to its
ready line, which they leave at the domain's concurrency. A parked message
past its queue lifetime is still attempted, so that it bounces
(postroom.queue.rules): a domain that never comes back cannot keep mail
forever.

Pure bookkeeping: no I/O, no clock (callers pass `now`), no asyncio.
"""

from __future__ import annotations

import heapq
import sys
from collections import deque
from dataclasses import dataclass, field

# Where an entry is: in the heap waiting for its time, parked on a dead
# destination, in its destination's ready line, or being attempted.
WAITING, PARKED, READY, ACTIVE = range(4)
# Seconds between two looks at a dead destination's parked messages for those
# past their queue lifetime (Postfix bounces such mail when its queue manager
# next reads it; here at most this late).
EXPIRY_SWEEP = 600.0
# Heap items one `take_due` looks at, at most: when a great many come due at once
# (a restart, a flush, a destination found dead) and are parked or lined up
# rather than started, the event loop still gets its turn every few milliseconds.
TAKE_BUDGET = 2000


class Entry:
    """What scheduling needs of one queued message (a few dozen octets)."""

    __slots__ = ("created", "dest", "held", "next_attempt", "tried", "where")

    def __init__(self, next_attempt: float, created: float, dest: str, held: bool,
                 tried: bool = True) -> None:
        self.next_attempt = next_attempt
        self.created = created
        self.dest = dest  # the domain of its first pending recipient, interned
        self.held = held
        self.tried = tried  # attempted at least once (a new message is not)
        self.where = WAITING


def destination_of(addresses: list[str]) -> str:
    """The destination a message is scheduled under: the domain of its first pending
    recipient, lower-cased and interned (many messages share one string)."""
    if not addresses:
        return ""
    return sys.intern(addresses[0].rpartition("@")[2].lower())


@dataclass
class Destination:
    """One destination domain: its attempts in flight, its ready line, and whether it is dead."""

    active: int = 0
    ready: deque[str] = field(default_factory=deque)
    parked: deque[str] = field(default_factory=deque)
    dead_until: float = 0.0  # 0: alive; else when the next probe may go
    probing: str | None = None  # the queue ID of the probe in flight
    reason: str = ""  # why it is dead: the last error
    swept: float = 0.0  # when its parked messages were last checked for expiry

    @property
    def dead(self) -> bool:
        return self.dead_until > 0.0

    @property
    def unused(self) -> bool:
        return not (self.active or self.ready or self.parked or self.dead)


class Schedule:
    """Entries by queue ID, their heap, and the destinations (see the module docstring)."""

    def __init__(self, max_per_destination: int, probe_interval: float,
                 give_up_after: float) -> None:
        self.entries: dict[str, Entry] = {}
        self.destinations: dict[str, Destination] = {}
        self._heap: list[tuple[float, str]] = []
        self._probes: list[tuple[float, str]] = []  # (dead_until, domain)
        self._unblocked: set[str] = set()  # domains with a free slot and a ready line
        self._released: set[str] = set()  # ACTIVE entries whose slot went back early
        self._limit = max_per_destination
        self._interval = probe_interval
        self._give_up = give_up_after
        self.active = 0  # attempts in flight, all destinations

    def __len__(self) -> int:
        return len(self.entries)

    # -- entries -----------------------------------------------------------------

    def put(self, queue_id: str, entry: Entry) -> None:
        """Add or replace the entry of a message that is not being attempted."""
        old = self.entries.get(queue_id)
        if old is not None and old.where == ACTIVE:
            raise ValueError(f"{queue_id} is being attempted")
        self.entries[queue_id] = entry
        self._wait(queue_id, entry)

    def remove(self, queue_id: str) -> None:
        """Forget a message that is not being attempted (its heap or line items go stale)."""
        entry = self.entries.get(queue_id)
        if entry is not None and entry.where != ACTIVE:
            del self.entries[queue_id]

    def due_now(self, queue_id: str) -> None:
        """Make a waiting, parked or ready message due at once (a flush)."""
        entry = self.entries.get(queue_id)
        if entry is not None and entry.where != ACTIVE:
            entry.next_attempt = 0.0
            self._wait(queue_id, entry)

    def flush(self) -> None:
        """Every message due now and every destination alive (Postfix's `postqueue -f`
        also forgets its dead destinations). O(messages): for an operator's request."""
        for entry in self.entries.values():
            if entry.where != ACTIVE:
                entry.next_attempt = 0.0
                entry.where = WAITING
        self._heap = [(0.0, q) for q, e in self.entries.items()
                      if e.where == WAITING and not e.held]
        heapq.heapify(self._heap)
        for name, dest in list(self.destinations.items()):
            dest.dead_until, dest.ready, dest.parked = 0.0, deque(), deque()
            self._drop_if_unused(name, dest)
        self._probes = []
        self._unblocked.clear()

    def _wait(self, queue_id: str, entry: Entry) -> None:
        entry.where = WAITING
        if not entry.held:
            heapq.heappush(self._heap, (entry.next_attempt, queue_id))

    # -- what is due ---------------------------------------------------------------

    def next_time(self) -> float:
        """When something may next be due (inf: nothing waits on time); a stale heap
        item may make it early, never late."""
        times = [float("inf")]
        if self._heap:
            times.append(self._heap[0][0])
        if self._probes:
            times.append(self._probes[0][0])
        if self._unblocked:
            times.append(0.0)
        return min(times)

    def take_due(self, now: float, room: int) -> list[str]:
        """Up to `room` queue IDs to attempt now, each marked ACTIVE: first the ready lines
        of destinations with a free slot, then the probes due, then the heap's due
        entries (TAKE_BUDGET of them at most: `next_time` says when more are due).
        Costs what is due (and the stale items it meets), not the queue's size."""
        started: list[str] = []
        self._take_ready(now, room, started)
        while self._probes and self._probes[0][0] <= now and len(started) < room:
            _when, name = heapq.heappop(self._probes)
            dest = self.destinations.get(name)
            if dest is None or not dest.dead or dest.dead_until > now or dest.probing:
                continue
            self._probe(name, dest, now, started)
        budget = TAKE_BUDGET
        while self._heap and self._heap[0][0] <= now and len(started) < room and budget:
            budget -= 1
            when, queue_id = heapq.heappop(self._heap)
            entry = self.entries.get(queue_id)
            if (entry is None or entry.where != WAITING or entry.held
                    or entry.next_attempt != when):
                continue  # stale: the entry moved on since this item was pushed
            self._dispatch(queue_id, entry, now, started)
        return started

    def _take_ready(self, now: float, room: int, started: list[str]) -> None:
        for name in list(self._unblocked):
            if len(started) >= room:
                return
            self._unblocked.discard(name)
            dest = self.destinations.get(name)
            if dest is None:
                continue
            while dest.ready and dest.active < self._limit and len(started) < room:
                queue_id = dest.ready.popleft()
                entry = self.entries.get(queue_id)
                if entry is None or entry.where != READY or entry.held:
                    continue
                self._dispatch(queue_id, entry, now, started)
            if dest.ready and dest.active < self._limit:
                self._unblocked.add(name)  # no room left this time
            self._drop_if_unused(name, dest)

    def _probe(self, name: str, dest: Destination, now: float, started: list[str]) -> None:
        """A dead destination's probe is due: one parked message goes; the parked ones
        past their lifetime go too, every EXPIRY_SWEEP seconds."""
        if now - dest.swept >= EXPIRY_SWEEP:
            dest.swept = now
            expired = [q for q in dest.parked if self._expired(q, now)]
            for queue_id in expired:
                self.entries[queue_id].where = READY
                dest.ready.append(queue_id)
            if expired:
                self._unblocked.add(name)
        while dest.parked:
            queue_id = dest.parked.popleft()
            entry = self.entries.get(queue_id)
            if entry is not None and entry.where == PARKED and not entry.held:
                self._start(queue_id, entry, dest, started, probe=True)
                return

    def _expired(self, queue_id: str, now: float) -> bool:
        entry = self.entries.get(queue_id)
        return (entry is not None and entry.where == PARKED
                and now - entry.created > self._give_up)

    def _dispatch(self, queue_id: str, entry: Entry, now: float, started: list[str]) -> None:
        """A due entry: attempt it, probe with it, park it, or line it up.

        A message never tried that meets a dead destination is attempted all the
        same, and its delivery deferred untried (`suspended`), as Postfix defers
        it with "delivery temporarily suspended": the queue then says why it
        waits, and it waits its own retry interval before it is parked."""
        dest = self._destination(entry.dest)
        if dest.dead and now - entry.created <= self._give_up:
            if dest.probing is None and now >= dest.dead_until:
                self._start(queue_id, entry, dest, started, probe=True)
                return
            if entry.tried:
                entry.where = PARKED
                dest.parked.append(queue_id)
                return
        if dest.active >= self._limit:
            entry.where = READY
            dest.ready.append(queue_id)
            return
        self._start(queue_id, entry, dest, started)

    def _start(self, queue_id: str, entry: Entry, dest: Destination, started: list[str],
               *, probe: bool = False) -> None:
        entry.where = ACTIVE
        dest.active += 1
        self.active += 1
        if probe:
            dest.probing = queue_id
        started.append(queue_id)

    # -- outcomes -------------------------------------------------------------------

    def release_slot(self, queue_id: str) -> None:
        """The deliveries of `queue_id`'s attempt are over (their results durable) and
        only its bookkeeping remains (notices, removal): its destination's slot goes to
        the next message now, not when `finished` comes."""
        entry = self.entries.get(queue_id)
        if entry is None or entry.where != ACTIVE or queue_id in self._released:
            return
        dest = self.destinations.get(entry.dest)
        if dest is None:
            return
        self._released.add(queue_id)
        dest.active -= 1
        if dest.ready:
            self._unblocked.add(entry.dest)

    def finished(self, queue_id: str, entry: Entry | None) -> None:
        """The attempt of `queue_id` is over: `entry` is its new schedule (None: it left
        the queue). Frees its destination's slot."""
        old = self.entries.get(queue_id)
        if old is None or old.where != ACTIVE:
            return
        self.active -= 1
        name = old.dest
        dest = self.destinations.get(name)
        released = queue_id in self._released
        self._released.discard(queue_id)
        if dest is not None:
            if not released:
                dest.active -= 1
            if dest.probing == queue_id:
                dest.probing = None
            if dest.ready:
                self._unblocked.add(name)
            self._drop_if_unused(name, dest)
        if entry is None:
            del self.entries[queue_id]
        else:
            self.entries[queue_id] = entry
            self._wait(queue_id, entry)

    def destination_result(self, name: str, *, down: bool, now: float, reason: str = "") -> None:
        """What a delivery to domain `name` found: no host answered (`down`), or one did."""
        dest = self.destinations.get(name)
        if down:
            dest = dest or self._destination(name)
            dest.reason = reason
            if dest.dead_until < now + self._interval:
                if not dest.dead:
                    dest.swept = now
                dest.dead_until = now + self._interval
                heapq.heappush(self._probes, (dest.dead_until, name))
            return
        if dest is None or not dest.dead:
            return
        dest.dead_until = 0.0
        for queue_id in dest.parked:
            entry = self.entries.get(queue_id)
            if entry is not None and entry.where == PARKED:
                entry.where = READY
                dest.ready.append(queue_id)
        dest.parked = deque()
        if dest.ready:
            self._unblocked.add(name)

    def suspended(self, name: str, queue_id: str, now: float) -> str | None:
        """Why a delivery of `queue_id` to domain `name` is not to be tried now (the
        domain is dead and this is not its probe), or None to try it."""
        dest = self.destinations.get(name)
        if dest is None or not dest.dead or dest.probing == queue_id:
            return None
        if dest.probing is None and now >= dest.dead_until:
            return None  # due for a probe anyway: this delivery is one
        return dest.reason or "the destination did not answer"

    def is_dead(self, name: str) -> bool:
        dest = self.destinations.get(name)
        return dest is not None and dest.dead

    def counts(self) -> dict[str, int]:
        """How many entries are where (for logs and tests)."""
        result = dict.fromkeys(("waiting", "parked", "ready", "active", "held"), 0)
        names = ("waiting", "parked", "ready", "active")
        for entry in self.entries.values():
            result["held" if entry.held and entry.where != ACTIVE else names[entry.where]] += 1
        return result

    def _destination(self, name: str) -> Destination:
        dest = self.destinations.get(name)
        if dest is None:
            dest = self.destinations[name] = Destination()
        return dest

    def _drop_if_unused(self, name: str, dest: Destination) -> None:
        if dest.unused:
            self.destinations.pop(name, None)
            self._unblocked.discard(name)
