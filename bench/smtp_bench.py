"""SMTP receive benchmark: postroom beside Postfix and aiosmtpd's Sink, all fed by smtp-source.

One run starts, in turn, on free loopback ports:
  (a) postroom, its SMTP listener delivering to a Maildir;
  (b) a private Postfix instance delivering to a Maildir on the same disk
      (virtual(8), which fsyncs each file, as Postfix does by default);
  (c) aiosmtpd's Sink handler, which stores nothing (a Python upper bound);
  (d) bench/fsync_sink.py, a minimal one-process asyncio sink that fsyncs each
      message into a Maildir before its 250 (the ceiling of the simple design);
  (e) postroom again with its mail checks on (SPF, DKIM, ARC, DMARC, iprev; the
      sender's SPF, DMARC and PTR records answered by a DNS server on loopback),
      where leg (a) runs with them off ([dmarc] check = false).
Each gets the same smtp-source load (Postfix's own load generator). For (a) and
(b) the clock stops when the last message is in the Maildir's new/, for (c)
when smtp-source exits. Then a fresh postroom receives one large message while
its resident memory is watched (VmRSS/VmHWM from /proc/PID/status).

Run from the repository root, as root (Postfix's master needs it):
    python bench/smtp_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    LOOPBACK,
    HarnessError,
    Postroom,
    PrivatePostfix,
    count_new,
    find_program,
    free_ports,
    smtp_banner,
)

from newfiles import NewFiles  # noqa: E402 (beside this script)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "mailauth"))
from dnszone import serve_dns  # noqa: E402 (the test DNS server, on loopback)

DOMAIN = "bench.example"
USER = "user"
RCPT = f"{USER}@{DOMAIN}"
SENDER = "load@source.example"
MIB = 1024 * 1024


@dataclass
class Throughput:
    name: str
    messages: int
    seconds: float
    delivered: int
    note: str = ""

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


@dataclass
class MemoryGrowth:
    message_octets: int
    rss_before_kib: int
    hwm_after_kib: int
    sampled_peak_kib: int
    hwm_was_reset: bool
    seconds: float
    children: int = 0
    peak_kib: int = field(init=False)
    growth_kib: int = field(init=False)

    def __post_init__(self) -> None:
        # VmHWM counts only after clear_refs reset it; else it may be a startup peak.
        self.peak_kib = max(self.sampled_peak_kib,
                            self.hwm_after_kib if self.hwm_was_reset else 0)
        self.growth_kib = max(0, self.peak_kib - self.rss_before_kib)


def smtp_source_command(args: argparse.Namespace, port: int) -> list[str]:
    program = find_program("smtp-source")
    if program is None:
        raise SystemExit("smtp-source (from the postfix package) is not installed")
    return [
        program,
        "-s", str(args.sessions),
        "-m", str(args.messages),
        "-l", str(args.size),
        "-f", SENDER,
        "-t", RCPT,
        f"{LOOPBACK}:{port}",
    ]


def drive(
    name: str, args: argparse.Namespace, port: int, maildir: Path | None, timeout: float
) -> Throughput:
    """Run smtp-source against `port`; stop the clock when `maildir` holds every message
    (or, without a Maildir, when smtp-source exits)."""
    command = smtp_source_command(args, port)
    already = count_new(maildir) if maildir is not None else 0
    target = already + args.messages
    arrivals = NewFiles(maildir / "new") if maildir is not None else None
    start = time.monotonic()
    source = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finished_at: float | None = None
    deadline = start + timeout
    try:
        while time.monotonic() < deadline:
            if arrivals is None:
                if source.poll() is not None:
                    finished_at = time.monotonic()
                    break
                time.sleep(0.005)
                continue
            arrivals.wait(0.05)  # sleeps in the kernel until files arrive
            if len(arrivals.known) >= target:
                finished_at = time.monotonic()
                break
            if source.poll() is not None and source.returncode != 0:
                break
    finally:
        if arrivals is not None:
            arrivals.close()
    try:
        _, err = source.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        source.kill()
        _, err = source.communicate()
    if source.returncode != 0:
        raise HarnessError(f"{name}: smtp-source exited {source.returncode}: {err.decode()}")
    delivered = (count_new(maildir) - already) if maildir is not None else args.messages
    if finished_at is None:
        raise HarnessError(
            f"{name}: only {delivered} of {args.messages} messages arrived within {timeout}s"
        )
    note = err.decode(errors="replace").strip().splitlines()
    return Throughput(name, args.messages, finished_at - start, delivered,
                      note=note[-1] if note else "")


def bench_postroom(args: argparse.Namespace, base: Path, name: str = "postroom",
                   extra_toml: str = "[dmarc]\ncheck = false\n") -> Throughput:
    server = Postroom(fresh_name(base, name), hostname=f"mx.{DOMAIN}", domains=[DOMAIN],
                      users={RCPT: "bench-password"}, aliases={}, max_message_size="64M",
                      extra_toml=extra_toml)
    server.start()
    try:
        return drive(name, args, server.smtp_port, server.maildir(RCPT), args.timeout)
    finally:
        server.stop()


# The sender's records for leg (e): SPF passes 127.0.0.1, DMARC asks p=reject, and
# 127.0.0.1 has a forward-confirmed name (iprev pass).
SENDER_DOMAIN = SENDER.partition("@")[2]
CHECKED_ZONE = {
    (SENDER_DOMAIN, "TXT"): ["v=spf1 ip4:127.0.0.1 -all"],
    (f"_dmarc.{SENDER_DOMAIN}", "TXT"): ["v=DMARC1; p=reject"],
    ("1.0.0.127.in-addr.arpa", "PTR"): [f"mail.{SENDER_DOMAIN}."],
    (f"mail.{SENDER_DOMAIN}", "A"): ["127.0.0.1"],
}


def bench_postroom_checked(args: argparse.Namespace, base: Path) -> Throughput:
    with serve_dns(dict(CHECKED_ZONE)) as dns:
        checks = (f'[dns]\nnameservers = ["{LOOPBACK}:{dns.port}"]\n\n'
                  "[dmarc]\nignore_clients = []\n")
        return bench_postroom(args, base, "postroom-checks", checks)


def bench_postroom_metrics(args: argparse.Namespace, base: Path) -> Throughput:
    """postroom with its metrics endpoint on: what counting costs the intake."""
    extra = f'[dmarc]\ncheck = false\n\n[metrics]\nlisten = "{LOOPBACK}:{free_ports(1)[0]}"\n'
    return bench_postroom(args, base, "postroom-metrics", extra)


def bench_postfix(args: argparse.Namespace, base: Path) -> Throughput:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Postfix leg: {reason}")
    postfix = PrivatePostfix(fresh_name(base, "postfix"), myhostname=f"postfix.{DOMAIN}",
                             mailbox_domain=DOMAIN, mailbox_users=[USER])
    postfix.start()
    try:
        return drive("postfix", args, postfix.port, postfix.mailbox_path(USER), args.timeout)
    finally:
        postfix.stop()


def bench_sink(args: argparse.Namespace, base: Path) -> Throughput:
    port = free_ports(1)[0]
    command = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{LOOPBACK}:{port}",
               "-c", "aiosmtpd.handlers.Sink"]
    return run_sink("aiosmtpd", command, args, base, port, None)


def bench_fsync_sink(args: argparse.Namespace, base: Path) -> Throughput:
    port = free_ports(1)[0]
    folder = fresh_name(base, "fsync-sink")
    command = [sys.executable, str(Path(__file__).with_name("fsync_sink.py")), str(port),
               str(folder)]
    return run_sink("fsync-sink", command, args, base, port, folder)


def run_sink(
    name: str, command: list[str], args: argparse.Namespace, base: Path, port: int,
    maildir: Path | None,
) -> Throughput:
    """Start a one-process sink (`command`, logging to base/NAME.log), drive it, stop it."""
    log_path = base / f"{name}.log"
    log = open(log_path, "wb")  # noqa: SIM115 (closed in finally)
    sink = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while smtp_banner(port, timeout=1.0) is None:
            if sink.poll() is not None or time.monotonic() > deadline:
                raise HarnessError(f"{name} did not start: {log_path.read_text()}")
            time.sleep(0.05)
        return drive(name, args, port, maildir, args.timeout)
    finally:
        sink.terminate()
        try:
            sink.wait(10)
        except subprocess.TimeoutExpired:
            sink.kill()
            sink.wait()
        log.close()


def proc_status_kib(pid: int, key: str) -> int:
    """A "VmRSS:   1234 kB"-style value from /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def child_count(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += len((task / "children").read_text().split())
        except OSError:
            pass
    return total


def big_message(octets: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: big\r\n"
        "Message-ID: <big@source.example>\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789ab\r\n"
    body = line * ((octets - len(head)) // len(line) + 1)
    return head + body[: octets - len(head)]


def bench_memory(args: argparse.Namespace, base: Path) -> MemoryGrowth:
    # One process, so that the process measured is the one that receives the message.
    server = Postroom(fresh_name(base, "postroom-memory"), hostname=f"mx.{DOMAIN}",
                      domains=[DOMAIN], users={RCPT: "bench-password"}, aliases={},
                      max_message_size="64M", workers=1)
    server.start()
    try:
        # Warm up every code path once with a small message, so the measurement
        # shows what the large message costs, not first-use imports.
        with smtplib.SMTP(LOOPBACK, server.smtp_port, timeout=60) as client:
            client.sendmail(SENDER, [RCPT], big_message(64 * 1024))
        server.wait_for_messages(RCPT, 1, timeout=30)
        message = big_message(args.big_mb * 1_000_000)
        pid = server.pid
        time.sleep(0.5)
        rss_before = proc_status_kib(pid, "VmRSS")
        # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
        try:
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        peak = [rss_before]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], proc_status_kib(pid, "VmRSS"))
                except (OSError, KeyError):
                    return
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.monotonic()
        with smtplib.SMTP(LOOPBACK, server.smtp_port, timeout=300) as client:
            client.sendmail(SENDER, [RCPT], message)
        if len(server.wait_for_messages(RCPT, 2, timeout=120)) < 2:
            raise HarnessError("the large message was not delivered")
        seconds = time.monotonic() - start
        done.set()
        sampler.join()
        return MemoryGrowth(
            message_octets=len(message),
            rss_before_kib=rss_before,
            hwm_after_kib=proc_status_kib(pid, "VmHWM"),
            sampled_peak_kib=peak[0],
            hwm_was_reset=hwm_reset,
            seconds=seconds,
            children=child_count(pid),
        )
    finally:
        server.stop()


THROUGHPUT_LEGS = {
    "postroom": bench_postroom,
    "postroom-checks": bench_postroom_checked,
    "postroom-metrics": bench_postroom_metrics,
    "postfix": bench_postfix,
    "aiosmtpd": bench_sink,
    "fsync-sink": bench_fsync_sink,
}
LEGS = (*THROUGHPUT_LEGS, "memory")


def round_ratios(mine: list[float], theirs: list[float]) -> list[float]:
    """mine/theirs of the rates of each round, sorted. The legs of a round run back
    to back, so these compare like with like, and their median is steadier than
    the ratio of two best rounds."""
    return sorted(m / t for m, t in zip(mine, theirs, strict=True) if t > 0)


def ratio_line(label: str, best: float, within: list[float] | None) -> str:
    """"label: best", and the median and range of the per-round ratios when there
    are several."""
    line = f"{label}: {best:.2f}"
    if within and len(within) > 1:
        line += (f" (best rounds); per round: median {statistics.median(within):.2f}, "
                 f"range {within[0]:.2f}-{within[-1]:.2f}")
    return line


def default_workdir() -> str | None:
    """Where a run keeps its data when --workdir is not given: /var/tmp, else the
    system's temporary folder.

    Not /tmp: on many systems it is a tmpfs (Debian 13, Fedora), where fsync
    costs nothing and a durability benchmark measures nothing; and where it is
    on disk, everything that cleans up after itself (test runs, earlier
    benchmark runs) deletes there, which on ext4 without a journal makes every
    new file cost a walk past the freed inodes (see bench/README.md).
    /var/tmp is on disk by the FHS and sees little of that.
    """
    candidate = Path("/var/tmp")
    if candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK):
        return str(candidate)
    return None


