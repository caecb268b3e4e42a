"""Submission benchmark: DKIM signing (rsa, and rsa + ed25519) against no signing, same run.

Each leg starts a fresh postroom (submission listener, plaintext AUTH on
loopback so TLS does not blur the comparison) whose relay route for the
recipients' domain points at Postfix's smtp-sink (stores nothing), and drives
it with client processes that each log in once and submit messages one after
another. The clock runs from the first connection to the last 250: signing
happens before the 250, so it is inside the measure. Legs run in turn,
`--rounds` times, and the ratios compare legs of the same round.

Run from the repository root:
    python bench/dkim_bench.py [--clients 8] [--messages 250] [--size 4096] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))

from mailharness import NO_USER_RATES, Postroom, find_program, free_ports  # noqa: E402

DOMAIN = "isp.example"
USER = f"smith@{DOMAIN}"
PASSWORD = "bench-secret"
RCPT = "boss@far.example"
LEGS = {"unsigned": (), "rsa": ("rsa",), "dual": ("rsa", "ed25519")}


def message(size: int) -> bytes:
    head = (f"From: Smith <{USER}>\r\nTo: <{RCPT}>\r\nSubject: bench\r\n"
            "Message-ID: <bench@isp.example>\r\n\r\n")
    line = b"x" * 76 + b"\r\n"
    return head.encode() + line * max(1, size // len(line))


def client(port: int, count: int, size: int) -> None:
    body = message(size)
    with smtplib.SMTP("127.0.0.1", port, timeout=120) as smtp:
        smtp.login(USER, PASSWORD)
        for _ in range(count):
            smtp.sendmail(USER, [RCPT], body)


def run_leg(name: str, algorithms: tuple[str, ...], args: argparse.Namespace, base: Path,
            sink_port: int) -> float:
    """Messages per second for one leg."""
    server = Postroom(
        base / name, hostname="mail.isp.example", domains=(DOMAIN,),
        users={USER: PASSWORD}, listeners=("smtp", "submission"),
        extra_toml=(f"allow_plaintext_auth = true\n\n[routes]\n"
                    f'"far.example" = "127.0.0.1:{sink_port}"\n' + NO_USER_RATES),
    )
    server.setup()
    for algorithm in algorithms:
        server.cli("dkim", "add", DOMAIN, "--algorithm", algorithm)
    server.start()
    try:
        per_client = args.messages // args.clients
        start = time.perf_counter()
        with multiprocessing.Pool(args.clients) as pool:
            pool.starmap(client, [(server.ports["submission"], per_client, args.size)] *
                         args.clients)
        elapsed = time.perf_counter() - start
    finally:
        server.stop()
    return per_client * args.clients / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="client processes (default 8)")
    parser.add_argument("--messages", type=int, default=800, help="messages per leg")
    parser.add_argument("--size", type=int, default=4096, help="message size in octets")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all legs")
    args = parser.parse_args(argv)
    sink = find_program("smtp-sink")
    if sink is None:
        print("smtp-sink (Postfix) is needed as the relay's next hop", file=sys.stderr)
        return 2
    (sink_port,) = free_ports(1)
    base = Path(tempfile.mkdtemp(prefix="postroom-dkim-bench-"))
    sink_proc = subprocess.Popen([sink, "-u", "nobody", "-c", f"127.0.0.1:{sink_port}", "1000"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results: dict[str, list[float]] = {name: [] for name in LEGS}
    try:
        for round_ in range(args.rounds):
            for name, algorithms in LEGS.items():
                rate = run_leg(f"{name}-{round_}", algorithms, args, base, sink_port)
                results[name].append(rate)
                print(f"round {round_ + 1} {name:9s} {rate:8.1f} msg/s", flush=True)
    finally:
        sink_proc.terminate()
        sink_proc.wait()
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{args.clients} clients, {args.messages} messages of {args.size} octets per leg, "
          f"{args.rounds} rounds (median msg/s; ratio to unsigned, per round then median)")
    for name in LEGS:
        ratios = [r / u for r, u in zip(results[name], results["unsigned"], strict=True)]
        print(f"  {name:9s} {statistics.median(results[name]):8.1f} msg/s  "
              f"x{statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
