"""POP3 login on a big maildrop: postroom beside Dovecot, first and second login, memory after QUIT.

One run fills one Maildir with COUNT messages (default 100,000; --messages
300000) named as postroom names its deliveries (pop3_bench.message_bytes,
CRLF line ends, S= and W= in the name), once; Dovecot gets its own Maildir
made of hard links to the same files (its own folders, its own index). Then,
one server after the other (postroom first, both running throughout):
  - the resident memory (VmRSS) of all the server's processes, before any login,
    and (postroom) after one session of another user whose maildrop holds one
    message: the "warm" base, with everything a first session loads or caches
    for good (modules, the password hasher), which no later QUIT can give back;
  - three sessions, each timed from connect to the +OK of STAT after USER/PASS:
    the first finds no index (postroom writes postroom-uidlist, Dovecot its
    dovecot.index* and dovecot-uidlist), the later ones read the index;
  - each session ends with QUIT (nothing deleted or read), and the resident
    memory of the server's processes is taken once a further connection has
    been greeted (the served session is over by then).
postroom runs one process (workers = 1), so its figure is the process that
served the sessions; Dovecot's is its master, helpers and any pop3 process left.
Each session's message count is checked against COUNT.

Run from the repository root, as root (Dovecot's mail process must be given
the Maildir as an unprivileged user):
    python3 bench/pop3_login_bench.py [--messages 300000]
"""

from __future__ import annotations

import argparse
import json
import os
import poplib
import secrets
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    LOOPBACK,
    HarnessError,
    Postroom,
    PrivateDovecot,
    wait_for_pop3,
)

from pop3_bench import DOMAIN, HOST, PASSWORD, USER, environment, message_bytes  # noqa: E402
from smtp_bench import fresh_name, new_work_folder  # noqa: E402

LOGIN_TIMEOUT = 600.0  # seconds a client waits for one login on a big maildrop
SESSIONS = 3  # on the big maildrop: the first builds the index, the others read it
WARM_USER = f"warm@{DOMAIN}"  # one message in its maildrop: the warm-up session's


@dataclass
class Leg:
    server: str
    messages: int
    base_rss_kib: int  # before any login
    warm_rss_kib: int | None  # after the warm-up session (postroom only)
    login_seconds: list[float]  # connect to the +OK of STAT, in order
    rss_after_quit_kib: list[int]  # after each session's QUIT


