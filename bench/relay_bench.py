"""Relay benchmark: submission to a sending host, relayed into a Maildir, postroom beside Postfix.

Each leg is a sending host and a receiving host on loopback, and the same
load: CLIENTS concurrent smtplib sessions together submit MESSAGES messages of
SIZE octets to one recipient at the receiving host.

  postroom      a provider postroom (submission port: STARTTLS, AUTH PLAIN)
                relaying through a static route to a second postroom, which
                files into a Maildir; the relay hop uses STARTTLS (opportunistic).
  postfix-tls   a private Postfix relaying everything to a second private
                Postfix (relayhost) that delivers to a Maildir with virtual(8);
                clients use its SMTP port with STARTTLS, permitted by mynetworks
                (no AUTH: Postfix would need a SASL server), and the relay hop
                uses STARTTLS too.
  postfix       the same two Postfix instances without TLS anywhere.

Every client connects (and for postroom starts TLS and logs in) before the
clock starts. For each message the latency runs from the client's receipt of
the 250 reply to its DATA to the moment the message's file shows up in the
recipient's Maildir new/ (told by inotify); the throughput is
the message count divided by the time from the start to the last file.

Run from the repository root, as root (Postfix's master needs it):
    python bench/relay_bench.py
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import smtplib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    LOOPBACK,
    NO_USER_RATES,
    HarnessError,
    Postroom,
    PrivatePostfix,
    find_program,
    submission_client,
    unverified_tls_context,
)

from newfiles import NewFiles  # noqa: E402
from smtp_bench import (  # noqa: E402
    environment,
    fresh_name,
    load_average,
    new_work_folder,
    ratio_line,
    round_ratios,
    spread_children,
)

SENDER = "sender@isp.example"
SENDER_PASSWORD = "bench-password"
DOMAIN = "bench.example"
USER = "user"
RCPT = f"{USER}@{DOMAIN}"
TOKEN_RE = re.compile(rb"Subject: bench ([0-9a-f]{32})")

Connect = Callable[[], smtplib.SMTP]


@dataclass
class LegResult:
    name: str
    messages: int
    seconds: float  # clock start to the last file in the Maildir
    latencies: list[float] = field(repr=False)  # 250 to DATA -> file in new/, per message
    submit_times: list[float] = field(repr=False)  # MAIL..DATA round trips, per message

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    def latency(self, q: float) -> float:
        return percentile(self.latencies, q)

    def summary(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "messages": self.messages,
            "seconds": self.seconds,
            "rate": self.rate,
            "latency_p50_ms": self.latency(0.50) * 1000,
            "latency_p99_ms": self.latency(0.99) * 1000,
            "latency_max_ms": max(self.latencies) * 1000,
            "submit_p50_ms": percentile(self.submit_times, 0.50) * 1000,
            "submit_p99_ms": percentile(self.submit_times, 0.99) * 1000,
        }


def percentile(values: list[float], q: float) -> float:
    """The q-quantile by the nearest-rank method (q=0.99: the value 99% are at or below)."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 1))  # ceil(n * q), at least 1
    return ordered[int(rank) - 1]


