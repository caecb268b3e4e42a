"""Failed logins are slowed per client address and per account."""

from postroom.policy.auth import AuthThrottle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_delay_doubles_per_failure_up_to_the_cap() -> None:
    throttle = AuthThrottle(first_delay=2, max_delay=15, clock=Clock())
    delays = [throttle.failed("192.0.2.1", "boss@corp.example") for _ in range(6)]
    assert delays == [2, 4, 8, 15, 15, 15]


def test_counted_per_address_across_accounts_and_per_account_across_addresses() -> None:
    throttle = AuthThrottle(first_delay=1, max_delay=100, clock=Clock())
    for n in range(3):
        throttle.failed("192.0.2.1", f"user{n}@corp.example")
    assert throttle.failed("192.0.2.1", "fresh@corp.example") == 8  # 4th from that address
    for n in range(3):
        throttle.failed(f"198.51.100.{n}", "boss@corp.example")
    assert throttle.failed("203.0.113.9", "BOSS@corp.example") == 8  # 4th on that account


def test_failures_are_forgotten_and_success_clears_the_account() -> None:
    clock = Clock()
    throttle = AuthThrottle(first_delay=1, max_delay=100, clock=clock)
    throttle.failed("192.0.2.1", "boss@corp.example")
    throttle.failed("192.0.2.1", "boss@corp.example")
    clock.now += 16 * 60
    assert throttle.failed("192.0.2.2", "boss@corp.example") == 1
    throttle.succeeded("192.0.2.2", "boss@corp.example")
    assert throttle.failed("192.0.2.3", "boss@corp.example") == 1


def test_a_long_guessing_run_stays_at_the_cap() -> None:
    """More failures than a float's exponent can double (2**1024) keep the cap; also
    with the delay turned off."""
    for first in (2.0, 0.0):
        throttle = AuthThrottle(first_delay=first, max_delay=15, clock=Clock())
        delays = [throttle.failed("192.0.2.1", "boss@corp.example") for _ in range(1100)]
        assert delays[-1] == min(first * 8, 15)
