"""PostgreSQL store benchmark: intake and POP3 retrieval, PostgreSQL store beside the Maildir store.

One run starts, in turn, on free loopback ports and in one work folder:
  maildir  one postroom node on the embedded store (SQLite + Maildir);
  pg-1     one postroom node on a private PostgreSQL (tests/pgserver.py, fsync on);
  pg-2     two postroom nodes on that PostgreSQL, the load split between them;
  postfix  a private Postfix instance delivering to a Maildir (intake only).
Intake: smtp-source (Postfix's load generator) sends the messages; the clock
stops when every message is stored (Maildir: in new/; PostgreSQL: every 250
came after its commit, so when smtp-source exits). Retrieval: CLIENTS POP3
sessions, one per user, each RETRs its whole maildrop (from the second node
for pg-2, so the mail crosses nodes). Every leg gets the same messages.

Run from the repository root, as root (Postfix and PostgreSQL's initdb need it):
    python3 bench/pg_bench.py [--messages 2000] [--sessions 20] [--size 4096]
"""

from __future__ import annotations

import argparse
import json
import poplib
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "interop"))
sys.path.insert(0, str(HERE.parent / "tests"))

from mailharness import LOOPBACK, HarnessError, Postroom  # noqa: E402

from pgserver import pg_bin, private_postgres  # noqa: E402
from smtp_bench import (  # noqa: E402 (beside this script)
    DOMAIN,
    RCPT,
    bench_postfix,
    drive,
    fresh_name,
    new_work_folder,
    smtp_source_command,
)

PASSWORD = "bench-password"


def postroom(base: Path, name: str, url: str | None, *, first: bool = True) -> Postroom:
    toml = "[pop3]\nallow_plaintext_auth = true\n"
    if url is not None:
        toml += f'\n[store]\nurl = "{url}"\n'
    server = Postroom(fresh_name(base, name), hostname=f"mx.{DOMAIN}",
                      domains=[DOMAIN] if first else [],
                      users={RCPT: PASSWORD} if first else {}, aliases={},
                      listeners=("smtp", "pop3"), max_message_size="64M", extra_toml=toml)
    server.start(timeout=60)
    return server


def intake(args: argparse.Namespace, nodes: list[Postroom], maildir: Path | None) -> float:
    """Messages per second for args.messages sent, split evenly over `nodes`."""
    if maildir is not None:
        return drive("maildir", args, nodes[0].smtp_port, maildir, args.timeout).rate
    share = args.messages // len(nodes)
    start = time.monotonic()
    sources = []
    for node in nodes:
        part = argparse.Namespace(**{**vars(args), "messages": share,
                                     "sessions": max(1, args.sessions // len(nodes))})
        sources.append(subprocess.Popen(smtp_source_command(part, node.smtp_port),
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for source in sources:
        _, err = source.communicate(timeout=args.timeout)
        if source.returncode != 0:
            raise HarnessError(f"smtp-source exited {source.returncode}: {err.decode()}")
    return share * len(nodes) / (time.monotonic() - start)


def retrieval(args: argparse.Namespace, node: Postroom) -> float:
    """Messages per second for one POP3 session RETRieving the whole maildrop."""
    client = poplib.POP3(LOOPBACK, node.ports["pop3"], timeout=args.timeout)
    client.user(RCPT)
    client.pass_(PASSWORD)
    count = len(client.list()[1])
    start = time.monotonic()
    for number in range(1, count + 1):
        client.retr(number)
    elapsed = time.monotonic() - start
    client.quit()
    return count / elapsed


def leg(name: str, results: dict[str, dict[str, float]],
        run: Callable[[], dict[str, float]]) -> None:
    print(f"{name}: running", flush=True)
    results[name] = run()
    print(f"{name}: " + ", ".join(f"{k} {v:.0f}/s" for k, v in results[name].items()),
          flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=20, help="smtp-source -s (default 20)")
    parser.add_argument("--messages", type=int, default=2000, help="smtp-source -m")
    parser.add_argument("--size", type=int, default=4096, help="smtp-source -l (octets)")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--legs", default="maildir,pg-1,pg-2,postfix")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    legs = args.legs.split(",")
    bindir = pg_bin()
    if bindir is None and {"pg-1", "pg-2"} & set(legs):
        raise SystemExit("PostgreSQL (initdb, pg_ctl) is not installed")
    base = new_work_folder("postroom-pg-bench-", args.workdir)
    results: dict[str, dict[str, float]] = {}
    if "maildir" in legs:
        def maildir_leg() -> dict[str, float]:
            node = postroom(base, "maildir", None)
            try:
                return {"intake": intake(args, [node], node.maildir(RCPT)),
                        "pop3": retrieval(args, node)}
            finally:
                node.stop()
        leg("maildir", results, maildir_leg)
    for name, count in (("pg-1", 1), ("pg-2", 2)):
        if name not in legs:
            continue
        assert bindir is not None

        def pg_leg(count: int = count) -> dict[str, float]:
            # Beside the work folder (0700, closed to the postgres user), on the same disk.
            with private_postgres(bindir, parent=base.parent, fsync=True) as pg:
                nodes = [postroom(base, f"pg{count}-node1", pg.url)]
                nodes += [postroom(base, f"pg{count}-node{i + 1}", pg.url, first=False)
                          for i in range(1, count)]
                try:
                    return {"intake": intake(args, nodes, None),
                            "pop3": retrieval(args, nodes[-1])}
                finally:
                    for node in nodes:
                        node.stop()
        leg(name, results, pg_leg)
    if "postfix" in legs:
        leg("postfix", results, lambda: {"intake": bench_postfix(args, base).rate})
    print()
    maildir = results.get("maildir", {})
    for name in ("pg-1", "pg-2"):
        if name in results and maildir:
            for what in ("intake", "pop3"):
                print(f"{name}/maildir {what}: {results[name][what] / maildir[what]:.2f}")
        if name in results and "postfix" in results:
            print(f"{name}/postfix intake: "
                  f"{results[name]['intake'] / results['postfix']['intake']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
