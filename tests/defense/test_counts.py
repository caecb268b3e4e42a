"""The Anvil's counts, in one process and across its socket (defense.anvil)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import pytest

from postroom.defense.anvil import Anvil, AnvilServer, Limits, RemoteCounters, client_key, listen


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_clients_are_counted_by_address_and_ipv6_by_their_64() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") \
        == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")


def test_concurrent_connections_are_limited_and_given_back() -> None:
    anvil = Anvil(Limits(connection_count=2))
    assert anvil.connect("192.0.2.1") == anvil.connect("192.0.2.1") == ""
    assert anvil.connect("192.0.2.1") == "connection_count 3"
    assert anvil.connect("192.0.2.2") == ""  # another client has its own count
    anvil.disconnect("192.0.2.1")
    assert anvil.connect("192.0.2.1") == ""


def test_rates_count_per_minute_and_start_over() -> None:
    clock = Clock()
    anvil = Anvil(Limits(connection_rate=3, message_rate=2), clock=clock)
    for _ in range(3):
        assert anvil.connect("192.0.2.1") == ""
        anvil.disconnect("192.0.2.1")
    assert anvil.connect("192.0.2.1") == "connection_rate 4"
    assert anvil.rate("message_rate", "192.0.2.1") == anvil.rate("message_rate", "192.0.2.1") \
        == ""
    assert anvil.rate("message_rate", "192.0.2.1") == "message_rate 3"
    assert anvil.rate("recipient_rate", "192.0.2.1") == ""  # 0: no limit
    clock.now += 60
    assert anvil.connect("192.0.2.1") == ""
    assert anvil.rate("message_rate", "192.0.2.1") == ""


def test_failed_logins_lock_the_address_not_the_account() -> None:
    clock = Clock()
    anvil = Anvil(Limits(auth_failure_limit=3, first_delay=1), clock=clock)
    delays = [anvil.auth_failed("192.0.2.66", "boss@corp.example") for _ in range(3)]
    assert [d for d, _locked in delays] == [1, 2, 4]
    assert [locked for _d, locked in delays] == [False, False, True]
    assert anvil.auth_locked("192.0.2.66")
    assert not anvil.auth_locked("192.0.2.1")  # the real user's address
    anvil.auth_succeeded("192.0.2.1", "boss@corp.example")
    assert anvil.auth_locked("192.0.2.66")  # a good login elsewhere unlocks nothing
    clock.now += 15 * 60 + 1
    assert not anvil.auth_locked("192.0.2.66")


def test_workers_share_one_anvil_and_a_dead_worker_gives_its_connections_back() -> None:
    """Two worker processes' counters reach the primary's Anvil over its socket; when a
    worker dies, the connections it held are no longer counted."""
    listener = listen()
    if listener is None:
        pytest.skip("no Unix SOCK_SEQPACKET here")
    address = listener.getsockname()
    anvil = Anvil(Limits(connection_count=2))
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # a worker that takes one slot and then waits to be killed
        code = 1
        try:
            async def worker() -> None:
                counters = RemoteCounters(address, 1.0)
                counters.start()
                assert await counters.connect("192.0.2.9") == ""
                os.write(ready_w, b"x")
                await asyncio.sleep(3600)
            asyncio.run(worker())
        finally:
            os._exit(code)

    async def primary() -> tuple[str, str, str]:
        server = AnvilServer(anvil, listener)
        server.start()
        loop = asyncio.get_running_loop()
        got = loop.create_future()
        loop.add_reader(ready_r, lambda: got.done() or got.set_result(os.read(ready_r, 1)))
        await got
        loop.remove_reader(ready_r)
        mine = RemoteCounters(address, 1.0)
        mine.start()
        second = await mine.connect("192.0.2.9")  # the worker holds one: this is two
        third = await mine.connect("192.0.2.9")
        os.kill(pid, signal.SIGKILL)
        await asyncio.to_thread(os.waitpid, pid, 0)
        while anvil.connections["192.0.2.9"] > 1:  # the primary sees the worker's EOF
            await asyncio.sleep(0.01)
        after = await mine.connect("192.0.2.9")
        mine.close()
        server.close()
        return second, third, after

    try:
        second, third, after = asyncio.run(asyncio.wait_for(primary(), 20))
    finally:
        os.close(ready_r)
        os.close(ready_w)
    assert (second, third, after) == ("", "connection_count 3", "")


def test_a_worker_whose_primary_is_gone_lets_clients_through() -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.bind("")
    address = sock.getsockname()
    sock.close()

    async def scenario() -> tuple[str, float, bool]:
        counters = RemoteCounters(address, 2.0)
        counters.start()
        return (await counters.connect("192.0.2.1"),
                (await counters.auth_failed("192.0.2.1", "u"))[0],
                await counters.auth_locked("192.0.2.1"))

    assert asyncio.run(scenario()) == ("", 2.0, False)