def new_work_folder(prefix: str, workdir: Path | None) -> Path:
    """A fresh folder for one run, in `workdir` or default_workdir(), whose
    subfolders get block groups of their own (spread_children)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=workdir or default_workdir()))
    spread_children(base)
    return base


def fresh_name(folder: Path, name: str) -> Path:
    """`folder`/NAME-<random>: a folder name this run alone uses.

    Where the parent has the TOPDIR flag (spread_children), ext4's Orlov
    allocator starts its search for the new folder's block group at a hash of
    the folder's name and takes the first group with the fewest folders. A
    fixed name (round1, postroom-mx) would then land where the same name of the
    previous run did, in a group emptied by that run's cleanup a minute ago:
    every file the new leg creates would walk past those thousands of recently
    freed inodes (bench/README.md)."""
    return folder / f"{name}-{secrets.token_hex(4)}"


def spread_children(folder: Path) -> None:
    """Ask ext4 to place each folder made in `folder` in a block group of its own
    (the "top of directory hierarchy" flag, chattr +T, which the Orlov allocator
    honours), so that what one leg deletes does not slow the file creations of
    the next (bench/README.md). Best effort: elsewhere it changes nothing."""
    try:
        import fcntl
        import struct

        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        return
    try:
        get, put, topdir = 0x80086601, 0x40086602, 0x00020000  # FS_IOC_{GET,SET}FLAGS
        flags = struct.unpack("i", fcntl.ioctl(fd, get, struct.pack("i", 0)))[0]
        fcntl.ioctl(fd, put, struct.pack("i", flags | topdir))  # the kernel reads an int
    except OSError:
        pass
    finally:
        os.close(fd)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "unknown"


def environment() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    postconf = find_program("postconf")
    postfix_version = ""
    if postconf:
        result = subprocess.run([postconf, "-d", "-h", "mail_version"], capture_output=True,
                                text=True, check=False)
        postfix_version = result.stdout.strip()
    return {
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "postfix": postfix_version,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    parser.add_argument("--big-mb", type=int, default=50, help="large message size in MB")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per leg")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the throughput legs this many times, alternating; "
                             "the best round of each counts (default 1)")
    parser.add_argument("--legs", default=",".join(LEGS),
                        help=f"comma-separated subset of {','.join(LEGS)} (default: all)")
    args = parser.parse_args(argv)
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = set(legs) - set(LEGS)
    if unknown:
        parser.error(f"unknown legs: {', '.join(sorted(unknown))}")

    base = new_work_folder("postroom-bench-", args.workdir)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: smtp-source -s {args.sessions} -m {args.messages} -l {args.size}, "
          f"{args.rounds} round(s), legs alternating")
    print(f"load average before: {load_average()}")
    rounds: dict[str, list[Throughput]] = {}
    memory: MemoryGrowth | None = None
    try:
        for number in range(1, args.rounds + 1):
            folder = fresh_name(base, f"round{number}")
            folder.mkdir()
            spread_children(folder)
            for leg in legs:
                if leg in THROUGHPUT_LEGS:
                    rounds.setdefault(leg, []).append(THROUGHPUT_LEGS[leg](args, folder))
        if "memory" in legs:
            memory = bench_memory(args, base)
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    print(f"load average after: {load_average()}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    # Best round per leg: noise from other work on the machine only ever slows a leg.
    best = {leg: min(runs, key=lambda r: r.seconds) for leg, runs in rounds.items()}
    print()
    print(f"{'server':<18}{'messages':>10}{'seconds':>10}{'msg/s':>10}   all rounds (s)")
    for leg, r in best.items():
        every = " ".join(f"{run.seconds:.2f}" for run in rounds[leg])
        print(f"{r.name:<18}{r.messages:>10}{r.seconds:>10.2f}{r.rate:>10.1f}   {every}")
    rates = {leg: r.rate for leg, r in best.items()}
    pairs = [("postroom", other) for other in ("postfix", "aiosmtpd", "fsync-sink")]
    pairs += [("postroom-checks", other) for other in ("postfix", "postroom")]
    ratios = {
        f"{mine}/{other}": rates[mine] / rates[other]
        for mine, other in pairs if mine in rates and rates.get(other)
    }
    per_round = {
        f"{mine}/{other}": round_ratios([r.rate for r in rounds[mine]],
                                        [r.rate for r in rounds[other]])
        for mine, other in pairs if mine in rounds and other in rounds
    }
    for other in ("postfix", "postroom"):  # the cost of counting, in the same run
        if "postroom-metrics" in rates and rates.get(other):
            label = f"postroom-metrics/{other}"
            ratios[label] = rates["postroom-metrics"] / rates[other]
            per_round[label] = round_ratios([r.rate for r in rounds["postroom-metrics"]],
                                            [r.rate for r in rounds[other]])
    if ratios:
        print()
    for label, value in ratios.items():
        print(ratio_line(label, value, per_round.get(label)))
    if memory is not None:
        growth_mib = memory.growth_kib / 1024
        print()
        print(
            f"memory: one {memory.message_octets / 1e6:.0f} MB message: RSS grew "
            f"{growth_mib:.1f} MiB (before {memory.rss_before_kib / 1024:.1f} MiB, "
            f"peak {memory.peak_kib / 1024:.1f} MiB"
            f"{'' if memory.hwm_was_reset else ', VmHWM not reset: sampled peak only'}) "
            f"in {memory.seconds:.1f}s; target < 16 MiB: "
            f"{'met' if growth_mib < 16 else 'NOT met'}"
        )
        if memory.children:
            print(f"note: the server had {memory.children} child process(es), not measured")
    if args.json:
        args.json.write_text(json.dumps(
            {
                "environment": env,
                "load": {"sessions": args.sessions, "messages": args.messages,
                         "size": args.size},
                "rounds": {leg: [{**asdict(r), "rate": r.rate} for r in runs]
                           for leg, runs in rounds.items()},
                "ratios": ratios,
                "per_round_ratios": per_round,
                "memory": asdict(memory) if memory is not None else None,
            },
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
