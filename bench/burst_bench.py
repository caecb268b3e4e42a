"""Connection burst benchmark: N clients connect at once to postroom's SMTP listener and to
Postfix's, and each waits for its 220 greeting.

For each server in turn, one process opens N non-blocking connections as fast
as it can (each from a source address of its own in 127.0.0.0/8, as a burst
from many hosts), then waits on them all with epoll. A client that receives a
220 sends QUIT and closes. The script prints per server how many clients got
their 220, the time from the first connect to the last greeting, what became of
the others (another reply, closed, reset, still waiting), how many connections
took a second or more to complete (a SYN dropped and sent again), and the
kernel's own counters of the listen queue over the leg; then the ratio of the
times to the last greeting, postroom/postfix.

Run from the repository root, as root (Postfix's master needs it):
    python3 bench/burst_bench.py [--clients 10000]
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import json
import resource
import select
import shutil
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    LOOPBACK,
    HarnessError,
    Postroom,
    PrivatePostfix,
)

from smtp_bench import (  # noqa: E402 (beside this script)
    environment,
    fresh_name,
    load_average,
    new_work_folder,
)

DOMAIN = "bench.example"
# Clients come from 127.10.0.1 on, one address each (the whole of 127.0.0.0/8 is
# the loopback's): no per-client connection limit of either server applies.
FIRST_CLIENT_ADDRESS = ipaddress.IPv4Address("127.10.0.1")
# Linux: bind(2) leaves the port to connect(2), which may reuse it for another
# destination (include/uapi/linux/in.h).
IP_BIND_ADDRESS_NO_PORT = 24
# A connection that took this long to complete had its first SYN dropped (the
# kernel's first SYN retransmission comes after 1 s: TCP_TIMEOUT_INIT).
SYN_RETRY_SECONDS = 1.0
# Descriptors the bench needs besides one per client (epoll, logs, the harness).
SPARE_DESCRIPTORS = 64
# How long clients that sent QUIT wait for the server to close, after the last greeting.
QUIT_WAIT_SECONDS = 5.0
# The listen-queue counters of /proc/net/netstat (TcpExt) shown per leg.
KERNEL_COUNTERS = ("ListenOverflows", "ListenDrops", "SyncookiesSent", "SyncookiesRecv",
                   "SyncookiesFailed", "TCPReqQFullDoCookies", "TCPReqQFullDrop")

CONNECTING, GREETING, QUITTING, DONE = range(4)


@dataclass
class Client:
    sock: socket.socket
    started: float = 0.0
    connected: float | None = None
    greeted: float | None = None
    state: int = CONNECTING
    buffer: bytes = b""
    outcome: str = ""  # why it got no 220, when it did not


@dataclass
class Burst:
    name: str
    clients: int
    greeted: int
    seconds_to_last_greeting: float | None
    greeting_p50: float | None
    greeting_p99: float | None
    connects_issued_in: float
    slow_connects: int
    outcomes: dict[str, int] = field(default_factory=dict)
    kernel: dict[str, int] = field(default_factory=dict)


def raise_open_files_limit(needed: int) -> int:
    """The soft RLIMIT_NOFILE raised to the hard one; an error if that is below `needed`."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < needed:
        raise SystemExit(f"{needed} descriptors needed, the hard limit is {hard}: "
                         f"raise it (ulimit -Hn {needed}, as root) or ask for fewer clients")
    return hard


