"""The in-memory schedule alone: due order, destination lines, dead destinations, budgets."""

from __future__ import annotations

from postroom.queue.schedule import (
    ACTIVE,
    PARKED,
    READY,
    TAKE_BUDGET,
    WAITING,
    Entry,
    Schedule,
)

T0 = 1_000_000.0


def schedule(limit: int = 2, interval: float = 60.0, give_up: float = 86400.0) -> Schedule:
    return Schedule(limit, interval, give_up)


def entry(at: float, dest: str = "isp.example", *, created: float = T0,
          held: bool = False) -> Entry:
    return Entry(at, created, dest, held)


def test_only_what_is_due_is_taken_in_time_order() -> None:
    s = schedule(limit=10)
    s.put("later", entry(T0 + 20))
    s.put("first", entry(T0 + 5))
    s.put("held", entry(T0, held=True))
    s.put("second", entry(T0 + 10))
    assert s.take_due(T0 + 10, room=10) == ["first", "second"]
    assert s.next_time() == T0 + 20
    assert s.entries["later"].where == WAITING and s.entries["first"].where == ACTIVE
    assert s.take_due(T0 + 100, room=10) == ["later"]  # "held" never comes due


def test_a_rescheduled_entry_leaves_a_stale_item_that_is_skipped() -> None:
    s = schedule()
    s.put("a", entry(T0 + 5))
    s.due_now("a")
    assert s.take_due(T0, room=10) == ["a"]
    s.finished("a", entry(T0 + 500))
    assert s.take_due(T0 + 100, room=10) == []  # the item for T0+5 is stale


def test_a_destination_at_its_limit_lines_up_the_rest() -> None:
    s = schedule(limit=2)
    for n in range(4):
        s.put(f"m{n}", entry(T0))
    s.put("other", entry(T0, "far.example"))
    assert s.take_due(T0, room=10) == ["m0", "m1", "other"]
    assert [s.entries[f"m{n}"].where for n in (2, 3)] == [READY, READY]
    s.finished("m0", None)
    assert s.next_time() == 0.0  # a slot is free and a line waits
    assert s.take_due(T0, room=10) == ["m2"]


def test_a_slot_released_early_goes_to_the_next_message_once() -> None:
    """release_slot: the deliveries are over, the removal is not; the destination's next
    message starts, and the attempt's end frees nothing twice."""
    s = schedule(limit=1)
    for n in range(3):
        s.put(f"m{n}", entry(T0))
    assert s.take_due(T0, room=10) == ["m0"]
    s.release_slot("m0")
    s.release_slot("m0")  # once only
    assert s.take_due(T0, room=10) == ["m1"]
    assert s.entries["m0"].where == ACTIVE and s.active == 2  # still counted in all
    s.finished("m0", None)
    assert s.take_due(T0, room=10) == []  # m1 holds the one slot
    s.finished("m1", None)
    assert s.take_due(T0, room=10) == ["m2"]


def test_the_total_room_is_respected() -> None:
    s = schedule(limit=10)
    for n in range(5):
        s.put(f"m{n}", entry(T0))
    assert len(s.take_due(T0, room=3)) == 3
    assert s.active == 3


def test_a_dead_destination_parks_its_mail_and_is_probed_once_per_interval() -> None:
    s = schedule(limit=5, interval=60.0)
    s.put("m0", entry(T0))
    assert s.take_due(T0, room=10) == ["m0"]
    s.destination_result("isp.example", down=True, now=T0 + 1, reason="refused")
    s.finished("m0", entry(T0 + 300))
    for n in range(1, 100):
        s.put(f"m{n}", entry(T0 + 2))
    assert s.take_due(T0 + 2, room=10) == []  # all parked, none tried
    assert s.counts()["parked"] == 99
    assert s.suspended("isp.example", "m1", T0 + 2) == "refused"
    assert s.next_time() == T0 + 61  # the probe
    [probe] = s.take_due(T0 + 61, room=10)
    assert s.suspended("isp.example", probe, T0 + 61) is None  # the probe is tried
    assert s.take_due(T0 + 61, room=10) == []  # one probe at a time
    s.destination_result("isp.example", down=False, now=T0 + 62)  # it answered
    s.finished(probe, None)
    taken = s.take_due(T0 + 62, room=100)
    assert len(taken) == 5  # the destination's limit; the rest lined up behind
    assert s.counts() == {"waiting": 1, "parked": 0, "ready": 93, "active": 5, "held": 0}


def test_parked_mail_past_its_lifetime_is_released_at_a_probe() -> None:
    s = schedule(limit=1, interval=60.0, give_up=3600.0)
    s.destination_result("isp.example", down=True, now=T0, reason="refused")
    s.put("b-probe", entry(T0))
    s.put("c-probe", entry(T0))
    s.put("z-old", entry(T0, created=T0 - 3000))  # expires at T0 + 600
    assert s.take_due(T0, room=10) == []
    assert {e.where for e in s.entries.values()} == {PARKED}
    for probe, at in (("b-probe", T0 + 61), ("c-probe", T0 + 122)):
        assert s.take_due(at, room=10) == [probe]  # the oldest parked probes
        s.destination_result("isp.example", down=True, now=at, reason="refused")
        s.finished(probe, entry(T0 + 9999))
    assert s.take_due(T0 + 700, room=10) == []  # the probe's sweep lines it up...
    assert s.entries["z-old"].where == READY
    assert s.take_due(T0 + 701, room=10) == ["z-old"]  # ...and it goes, to bounce


def test_flush_makes_everything_due_and_forgets_dead_destinations() -> None:
    s = schedule(limit=10)
    s.put("a", entry(T0 + 1000))
    s.put("b", entry(T0))
    s.destination_result("isp.example", down=True, now=T0, reason="refused")
    assert s.take_due(T0, room=10) == []
    s.flush()
    assert not s.is_dead("isp.example")
    assert sorted(s.take_due(T0, room=10)) == ["a", "b"]


def test_one_take_looks_at_a_bounded_number_of_items() -> None:
    s = schedule()
    s.destination_result("isp.example", down=True, now=T0, reason="refused")
    for n in range(TAKE_BUDGET * 2 + 10):
        s.put(f"m{n:06d}", entry(T0))
    assert s.take_due(T0 + 1, room=10) == []
    assert s.counts()["parked"] == TAKE_BUDGET
    assert s.next_time() <= T0 + 1  # more are due: the caller comes back at once
    s.take_due(T0 + 1, room=10)
    s.take_due(T0 + 1, room=10)
    assert s.counts()["parked"] == TAKE_BUDGET * 2 + 10