def make_message(token: str, size: int) -> bytes:
    head = (
        f"From: <{SENDER}>\r\nTo: <{RCPT}>\r\nSubject: bench {token}\r\n"
        f"Date: Fri, 27 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{token}@isp.example>\r\n\r\n"
    ).encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_0123456789ab\r\n"
    body = line * (max(0, size - len(head)) // len(line) + 1)
    return head + body[: max(0, size - len(head))]


class MaildirWatcher(threading.Thread):
    """Notes when each token's file first appears in a Maildir's new/ (by inotify)."""

    def __init__(self, folder: Path, expected: int) -> None:
        super().__init__(name="maildir-watcher", daemon=True)
        self.new = folder / "new"
        self.expected = expected
        self.seen: dict[str, float] = {}
        self.files = 0
        self.stop = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        with NewFiles(self.new) as arrivals:
            while not self.stop.is_set():
                names = arrivals.wait(0.05)
                now = time.monotonic()  # the files were there at this moment
                for name in names:
                    self.files += 1
                    head = (self.new / name).read_bytes()[:2048]
                    match = TOKEN_RE.search(head)
                    if match:
                        self.seen.setdefault(match.group(1).decode(), now)
                if len(self.seen) >= self.expected:
                    self.done.set()
                    return


class Client(threading.Thread):
    """One SMTP session that submits its share of the messages, timing each 250."""

    def __init__(self, connect: Connect, jobs: list[tuple[str, bytes]],
                 barrier: threading.Barrier) -> None:
        super().__init__(daemon=True)
        self.connect = connect
        self.jobs = jobs
        self.barrier = barrier
        self.acked: dict[str, float] = {}
        self.submit_times: list[float] = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            client = self.connect()
        except BaseException as exc:  # noqa: BLE001 - reported by the leg
            self.error = exc
            self.barrier.abort()
            return
        try:
            self.barrier.wait()
            for token, message in self.jobs:
                began = time.monotonic()
                code, text = client.mail(SENDER)
                if code != 250:
                    raise HarnessError(f"MAIL refused: {code} {text!r}")
                code, text = client.rcpt(RCPT)
                if code != 250:
                    raise HarnessError(f"RCPT refused: {code} {text!r}")
                code, text = client.data(message)
                acked = time.monotonic()
                if code != 250:
                    raise HarnessError(f"DATA refused: {code} {text!r}")
                self.acked[token] = acked
                self.submit_times.append(acked - began)
            client.quit()
        except BaseException as exc:  # noqa: BLE001 - reported by the leg
            self.error = exc
            self.barrier.abort()


def drive(name: str, args: argparse.Namespace, connect: Connect, maildir: Path) -> LegResult:
    """Submit the load through `connect`ed sessions; stop when `maildir` holds every message."""
    tokens = [uuid.uuid4().hex for _ in range(args.messages)]
    messages = [(t, make_message(t, args.size)) for t in tokens]
    shares = [messages[i :: args.clients] for i in range(args.clients)]
    barrier = threading.Barrier(args.clients + 1)
    clients = [Client(connect, share, barrier) for share in shares]
    watcher = MaildirWatcher(maildir, args.messages)
    for client in clients:
        client.start()
    try:
        barrier.wait(timeout=120)  # every session is connected (and logged in)
    except threading.BrokenBarrierError:
        errors = [repr(c.error) for c in clients if c.error]
        raise HarnessError(f"{name}: clients failed to connect: {errors}") from None
    start = time.monotonic()
    watcher.start()
    finished = watcher.done.wait(args.timeout)
    watcher.stop.set()
    for client in clients:
        client.join(timeout=60)
    errors = [repr(c.error) for c in clients if c.error]
    if errors:
        raise HarnessError(f"{name}: client errors: {errors[:3]}")
    if not finished:
        raise HarnessError(
            f"{name}: only {len(watcher.seen)} of {args.messages} messages arrived "
            f"within {args.timeout}s"
        )
    acked = {t: at for c in clients for t, at in c.acked.items()}
    last = max(watcher.seen.values())
    return LegResult(
        name=name,
        messages=args.messages,
        seconds=last - start,
        # A file can show up a hair before the client reads the 250 that says
        # so: such a latency counts as zero.
        latencies=[max(0.0, watcher.seen[t] - acked[t]) for t in tokens],
        submit_times=[s for c in clients for s in c.submit_times],
    )


# -- the legs ------------------------------------------------------------------


def leg_postroom(args: argparse.Namespace, base: Path) -> LegResult:
    receiver = Postroom(fresh_name(base, "postroom-mx"), hostname=f"mx.{DOMAIN}", domains=[DOMAIN],
                        users={RCPT: "unused-password"}, aliases={}, listeners=("smtp",),
                        max_message_size="64M")
    receiver.start()
    sender = Postroom(
        fresh_name(base, "postroom-submit"), hostname="mail.isp.example", domains=["isp.example"],
        users={SENDER: SENDER_PASSWORD}, aliases={}, listeners=("submission",),
        max_message_size="64M",
        extra_toml=f'[routes]\n"{DOMAIN}" = "{LOOPBACK}:{receiver.smtp_port}"\n' + NO_USER_RATES,
    )
    try:
        sender.start()
        port = sender.ports["submission"]
        return drive("postroom", args,
                     lambda: submission_client(port, SENDER, SENDER_PASSWORD, timeout=120),
                     receiver.maildir(RCPT))
    finally:
        sender.stop()
        receiver.stop()


def self_signed(base: Path, name: str) -> tuple[Path, Path]:
    openssl = find_program("openssl")
    if openssl is None:
        raise SystemExit("openssl is not installed (needed for Postfix's TLS legs)")
    base.mkdir(parents=True, exist_ok=True)
    cert, key = base / "cert.pem", base / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
        capture_output=True, check=True, timeout=60,
    )
    return cert, key


