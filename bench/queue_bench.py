"""Deferred-queue benchmark: postroom and Postfix each hold N messages for a next hop that is down.

Each leg relays everything for bench.example to one next hop on loopback
where nothing listens (connections are refused), and is filled with N
messages of SIZE octets to one recipient there:

  postroom  `postroom serve` with a static route to the dead hop. Its queue is
            written straight into the queue folder before the server starts
            (filling it through submission would take most of the run): one
            queue file per message, each recipient deferred once with the
            hop's "Connection refused", its next attempt spread over the first
            retry interval, which is the state an SMTP fill leaves behind.
  postfix   a private Postfix (its own config and queue folders) with the dead
            hop as relayhost and its default retry settings (queue_run_delay
            and minimal_backoff_time 300 s, maximal_backoff_time 4000 s),
            filled over SMTP by Postfix's own smtp-source; its queue manager
            tries each message once and defers it, as in a real outage.

Then, for each leg:
  wait      CPU used by all of the server's processes over --wait seconds while
            nothing but the waiting happens, as a percentage of one core, and
            their memory at the end (the sum of their proportional set sizes,
            so shared pages count once, and the resident set of the scheduler's
            own process: postroom's primary, Postfix's qmgr);
  list      time to the first line and to the last of `postroom queue list` /
            `postqueue -p`;
  restart   the server stopped and started again with its full queue: time to
            its first 220 greeting (postroom: also until its log says the
            schedule is loaded);
  drain     the next hop comes back (Postfix's smtp-sink on its port), the queue
            is flushed (postroom: the control socket's "flush"; Postfix:
            `postqueue -f`), and the time until the queue is empty.

It prints each leg's figures and the same-run ratios postroom/postfix.

Run from the repository root, as root (Postfix's master needs it):
    python3 bench/queue_bench.py --messages 10000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    LOOPBACK,
    HarnessError,
    Postroom,
    PrivatePostfix,
    find_program,
    free_ports,
    smtp_banner,
)

from smtp_bench import environment, fresh_name, load_average, new_work_folder  # noqa: E402

DOMAIN = "bench.example"
RCPT = f"user@{DOMAIN}"
SENDER = "sender@isp.example"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
# Postfix's defaults, which the private instance's test settings override.
POSTFIX_RETRY = {"queue_run_delay": "300s", "minimal_backoff_time": "300s",
                 "maximal_backoff_time": "4000s"}


@dataclass
class Result:
    name: str
    messages: int
    fill_seconds: float = 0.0
    cpu_percent: float = 0.0  # of one core, all processes, while waiting
    rss_mib: float = 0.0  # all processes (sum of PSS)
    scheduler_rss_mib: float = 0.0  # postroom's primary / Postfix's qmgr
    list_first_line: float = 0.0
    list_seconds: float = 0.0
    list_lines: int = 0
    restart_greeting: float = 0.0
    restart_loaded: float = 0.0
    drain_seconds: float = 0.0


# -- processes ---------------------------------------------------------------------


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def tree(pid: int) -> list[int]:
    pids = [pid]
    for child in children_of(pid):
        pids += tree(child)
    return pids


def cpu_ticks(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])  # utime + stime


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    except OSError:
        return 0


def pss_bytes(pid: int) -> int:
    """Proportional set size: resident memory with shared pages divided among their
    sharers, so a sum over many processes counts each page once."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes(pid)


def process_named(root: int, name: str) -> int | None:
    for pid in tree(root):
        try:
            if Path(f"/proc/{pid}/comm").read_text().strip() == name:
                return pid
        except OSError:
            continue
    return None


def measure_wait(root: int, seconds: float) -> tuple[float, float]:
    """CPU % of one core used by the process tree of `root` over `seconds`, and its
    memory in MiB at the end (the sum of the processes' PSS)."""
    before = {pid: cpu_ticks(pid) for pid in tree(root)}
    time.sleep(seconds)
    after = {pid: cpu_ticks(pid) for pid in tree(root)}
    used = sum(after[pid] - before[pid] for pid in after if pid in before)
    rss = sum(pss_bytes(pid) for pid in after)
    return used / CLK_TCK / seconds * 100, rss / 2**20