def kernel_counters() -> dict[str, int]:
    """TcpExt counters from /proc/net/netstat (the whole network namespace)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]),
                             strict=True))
            return {name: table.get(name, 0) for name in KERNEL_COUNTERS}
    return {}


def client_address(index: int) -> str:
    # Host parts 1-250 of each /24: no .0 or .255 in the list of sources.
    return str(FIRST_CLIENT_ADDRESS + (index // 250) * 256 + index % 250)


class Clients:
    """The burst's sockets, by descriptor, and the epoll instance that waits on them."""

    def __init__(self, count: int) -> None:
        self.by_fd: dict[int, Client] = {}
        for index in range(count):  # made before the clock: only connect(2) is timed
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((client_address(index), 0))
            self.by_fd[sock.fileno()] = Client(sock)
        self.poller = select.epoll(sizehint=count)
        self.open = 0  # clients still registered with the poller
        self.waiting = 0  # clients still waiting for their greeting

    def connect(self, port: int) -> None:
        for fd, client in self.by_fd.items():
            client.started = time.monotonic()
            code = client.sock.connect_ex((LOOPBACK, port))
            if code in (0, errno.EINPROGRESS):
                self.poller.register(fd, select.EPOLLOUT)
                self.open += 1
                self.waiting += 1
            else:
                client.state = DONE
                client.outcome = f"connect: {errno.errorcode.get(code, code)}"

    def run(self, deadline: float) -> None:
        """Until every client is greeted or failed (then QUIT_WAIT_SECONDS for the
        servers to close), or until `deadline`."""
        quit_deadline: float | None = None
        while self.open:
            now = time.monotonic()
            if self.waiting == 0 and quit_deadline is None:
                quit_deadline = now + QUIT_WAIT_SECONDS
            limit = quit_deadline if quit_deadline is not None else deadline
            if now >= limit:
                break
            for fd, events in self.poller.poll(min(1.0, limit - now)):
                self.step(fd, self.by_fd[fd], events)

    def step(self, fd: int, client: Client, events: int) -> None:
        now = time.monotonic()
        if client.state == CONNECTING:
            code = client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.finish(fd, client, f"connect: {errno.errorcode.get(code, code)}")
                return
            client.connected = now
            client.state = GREETING
            self.poller.modify(fd, select.EPOLLIN)
            return
        try:
            data = client.sock.recv(4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self.finish(fd, client, f"recv: {errno.errorcode.get(exc.errno or 0, exc)}")
            return
        if client.state == QUITTING:
            if not data:
                self.finish(fd, client, "")
            return
        if not data:
            self.finish(fd, client, "closed before a greeting")
            return
        client.buffer += data
        while b"\n" in client.buffer:
            line, client.buffer = client.buffer.split(b"\n", 1)
            if line[3:4] == b"-":
                continue  # a multiline greeting goes on
            if not line.startswith(b"220"):
                reply = line[:3].decode("ascii", "replace")
                self.finish(fd, client, f"reply {reply} instead of 220")
                return
            client.greeted = now
            client.state = QUITTING
            self.waiting -= 1
            try:
                client.sock.send(b"QUIT\r\n")
            except OSError:
                self.finish(fd, client, "")
            return

    def finish(self, fd: int, client: Client, outcome: str) -> None:
        if client.state in (CONNECTING, GREETING):
            client.outcome = outcome
            self.waiting -= 1
        client.state = DONE
        self.poller.unregister(fd)
        self.open -= 1

    def close(self) -> None:
        self.poller.close()
        for client in self.by_fd.values():
            if client.state == CONNECTING:
                client.outcome = "still connecting (SYN unanswered)"
            elif client.state == GREETING:
                client.outcome = "connected, no greeting"
            client.sock.close()


def burst(name: str, port: int, count: int, timeout: float) -> Burst:
    """`count` clients connect to LOOPBACK:`port` at once; each waits for its 220."""
    clients = Clients(count)
    before = kernel_counters()
    start = time.monotonic()
    clients.connect(port)
    issued = time.monotonic() - start
    try:
        clients.run(start + timeout)
    finally:
        clients.close()
    after = kernel_counters()
    everyone = list(clients.by_fd.values())
    greetings = sorted(c.greeted - start for c in everyone if c.greeted is not None)
    outcomes: dict[str, int] = {}
    for client in everyone:
        if client.greeted is None:
            outcomes[client.outcome] = outcomes.get(client.outcome, 0) + 1
    return Burst(
        name=name, clients=count, greeted=len(greetings),
        seconds_to_last_greeting=greetings[-1] if greetings else None,
        greeting_p50=statistics.median(greetings) if greetings else None,
        greeting_p99=nearest_rank(greetings, 99) if greetings else None,
        connects_issued_in=issued,
        slow_connects=sum(1 for c in everyone if c.connected is not None
                          and c.connected - c.started >= SYN_RETRY_SECONDS),
        outcomes=outcomes,
        kernel={key: after.get(key, 0) - before.get(key, 0) for key in KERNEL_COUNTERS},
    )


def nearest_rank(ordered: list[float], percent: int) -> float:
    return ordered[max(0, -(-len(ordered) * percent // 100) - 1)]


def wait_ready(server: Postroom, timeout: float = 30.0) -> None:
    """Every postroom process has started (the primary logs "postroom ready" last)."""
    deadline = time.monotonic() + timeout
    while "postroom ready" not in server.log_path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise HarnessError("postroom did not log 'postroom ready'")
        time.sleep(0.05)


def bench_postroom(args: argparse.Namespace, base: Path) -> Burst:
    # The connection limits (default 500 per process) raised to the burst: what is
    # measured is accepting, not the limit's 421.
    limits = (f"max_connections = {args.clients}\n"
              f"max_connections_per_client = {args.clients}\n")
    server = Postroom(fresh_name(base, "postroom"), hostname=f"mx.{DOMAIN}", domains=[DOMAIN],
                      users={}, aliases={}, extra_toml=limits)
    server.start()
    try:
        wait_ready(server)
        return burst("postroom", server.smtp_port, args.clients, args.timeout)
    finally:
        server.stop()


def bench_postfix(args: argparse.Namespace, base: Path) -> Burst:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Postfix leg: {reason}")
    # No reverse DNS lookup of each client (postroom makes none), so that the
    # resolver's timeouts are not measured.
    settings = {"smtpd_peername_lookup": "no"}
    if args.postfix_process_limit:
        settings["default_process_limit"] = str(args.postfix_process_limit)
    postfix = PrivatePostfix(fresh_name(base, "postfix"), myhostname=f"postfix.{DOMAIN}",
                             extra_main_cf=settings)
    postfix.start()
    try:
        return burst("postfix", postfix.port, args.clients, args.timeout)
    finally:
        postfix.stop()


LEGS = {"postroom": bench_postroom, "postfix": bench_postfix}


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report(result: Burst) -> None:
    print(f"{result.name}: {result.greeted} of {result.clients} got their 220; "
          f"last greeting after {seconds(result.seconds_to_last_greeting)} s "
          f"(p50 {seconds(result.greeting_p50)} s, p99 {seconds(result.greeting_p99)} s); "
          f"connects issued in {result.connects_issued_in:.3f} s, "
          f"{result.slow_connects} took >= {SYN_RETRY_SECONDS:.0f} s")
    for outcome, count in sorted(result.outcomes.items(), key=lambda item: -item[1]):
        print(f"  no 220: {count} {outcome}")
    counters = ", ".join(f"{k} {v}" for k, v in result.kernel.items() if v)
    print(f"  kernel (TcpExt, whole machine): {counters or 'no listen-queue events'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000,
                        help="connections opened at once (default 1000)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds a client waits for its 220 (default 60)")
    parser.add_argument("--postfix-process-limit", type=int, default=0,
                        help="Postfix's default_process_limit (default: Postfix's own, 100)")
    parser.add_argument("--legs", default=",".join(LEGS),
                        help=f"comma-separated subset of {','.join(LEGS)} (default: all)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = set(legs) - set(LEGS)
    if unknown:
        parser.error(f"unknown legs: {', '.join(sorted(unknown))}")
    limit = raise_open_files_limit(args.clients + SPARE_DESCRIPTORS)

    base = new_work_folder("postroom-burst-", args.workdir)
    env = environment()
    somaxconn = Path("/proc/sys/net/core/somaxconn").read_text().strip()
    syncookies = Path("/proc/sys/net/ipv4/tcp_syncookies").read_text().strip()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: {args.clients} clients at once, each waits {args.timeout:.0f} s at most "
          f"for its 220; bench open files limit {limit}; net.core.somaxconn={somaxconn}, "
          f"tcp_syncookies={syncookies}")
    print(f"load average before: {load_average()}")
    results: dict[str, Burst] = {}
    try:
        for leg in legs:
            results[leg] = LEGS[leg](args, base)
            report(results[leg])
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    print(f"load average after: {load_average()}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"{'server':<10}{'clients':>9}{'got 220':>9}{'last 220 s':>12}{'p50 s':>9}"
          f"{'p99 s':>9}{'>=1 s connects':>16}")
    for r in results.values():
        print(f"{r.name:<10}{r.clients:>9}{r.greeted:>9}"
              f"{seconds(r.seconds_to_last_greeting):>12}{seconds(r.greeting_p50):>9}"
              f"{seconds(r.greeting_p99):>9}{r.slow_connects:>16}")
    mine, theirs = results.get("postroom"), results.get("postfix")
    ratio = None
    if mine and theirs and mine.seconds_to_last_greeting and theirs.seconds_to_last_greeting:
        ratio = mine.seconds_to_last_greeting / theirs.seconds_to_last_greeting
        print()
        print(f"time to the last greeting postroom/postfix: {ratio:.2f} "
              f"(got 220: postroom {mine.greeted}, postfix {theirs.greeted} of {args.clients})")
    if args.json:
        args.json.write_text(json.dumps(
            {"environment": env, "clients": args.clients, "timeout": args.timeout,
             "somaxconn": somaxconn, "results": {k: asdict(v) for k, v in results.items()},
             "ratio_last_greeting": ratio},
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
