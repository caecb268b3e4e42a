"""Bad logins against a real `postroom serve`: its memory stays bounded, and comes back.

Each password check is an argon2id hash of 64 MiB, for unknown users too. Two
server processes take 20 POP3 clients that all send a wrong password at the
same moment (half of them for users that do not exist). The server may run
only MAX_PASSWORD_CHECKS hashes at once in all its processes together, so its
memory (the resident size of every process, sampled during the load, and
each process's high-water mark) grows by at most that many hashes, and once
every client has its answer the memory is back where it was.
"""

from __future__ import annotations

import poplib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mailharness import LOOPBACK, Postroom

from postroom.server.passwords import MAX_PASSWORD_CHECKS

pytestmark = pytest.mark.interop

MIB = 1024 * 1024
HASH_MEMORY = 64 * MIB  # argon2-cffi's default memory_cost, which `postroom user add` uses
CLIENTS = 20
WORKERS = 2
# What else a burst of logins may cost: sessions, TLS-less buffers, the
# allocator's own bookkeeping.
SLACK = 48 * MIB


def server_pids(parent: int) -> list[int]:
    """`parent` and its children (the worker processes)."""
    pids = [parent]
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[1]) == parent:  # ppid
            pids.append(int(stat.parent.name))
    return pids


def memory(pids: list[int], key: str) -> int:
    """The sum of `key` (VmRSS, VmHWM) over the processes, in octets."""
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                total += int(line.split()[1]) * 1024
    return total


def bad_login(port: int, user: str, start: threading.Barrier, answers: list[bytes]) -> None:
    client = poplib.POP3(LOOPBACK, port, timeout=120)
    try:
        client.user(user)
        start.wait()
        try:
            client.pass_("not the password")
        except poplib.error_proto as exc:
            answers.append(bytes(exc.args[0]))
    finally:
        client.close()


def test_bad_logins_hold_a_bounded_amount_of_memory_and_give_it_back(
    postroom_factory: Callable[..., Postroom],
) -> None:
    if not Path("/proc/self/status").is_file():
        pytest.skip("needs /proc to read the server's memory")
    server = postroom_factory(
        listeners=("smtp", "pop3"), workers=WORKERS,
        extra_toml='[pop3]\nallow_plaintext_auth = true\nauth_failure_delay = "0.01s"\n',
    )
    port = server.ports["pop3"]
    pids = server_pids(server.pid)
    assert len(pids) == WORKERS
    # Warm up every process once (the dummy hash for unknown users is made on first use).
    for n in range(2 * WORKERS):
        bad_login(port, f"nobody{n}@corp.example", threading.Barrier(1), [])
    before = memory(pids, "VmRSS")

    answers: list[bytes] = []
    start = threading.Barrier(CLIENTS)
    clients = [threading.Thread(target=bad_login,
                                args=(port, "boss@corp.example" if n % 2 else
                                      f"nobody{n}@corp.example", start, answers))
               for n in range(CLIENTS)]
    for client in clients:
        client.start()
    peak = before
    while any(client.is_alive() for client in clients):
        peak = max(peak, memory(pids, "VmRSS"))
        time.sleep(0.01)  # the sampling rate, not a wait for an event
    after = memory(pids, "VmRSS")
    high_water = memory(pids, "VmHWM")

    assert len(answers) == CLIENTS and all(a.startswith(b"-ERR") for a in answers), answers
    bound = MAX_PASSWORD_CHECKS * HASH_MEMORY + SLACK
    assert peak - before <= bound, (
        f"sampled peak {peak / MIB:.0f} MiB, {((peak - before) / MIB):.0f} MiB over "
        f"{before / MIB:.0f} MiB before the load")
    # Each process's own peak may come at a different moment: at most the whole
    # bound each.
    assert high_water - before <= WORKERS * bound, (
        f"high-water marks {high_water / MIB:.0f} MiB, before {before / MIB:.0f} MiB")
    assert after - before <= SLACK, (
        f"{after / MIB:.0f} MiB after the load, {before / MIB:.0f} MiB before")