def time_listing(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, int]:
    """Seconds to the first line of `command`'s output, to its end, and its lines."""
    began = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               env=env)
    assert process.stdout is not None
    first = process.stdout.readline()
    first_at = time.monotonic() - began
    lines = 1 if first else 0
    for _line in process.stdout:
        lines += 1
    process.wait()
    return first_at, time.monotonic() - began, lines


def wait_until(check: Callable[[], bool], timeout: float, what: str, pause: float = 0.5) -> float:
    began = time.monotonic()
    while not check():
        if time.monotonic() - began > timeout:
            raise HarnessError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(pause)
    return time.monotonic() - began


def count_files(folder: Path) -> int:
    total = 0
    for _dirpath, _dirs, files in os.walk(folder):
        total += len(files)
    return total


class SmtpSink:
    """Postfix's smtp-sink on the next hop's port: the hop comes back."""

    def __init__(self, port: int) -> None:
        program = find_program("smtp-sink")
        if program is None:
            raise SystemExit("smtp-sink is not installed (it ships with postfix)")
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        self.process = subprocess.Popen([program, *user, "-c", f"{LOOPBACK}:{port}", "1000"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: smtp_banner(port, timeout=1.0) is not None, 20, "smtp-sink", 0.05)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


# -- postroom --------------------------------------------------------------------------


def fill_postroom(queue_dir: Path, count: int, size: int, hop: int, interval: float) -> None:
    """Queue files as an SMTP fill leaves them: each message tried once at the dead hop
    and deferred, its next attempt within the first retry interval."""
    from postroom.ids import new_queue_id
    from postroom.queue.envelope import Envelope, Recipient
    from postroom.queue.queuefile import envelope_line

    messages = queue_dir / "messages"
    messages.mkdir(parents=True, exist_ok=True)
    body = make_message(size)
    now = time.time()
    error = f"connect to {LOOPBACK}[{LOOPBACK}]:{hop}: Connection refused"
    rng = random.Random(1)
    for _ in range(count):
        env = Envelope(
            queue_id=new_queue_id(), sender=SENDER, created=now, size=len(body),
            recipients=[Recipient(RCPT, state="deferred", attempts=1, last_error=error,
                                  dsn_status="4.4.1")],
            next_attempt=now + rng.uniform(0, interval), client=f"[{LOOPBACK}]",
        )
        (messages / env.queue_id).write_bytes(envelope_line(env) + body)


def make_message(size: int) -> bytes:
    head = (f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: queue bench\r\n"
            "Date: Fri, 27 Nov 2026 12:00:00 +0000\r\n\r\n").encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789ab\r\n"
    return head + (line * (max(0, size - len(head)) // len(line) + 1))[: max(0, size - len(head))]


def loaded(server: Postroom, starts: int) -> bool:
    log = server.log_path.read_text(errors="replace")
    section = log.split(f"--- start {starts} ---", 1)[-1]
    return re.search(r"queue: started with \d+", section) is not None


def leg_postroom(args: argparse.Namespace, base: Path, hop: int) -> Result:
    result = Result("postroom", args.messages)
    server = Postroom(fresh_name(base, "postroom"), hostname="mail.isp.example",
                      domains=["isp.example"], users={}, aliases={}, listeners=("smtp",),
                      extra_toml=f'[routes]\n"{DOMAIN}" = "{LOOPBACK}:{hop}"\n')
    server.setup()
    began = time.monotonic()
    fill_postroom(server.data / "queue", args.messages, args.size, hop, 60.0)
    result.fill_seconds = time.monotonic() - began
    print(f"  postroom: {args.messages} queue files written in {result.fill_seconds:.1f}s",
          flush=True)
    try:
        server.start(timeout=120)  # the first start also makes its TLS certificate
        wait_until(lambda: loaded(server, server.starts), args.timeout, "the schedule")
        time.sleep(args.settle)
        result.cpu_percent, result.rss_mib = measure_wait(server.pid, args.wait)
        result.scheduler_rss_mib = rss_bytes(server.pid) / 2**20
        print(f"  postroom: waiting {result.cpu_percent:.2f}% CPU, {result.rss_mib:.0f} MiB "
              f"(primary {result.scheduler_rss_mib:.0f} MiB)", flush=True)
        if "list" in args.steps:
            result.list_first_line, result.list_seconds, result.list_lines = time_listing(
                [sys.executable, "-m", "postroom", "--data", str(server.data), "queue",
                 "list"], server.env())
            print(f"  postroom: queue list first line {result.list_first_line:.2f}s, "
                  f"all {result.list_seconds:.2f}s", flush=True)
        if "restart" in args.steps:
            server.stop(timeout=60)
            began = time.monotonic()
            server.start(timeout=120)
            result.restart_greeting = time.monotonic() - began
            wait_until(lambda: loaded(server, server.starts), args.timeout, "the schedule",
                       0.05)
            result.restart_loaded = time.monotonic() - began
            print(f"  postroom: restarted: greeting after {result.restart_greeting:.2f}s, "
                  f"schedule loaded after {result.restart_loaded:.2f}s", flush=True)
        if "drain" not in args.steps:
            return result
        sink = SmtpSink(hop)
        try:
            from postroom.control import FLUSH, tell_server

            messages = server.data / "queue" / "messages"
            began = time.monotonic()
            tell_server(server.data, request=FLUSH)
            wait_until(lambda: not any(os.scandir(messages)), args.timeout, "the drain")
            result.drain_seconds = time.monotonic() - began
        finally:
            sink.stop()
        print(f"  postroom: drained in {result.drain_seconds:.1f}s", flush=True)
    finally:
        server.stop(timeout=60)
    return result


# -- postfix ---------------------------------------------------------------------------


def leg_postfix(args: argparse.Namespace, base: Path, hop: int) -> Result:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Postfix leg: {reason}")
    source = find_program("smtp-source")
    if source is None:
        raise SystemExit("smtp-source is not installed (it ships with postfix)")
    result = Result("postfix", args.messages)
    postfix = PrivatePostfix(fresh_name(base, "postfix"), myhostname="mail.isp.example",
                             relayhost=(LOOPBACK, hop), extra_main_cf=POSTFIX_RETRY)
    queue = postfix.queue_dir
    postfix.start()
    try:
        began = time.monotonic()
        subprocess.run([source, "-s", "20", "-m", str(args.messages), "-l", str(args.size),
                        "-f", SENDER, "-t", RCPT, f"{LOOPBACK}:{postfix.port}"],
                       check=True, stdout=subprocess.DEVNULL, timeout=args.timeout)

        def settled() -> bool:
            return (count_files(queue / "deferred") >= args.messages
                    and count_files(queue / "active") == 0
                    and count_files(queue / "incoming") == 0)

        wait_until(settled, args.timeout, "Postfix to defer every message", 1.0)
        result.fill_seconds = time.monotonic() - began
        print(f"  postfix: {args.messages} messages taken and deferred in "
              f"{result.fill_seconds:.1f}s", flush=True)
        master = postfix.master_pid()
        assert master is not None
        time.sleep(args.settle)
        result.cpu_percent, result.rss_mib = measure_wait(master, args.wait)
        qmgr = process_named(master, "qmgr")
        result.scheduler_rss_mib = rss_bytes(qmgr) / 2**20 if qmgr else 0.0
        print(f"  postfix: waiting {result.cpu_percent:.2f}% CPU, {result.rss_mib:.0f} MiB "
              f"(qmgr {result.scheduler_rss_mib:.0f} MiB)", flush=True)
        postqueue = find_program("postqueue")
        assert postqueue is not None
        if "list" in args.steps:
            result.list_first_line, result.list_seconds, result.list_lines = time_listing(
                [postqueue, "-c", str(postfix.config_dir), "-p"])
            print(f"  postfix: postqueue -p first line {result.list_first_line:.2f}s, "
                  f"all {result.list_seconds:.2f}s", flush=True)
        if "restart" in args.steps:
            postfix.stop()
            began = time.monotonic()
            postfix.start(timeout=120)
            result.restart_greeting = time.monotonic() - began
            print(f"  postfix: restarted: greeting after {result.restart_greeting:.2f}s",
                  flush=True)
        if "drain" not in args.steps:
            return result
        sink = SmtpSink(hop)
        try:
            began = time.monotonic()
            subprocess.run([postqueue, "-c", str(postfix.config_dir), "-f"], check=True,
                           timeout=60)
            wait_until(lambda: count_files(queue / "deferred") == 0
                       and count_files(queue / "active") == 0, args.timeout, "the drain")
            result.drain_seconds = time.monotonic() - began
        finally:
            sink.stop()
        print(f"  postfix: drained in {result.drain_seconds:.1f}s", flush=True)
    finally:
        postfix.stop()
    return result


# -- the run ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=10_000, help="queued messages (10000)")
    parser.add_argument("--size", type=int, default=2048, help="octets per message (2048)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds of waiting over which CPU is measured (60)")
    parser.add_argument("--settle", type=float, default=5.0,
                        help="seconds after the fill before the measurement (5)")
    parser.add_argument("--legs", default="postroom,postfix", help="postroom,postfix")
    parser.add_argument("--steps", default="list,restart,drain",
                        help="what follows the wait: a subset of list,restart,drain (all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed per step")
    parser.add_argument("--workdir", type=Path, help="folder for data (default: /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    args.steps = {step.strip() for step in args.steps.split(",") if step.strip()}
    if args.steps - {"list", "restart", "drain"}:
        parser.error("--steps takes list, restart and drain")
    runners = {"postroom": leg_postroom, "postfix": leg_postfix}
    if set(legs) - set(runners):
        parser.error(f"unknown legs: {', '.join(sorted(set(legs) - set(runners)))}")
    base = new_work_folder("postroom-queue-bench-", args.workdir)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: {args.messages} deferred messages of {args.size} octets, next hop down; "
          f"CPU over {args.wait:g}s of waiting")
    print(f"load average before: {load_average()}", flush=True)
    results: dict[str, Result] = {}
    try:
        for leg in legs:
            hop = free_ports(1)[0]  # a port where nothing listens: the dead hop
            results[leg] = runners[leg](args, base, hop)
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    print(f"load average after: {load_average()}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    print()
    columns = (("CPU %", "cpu_percent", 2), ("PSS MiB", "rss_mib", 0),
               ("sched MiB", "scheduler_rss_mib", 0), ("list 1st s", "list_first_line", 2),
               ("list s", "list_seconds", 2), ("restart s", "restart_greeting", 2),
               ("drain s", "drain_seconds", 1))
    print(f"{'leg':<10}{'msgs':>9}" + "".join(f"{h:>12}" for h, _f, _d in columns))
    for r in results.values():
        print(f"{r.name:<10}{r.messages:>9}"
              + "".join(f"{getattr(r, f):>12.{d}f}" for _h, f, d in columns))
    ratios: dict[str, float] = {}
    if "postroom" in results and "postfix" in results:
        mine, theirs = results["postroom"], results["postfix"]
        print()
        for heading, name, _digits in columns:
            if getattr(theirs, name) > 0:
                ratios[heading] = getattr(mine, name) / getattr(theirs, name)
                print(f"{heading} postroom/postfix: {ratios[heading]:.2f}")
        if mine.drain_seconds and theirs.drain_seconds:
            print(f"drain rate: postroom {mine.messages / mine.drain_seconds:.0f} msg/s, "
                  f"postfix {theirs.messages / theirs.drain_seconds:.0f} msg/s")
    if args.json:
        args.json.write_text(json.dumps({"environment": env, "messages": args.messages,
                                         "results": {k: asdict(v) for k, v in results.items()},
                                         "ratios": ratios}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
