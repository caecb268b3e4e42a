"""Milter intake benchmark: postroom and Postfix, each with the same rspamd as a milter.

One run starts a private rspamd (proxy worker in milter mode, the interop
tests' config: no Redis, test DNS on loopback) and then, in turn, on free
loopback ports:
  (a) postroom, its SMTP listener with `[milters] smtp = [rspamd]`, local
      delivery to a Maildir;
  (b) a private Postfix with `smtpd_milters` = the same rspamd,
      `milter_default_action = tempfail`, virtual(8) delivery to a Maildir.
Each gets the same smtp-source load (bench/smtp_bench.py's legs and clock: the
clock stops when the last message is in new/). A message rspamd refuses would
never arrive, so the run fails rather than report a rate for mail not taken.

Run from the repository root, as root (Postfix's master and rspamd need it):
    python bench/milter_bench.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    Dnsmasq,
    HarnessError,
    Postroom,
    PrivatePostfix,
)
from milterpeers import Rspamd  # noqa: E402

from smtp_bench import (  # noqa: E402 (beside this script)
    DOMAIN,
    RCPT,
    USER,
    Throughput,
    drive,
    environment,
    fresh_name,
    load_average,
    new_work_folder,
    round_ratios,
    spread_children,
)


def bench_postroom(args: argparse.Namespace, base: Path, milter: str) -> Throughput:
    server = Postroom(fresh_name(base, "postroom"), hostname=f"mx.{DOMAIN}", domains=[DOMAIN],
                      users={RCPT: "bench-password"}, aliases={}, max_message_size="64M",
                      extra_toml=f'[milters]\nsmtp = ["{milter}"]\n')
    server.start()
    try:
        return drive("postroom+rspamd", args, server.smtp_port, server.maildir(RCPT),
                     args.timeout)
    finally:
        server.stop()


def bench_postfix(args: argparse.Namespace, base: Path, milter: str) -> Throughput:
    reason = PrivatePostfix.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Postfix leg: {reason}")
    postfix = PrivatePostfix(fresh_name(base, "postfix"), myhostname=f"postfix.{DOMAIN}",
                             mailbox_domain=DOMAIN, mailbox_users=[USER],
                             extra_main_cf={"smtpd_milters": milter,
                                            "milter_default_action": "tempfail",
                                            "milter_protocol": "6"})
    postfix.start()
    try:
        return drive("postfix+rspamd", args, postfix.port, postfix.mailbox_path(USER),
                     args.timeout)
    finally:
        postfix.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    parser.add_argument("--messages", type=int, default=1000,
                        help="smtp-source -m (default 1000)")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l (default 4096)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds allowed per leg")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run both legs this many times, alternating (default 1)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    base = new_work_folder("postroom-milter-bench-", args.workdir)
    print("environment: " + ", ".join(f"{k}={v}" for k, v in environment().items()))
    print(f"load: smtp-source -s {args.sessions} -m {args.messages} -l {args.size}, "
          f"{args.rounds} round(s); milter: rspamd proxy (milter mode)")
    print(f"load average before: {load_average()}")
    dns = Dnsmasq(base / "dns", "--local=/example/")
    rspamd: Rspamd | None = None
    legs: dict[str, list[Throughput]] = {"postroom": [], "postfix": []}
    try:
        dns.start()
        rspamd = Rspamd(base / "rspamd", dns.port)
        rspamd.start()
        for number in range(1, args.rounds + 1):
            folder = fresh_name(base, f"round{number}")
            folder.mkdir()
            spread_children(folder)
            legs["postroom"].append(bench_postroom(args, folder, rspamd.socket))
            legs["postfix"].append(bench_postfix(args, folder, rspamd.socket))
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    finally:
        if rspamd is not None:
            rspamd.stop()
        dns.stop()
    print(f"load average after: {load_average()}")
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"{'server':<18}{'messages':>10}{'seconds':>10}{'msg/s':>10}   all rounds (s)")
    best = {leg: min(runs, key=lambda r: r.seconds) for leg, runs in legs.items()}
    for leg, r in best.items():
        every = " ".join(f"{run.seconds:.2f}" for run in legs[leg])
        print(f"{r.name:<18}{r.messages:>10}{r.seconds:>10.2f}{r.rate:>10.1f}   {every}")
    ratio = best["postroom"].rate / best["postfix"].rate
    within = round_ratios([r.rate for r in legs["postroom"]], [r.rate for r in legs["postfix"]])
    line = f"\npostroom/postfix with the same milter: {ratio:.2f}"
    if len(within) > 1:
        line += (f" (best rounds); per round: median {statistics.median(within):.2f}, "
                 f"range {within[0]:.2f}-{within[-1]:.2f}")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