def fill_maildir(folder: Path, count: int, size: int) -> None:
    """`count` messages in new/ under postroom-style names, oldest first."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    start = time.time_ns() // 1000 - count
    pid, nonce = os.getpid(), secrets.token_hex(8)
    for number in range(1, count + 1):
        secs, usecs = divmod(start + number, 1_000_000)
        data = message_bytes(number, size)
        name = f"{secs}.M{usecs}P{pid}Q{number}R{nonce}.{HOST},S={len(data)},W={len(data)}"
        fd = os.open(folder / "new" / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def link_maildir(source: Path, target: Path) -> None:
    """A second Maildir holding hard links to `source`'s messages."""
    for sub in ("tmp", "new", "cur"):
        (target / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    for sub in ("new", "cur"):
        for name in os.listdir(source / sub):
            os.link(source / sub / name, target / sub / name)


def tree_rss_kib(root_pid: int) -> int:
    """VmRSS of `root_pid` and all its descendants, in KiB."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root_pid]
    while todo:
        pid = todo.pop()
        todo.extend(children.get(pid, []))
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def login(port: int, user: str = USER) -> tuple[float, int]:
    """One session: (seconds from connect to the +OK of STAT, messages), then QUIT."""
    start = time.perf_counter()
    client = poplib.POP3(LOOPBACK, port, timeout=LOGIN_TIMEOUT)
    try:
        client.user(user)
        client.pass_(PASSWORD)
        count, _octets = client.stat()
        seconds = time.perf_counter() - start
        client.quit()
    finally:
        client.close()
    return seconds, count


def settled_rss(port: int, root_pid: int) -> int:
    """The server's memory once a later connection is greeted (its loop has moved on
    from the session that just ended)."""
    wait_for_pop3(port)
    return tree_rss_kib(root_pid)


def measure(name: str, port: int, root_pid: int, messages: int, warm_up: bool) -> Leg:
    base = settled_rss(port, root_pid)
    warm = None
    if warm_up:
        login(port, WARM_USER)
        warm = settled_rss(port, root_pid)
    leg = Leg(name, messages, base, warm, [], [])
    for _ in range(SESSIONS):
        seconds, count = login(port)
        if count != messages:
            raise HarnessError(f"{name} lists {count} of {messages} messages")
        leg.login_seconds.append(seconds)
        leg.rss_after_quit_kib.append(settled_rss(port, root_pid))
    return leg


def run_bench(args: argparse.Namespace, base: Path) -> list[Leg]:
    reason = PrivateDovecot.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Dovecot leg: {reason}")
    home = fresh_name(base, "postroom")
    home.mkdir()
    server = Postroom(home, hostname=HOST, domains=[DOMAIN],
                      users={USER: PASSWORD, WARM_USER: PASSWORD}, aliases={},
                      listeners=("smtp", "pop3"), workers=1,
                      extra_toml="[pop3]\nallow_plaintext_auth = true\n")
    server.setup()
    maildir = server.maildir(USER)
    started = time.perf_counter()
    fill_maildir(maildir, args.messages, args.size)
    fill_maildir(server.maildir(WARM_USER), 1, args.size)
    dovecot_maildir = fresh_name(base, "dovecot-mail") / "Maildir"
    link_maildir(maildir, dovecot_maildir)
    print(f"maildrops of {args.messages} messages made in {time.perf_counter() - started:.1f} s")
    dovecot: PrivateDovecot | None = None
    try:
        server.start()
        wait_for_pop3(server.ports["pop3"])
        dovecot = PrivateDovecot(fresh_name(base, "dovecot"), maildir=dovecot_maildir,
                                 user=USER, password=PASSWORD)
        dovecot.start()
        dovecot_pid = dovecot.master_pid()
        assert server.process is not None and dovecot_pid is not None
        return [measure("postroom", server.ports["pop3"], server.process.pid, args.messages,
                        warm_up=True),
                measure("dovecot", dovecot.port, dovecot_pid, args.messages, warm_up=False)]
    finally:
        if dovecot is not None:
            dovecot.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000,
                        help="messages in the maildrop (default 100000)")
    parser.add_argument("--size", type=int, default=4096, help="octets each (default 4096)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    base = new_work_folder("postroom-pop3-login-bench-", args.workdir)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: USER/PASS then STAT on a maildrop of {args.messages} messages of "
          f"{args.size} octets, first and second login")
    try:
        legs = run_bench(args, base)
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    mine, theirs = legs
    rows: list[tuple[str, float, float | None]] = [
        (f"login {n + 1}, s", mine.login_seconds[n], theirs.login_seconds[n])
        for n in range(SESSIONS)]
    rows += [("RSS before login, MiB", mine.base_rss_kib / 1024, theirs.base_rss_kib / 1024)]
    if mine.warm_rss_kib is not None:
        rows.append(("RSS warm (1-msg login), MiB", mine.warm_rss_kib / 1024, None))
    rows += [(f"RSS after QUIT {n + 1}, MiB", mine.rss_after_quit_kib[n] / 1024,
              theirs.rss_after_quit_kib[n] / 1024) for n in range(SESSIONS)]
    print()
    print(f"{'':<28}{'postroom':>10}{'dovecot':>10}{'ratio':>8}")
    for label, ours, peer in rows:
        ratio = f"{ours / peer:.2f}" if peer else "-"
        shown = f"{peer:>10.2f}" if peer is not None else f"{'-':>10}"
        print(f"{label:<28}{ours:>10.2f}{shown}{ratio:>8}")
    if args.json:
        args.json.write_text(json.dumps(
            {
                "environment": env,
                "load": {"messages": args.messages, "size": args.size},
                "legs": [asdict(leg) for leg in legs],
            },
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
