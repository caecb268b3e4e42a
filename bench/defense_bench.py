"""Intake with the defences on against off: postroom's SMTP listener fed by smtp-source, twice.

Each round runs two legs on free loopback ports, alternating:
  off: postroom as shipped for a loopback client (the host itself is in
       [limits] exceptions, so nothing is counted or looked up);
  limits: no exceptions, so every connection, MAIL and RCPT is counted;
  on:  the same (limits set high enough never to refuse), and every
       connection asks a DNS list on loopback (dnsmasq) for the client, which
       answers a code the list's filter leaves out (not listed), plus the
       HELO checks and the pipelining check.
The clock stops when the last message is in the Maildir. The best round of
each leg counts; the ratio on/off is printed (1.0: the defences cost nothing).
All sessions come from 127.0.0.1, so the DNS answer is in the resolver's cache
after the first connection: the leg measures the counting and the checks,
and one DNS round trip per cache lifetime.

Run from the repository root, as root (smtp-source ships with Postfix):
    python3 bench/defense_bench.py [--sessions 20 --messages 2000 --rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))

from mailharness import Dnsmasq, HarnessError, Postroom  # noqa: E402

from smtp_bench import (  # noqa: E402 (beside this script)
    DOMAIN,
    RCPT,
    Throughput,
    drive,
    environment,
    fresh_name,
    load_average,
    new_work_folder,
)

HIGH = 1_000_000  # a limit that is counted against but never reached


LIMITS_TOML = "\n".join([
    "[limits]", "exceptions = []", f"connection_count = {HIGH}", f"connection_rate = {HIGH}",
    f"message_rate = {HIGH}", f"recipient_rate = {HIGH}", "",
])


def defended_toml(dns_port: int) -> str:
    return "\n".join([
        LIMITS_TOML, "[dns]", f'nameservers = ["127.0.0.1:{dns_port}"]', "",
        "[dnsbl]", 'sites = ["bl.test=127.0.0.[2..11]*2", "wl.test*-2"]', "threshold = 2", "",
    ])


def leg(name: str, toml: str, args: argparse.Namespace, base: Path) -> Throughput:
    server = Postroom(fresh_name(base, name), hostname=f"mx.{DOMAIN}", domains=[DOMAIN],
                      users={RCPT: "bench-password"}, aliases={}, max_message_size="64M",
                      extra_toml=toml, workers=args.workers)
    server.start()
    try:
        return drive(name, args, server.smtp_port, server.maildir(RCPT), args.timeout)
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, legs alternating")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes (default: postroom's, one per CPU)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per leg")
    parser.add_argument("--workdir", type=Path, help="folder for data (default: /var/tmp)")
    args = parser.parse_args(argv)
    base = new_work_folder("postroom-defense-bench-", args.workdir)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in environment().items()))
    print(f"load: smtp-source -s {args.sessions} -m {args.messages} -l {args.size}, "
          f"{args.rounds} round(s); load average before: {load_average()}")
    dns = Dnsmasq(base / "dns", "--host-record=1.0.0.127.bl.test,127.0.0.100",
                  "--local=/bl.test/", "--local=/wl.test/", "--local-ttl=300")
    runs: dict[str, list[Throughput]] = {"off": [], "limits": [], "on": []}
    try:
        port = dns.start()
        legs: dict[str, Callable[[Path], Throughput]] = {
            "off": lambda folder: leg("off", "", args, folder),
            "limits": lambda folder: leg("limits", LIMITS_TOML, args, folder),
            "on": lambda folder: leg("on", defended_toml(port), args, folder),
        }
        for number in range(1, args.rounds + 1):
            folder = fresh_name(base, f"round{number}")
            folder.mkdir()
            for name, run in legs.items():
                runs[name].append(run(folder))
    except HarnessError as exc:
        print(f"benchmark failed: {exc}\nwork folder kept: {base}", file=sys.stderr)
        return 1
    finally:
        dns.stop()
    shutil.rmtree(base, ignore_errors=True)
    print(f"load average after: {load_average()}\n")
    best = {name: min(r, key=lambda t: t.seconds) for name, r in runs.items()}
    print(f"{'defences':<10}{'messages':>10}{'seconds':>10}{'msg/s':>10}   all rounds (s)")
    for name, r in best.items():
        every = " ".join(f"{t.seconds:.2f}" for t in runs[name])
        print(f"{name:<10}{r.messages:>10}{r.seconds:>10.2f}{r.rate:>10.1f}   {every}")
    print()
    for name in ("limits", "on"):
        each = " ".join(f"{a.rate / b.rate:.2f}"
                        for a, b in zip(runs[name], runs["off"], strict=True))
        print(f"intake {name}/off: {best[name].rate / best['off'].rate:.2f} (rounds: {each})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