def leg_postfix(args: argparse.Namespace, base: Path, *, tls: bool) -> LegResult:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Postfix legs: {reason}")
    name = "postfix-tls" if tls else "postfix"
    server_tls: dict[str, str] = {}
    if tls:
        cert, key = self_signed(base / f"{name}-cert", f"mx.{DOMAIN}")
        server_tls = {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(cert),
                      "smtpd_tls_key_file": str(key)}
    receiver = PrivatePostfix(fresh_name(base, f"{name}-mx"), myhostname=f"mx.{DOMAIN}",
                              mailbox_domain=DOMAIN, mailbox_users=[USER],
                              extra_main_cf=server_tls)
    receiver.start()
    relay = PrivatePostfix(fresh_name(base, f"{name}-submit"), myhostname="mail.isp.example",
                           relayhost=(LOOPBACK, receiver.port),
                           tls_level="may" if tls else "none",
                           extra_main_cf={**server_tls, "smtp_tls_loglevel": "0"})
    try:
        relay.start()

        def connect() -> smtplib.SMTP:
            client = smtplib.SMTP(LOOPBACK, relay.port, timeout=120)
            if tls:
                client.starttls(context=unverified_tls_context())
            return client

        return drive(name, args, connect, receiver.mailbox_path(USER))
    finally:
        relay.stop()
        receiver.stop()


LEGS: dict[str, Callable[[argparse.Namespace, Path], LegResult]] = {
    "postroom": leg_postroom,
    "postfix-tls": lambda args, base: leg_postfix(args, base, tls=True),
    "postfix": lambda args, base: leg_postfix(args, base, tls=False),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=500, help="messages per leg (500)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent sessions (10)")
    parser.add_argument("--size", type=int, default=4096, help="octets per message (4096)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the legs this many times, alternating; the best round "
                             "(highest msg/s) of each counts (default 1)")
    parser.add_argument("--legs", default=",".join(LEGS),
                        help=f"comma-separated subset of {','.join(LEGS)} (default: all)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per leg")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = set(legs) - set(LEGS)
    if unknown:
        parser.error(f"unknown legs: {', '.join(sorted(unknown))}")
    if args.clients < 1 or args.messages < args.clients:
        parser.error("need at least one client and at least one message per client")

    base = new_work_folder("postroom-relay-bench-", args.workdir)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: {args.messages} messages of {args.size} octets from {args.clients} "
          f"concurrent smtplib sessions, {args.rounds} round(s), legs alternating")
    print(f"load average before: {load_average()}")
    rounds: dict[str, list[LegResult]] = {}
    try:
        for number in range(1, args.rounds + 1):
            folder = fresh_name(base, f"round{number}")
            folder.mkdir()
            spread_children(folder)
            for leg in legs:
                result = LEGS[leg](args, folder)
                rounds.setdefault(leg, []).append(result)
                print(f"  round {number} {leg}: {result.rate:.1f} msg/s, "
                      f"p50 {result.latency(0.5) * 1000:.1f} ms, "
                      f"p99 {result.latency(0.99) * 1000:.1f} ms", flush=True)
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    print(f"load average after: {load_average()}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    best = {leg: max(runs, key=lambda r: r.rate) for leg, runs in rounds.items()}
    print()
    print(f"{'leg':<13}{'msgs':>6}{'seconds':>9}{'msg/s':>8}{'p50 ms':>9}{'p99 ms':>9}"
          f"{'max ms':>9}{'submit p50':>12}   all rounds (msg/s)")
    for leg, r in best.items():
        s = r.summary()
        every = " ".join(f"{run.rate:.1f}" for run in rounds[leg])
        print(f"{leg:<13}{r.messages:>6}{r.seconds:>9.2f}{r.rate:>8.1f}"
              f"{s['latency_p50_ms']:>9.1f}{s['latency_p99_ms']:>9.1f}{s['latency_max_ms']:>9.1f}"
              f"{s['submit_p50_ms']:>12.1f}   {every}")
    ratios: dict[str, float] = {}
    if "postroom" in best:
        mine = best["postroom"]
        for other in ("postfix-tls", "postfix"):
            if other in best:
                theirs = best[other]
                ratios[f"msg/s postroom/{other}"] = mine.rate / theirs.rate
                ratios[f"p50 latency postroom/{other}"] = mine.latency(0.5) / max(
                    theirs.latency(0.5), 1e-9)
                ratios[f"p99 latency postroom/{other}"] = mine.latency(0.99) / max(
                    theirs.latency(0.99), 1e-9)
    per_round = {
        f"msg/s postroom/{other}": round_ratios([r.rate for r in rounds["postroom"]],
                                                [r.rate for r in rounds[other]])
        for other in ("postfix-tls", "postfix")
        if "postroom" in rounds and other in rounds
    }
    if ratios:
        print()
    for label, value in ratios.items():
        print(ratio_line(label, value, per_round.get(label)))
    if args.json:
        args.json.write_text(json.dumps(
            {
                "environment": env,
                "load": {"messages": args.messages, "clients": args.clients,
                         "size": args.size, "rounds": args.rounds},
                "rounds": {leg: [r.summary() for r in runs] for leg, runs in rounds.items()},
                "best": {leg: r.summary() for leg, r in best.items()},
                "ratios": ratios,
                "per_round_ratios": per_round,
            },
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
