"""POP3 download benchmark: postroom beside Dovecot, serving the same Maildir to the same client.

One run fills one Maildir with COUNT messages of SIZE octets (default 2,000 of
4 KiB), written as files named the way postroom's delivery names them
(``<secs>.M<usecs>P<pid>Q<n>R<random>.<host>,S=<size>,W=<size>``, CRLF line
ends), then starts on free loopback ports:
  (a) postroom (`postroom serve`, POP3 listener with STLS);
  (b) a private Dovecot 2.3 (own config folder; nothing in /etc/dovecot read)
      whose mail_location is that very Maildir.
Each leg is one poplib session that logs in, RETRs every message and QUITs
(no DELE), in plaintext and after STLS. The clock runs from the first RETR to
the last message's final line; login and QUIT are timed apart, and the
client's own CPU time during the RETRs is reported (when it nears the RETR
time, the client is the bottleneck). Every leg runs
ROUNDS times, servers alternating, and the best round counts. Before the
clock, one untimed session per server lists the maildrop (Dovecot builds its
index then; postroom's first QUIT moves the files from new/ to cur/). Every
downloaded message is compared with its file after the clock stops.

Run from the repository root, as root (Dovecot's mail process must be given
the Maildir as an unprivileged user):
    python3 bench/pop3_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailharness import (  # noqa: E402 (the path above makes the harness importable)
    HarnessError,
    Postroom,
    PrivateDovecot,
    find_program,
    maildir_files,
    pop3_listing,
    pop3_message,
    pop3_session,
    wait_for_pop3,
)

from smtp_bench import fresh_name, new_work_folder, ratio_line, round_ratios  # noqa: E402

DOMAIN = "bench.example"
USER = f"user@{DOMAIN}"
PASSWORD = "bench-password"
HOST = f"mx.{DOMAIN}"


@dataclass
class Leg:
    server: str
    security: str
    messages: int
    octets: int
    seconds: float  # first RETR to the end of the last message (best round)
    login_seconds: float
    quit_seconds: float
    client_cpu_seconds: float  # the poplib client's own CPU time during the RETRs
    rounds: list[float]

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def mib_per_second(self) -> float:
        return self.octets / self.seconds / (1024 * 1024) if self.seconds > 0 else 0.0


def message_bytes(number: int, size: int) -> bytes:
    """A message of exactly `size` octets with CRLF line ends (stored as postroom stores)."""
    head = (
        f"Received: from client.example ([127.0.0.1])\r\n\tby {HOST} (postroom) with ESMTP\r\n"
        f"From: <load@client.example>\r\nTo: <{USER}>\r\nSubject: bench message {number}\r\n"
        f"Message-ID: <{number}.bench@client.example>\r\n\r\n"
    ).encode()
    line = f"{number:06d} the quick brown fox jumps over the lazy dog .\r\n".encode()
    body = b"." + line  # one dot-stuffed line per message keeps the server honest
    while len(head) + len(body) + len(line) <= size:
        body += line
    filler = size - len(head) - len(body)
    if filler >= 2:
        body += b"x" * (filler - 2) + b"\r\n"
    data = head + body
    if len(data) != size:
        raise ValueError(f"size {size} is too small for a message")
    return data


def fill_maildir(folder: Path, count: int, size: int) -> dict[str, bytes]:
    """Write `count` messages into new/ under postroom-style names; {name: bytes}."""
    for sub in ("tmp", "new", "cur"):
        (folder / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
    written: dict[str, bytes] = {}
    start = time.time_ns() // 1000 - count  # distinct microseconds keep delivery order
    for number in range(1, count + 1):
        secs, usecs = divmod(start + number, 1_000_000)
        data = message_bytes(number, size)
        name = (f"{secs}.M{usecs}P{os.getpid()}Q{number}R{secrets.token_hex(8)}.{HOST}"
                f",S={len(data)},W={len(data)}")
        path = folder / "new" / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        written[name] = data
    return written


def session_list(port: int) -> int:
    client = pop3_session(port, security="plain", user=USER, password=PASSWORD, timeout=120)
    try:
        count = len(pop3_listing(client))
        client.quit()
    finally:
        client.close()
    return count


def download(port: int, security: str) -> tuple[float, float, float, float, list[bytes]]:
    """One session: (login s, RETR s, QUIT s, client CPU s during the RETRs, the messages)."""
    t0 = time.perf_counter()
    client = pop3_session(port, security=security, user=USER, password=PASSWORD, timeout=120)
    try:
        count, _ = client.stat()
        t1 = time.perf_counter()
        cpu = time.process_time()
        got = [pop3_message(client, number) for number in range(1, count + 1)]
        cpu = time.process_time() - cpu
        t2 = time.perf_counter()
        client.quit()
        t3 = time.perf_counter()
    finally:
        client.close()
    return t1 - t0, t2 - t1, t3 - t2, cpu, got


def check(name: str, got: list[bytes], expected: dict[str, bytes]) -> None:
    if sorted(got) != sorted(expected.values()):
        raise HarnessError(f"{name}: downloaded messages differ from the Maildir's files")


def environment() -> dict[str, str]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    dovecot = find_program("dovecot")
    version = ""
    if dovecot:
        version = subprocess.run([dovecot, "--version"], capture_output=True, text=True,
                                 check=False).stdout.strip()
    return {
        "cpu": cpu,
        "cpus": str(os.cpu_count()),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dovecot": version,
    }


def run_bench(args: argparse.Namespace, base: Path) -> list[Leg]:
    reason = PrivateDovecot.unavailable_reason()
    if reason is not None:
        raise SystemExit(f"cannot run the Dovecot leg: {reason}")
    home = fresh_name(base, "postroom")
    home.mkdir()
    server = Postroom(home, hostname=HOST, domains=[DOMAIN],
                      users={USER: PASSWORD}, aliases={}, listeners=("smtp", "pop3"),
                      extra_toml="[pop3]\nallow_plaintext_auth = true\n")
    server.setup()
    maildir = server.maildir(USER)
    expected = fill_maildir(maildir, args.messages, args.size)
    dovecot: PrivateDovecot | None = None
    try:
        server.start()  # makes the self-signed certificate Dovecot borrows
        wait_for_pop3(server.ports["pop3"])
        dovecot = PrivateDovecot(fresh_name(base, "dovecot"), maildir=maildir, user=USER,
                                 password=PASSWORD, cert=server.data / "tls" / "cert.pem",
                                 key=server.data / "tls" / "key.pem")
        dovecot.start()
        ports = {"postroom": server.ports["pop3"], "dovecot": dovecot.port}
        for name, port in ports.items():
            listed = session_list(port)
            if listed != args.messages:
                raise HarnessError(f"{name} lists {listed} of {args.messages} messages")
        if len(maildir_files(maildir)) != args.messages:
            raise HarnessError("the Maildir lost messages during the warm-up")

        results: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
        for round_number in range(args.rounds):
            order = list(ports) if round_number % 2 == 0 else list(reversed(ports))
            for security in ("plain", "stls"):
                for name in order:
                    login, retr, quit_, cpu, got = download(ports[name], security)
                    check(f"{name}/{security}", got, expected)
                    results.setdefault((name, security), []).append((login, retr, quit_, cpu))
        legs = []
        octets = sum(len(d) for d in expected.values())
        for (name, security), rounds in results.items():
            best = min(rounds, key=lambda r: r[1])
            legs.append(Leg(name, security, args.messages, octets, best[1], best[0], best[2],
                            best[3], [r[1] for r in rounds]))
        return sorted(legs, key=lambda leg: (leg.security, leg.server != "postroom"))
    finally:
        if dovecot is not None:
            dovecot.stop()
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000, help="messages (default 2000)")
    parser.add_argument("--size", type=int, default=4096, help="octets each (default 4096)")
    parser.add_argument("--rounds", type=int, default=3, help="sessions per leg (default 3)")
    parser.add_argument("--workdir", type=Path,
                        help="folder for data (default: a new folder in /var/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    args = parser.parse_args(argv)

    base = new_work_folder("postroom-pop3-bench-", args.workdir)
    env = environment()
    print("environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
    print(f"load: one poplib session RETRs {args.messages} messages of {args.size} octets, "
          f"best of {args.rounds}")
    try:
        legs = run_bench(args, base)
    except HarnessError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        print(f"work folder kept: {base}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)

    print()
    print(f"{'server':<10}{'security':<10}{'messages':>10}{'seconds':>10}{'msg/s':>10}"
          f"{'MiB/s':>8}{'login s':>9}{'quit s':>8}{'client cpu':>12}")
    for leg in legs:
        print(f"{leg.server:<10}{leg.security:<10}{leg.messages:>10}{leg.seconds:>10.3f}"
              f"{leg.rate:>10.0f}{leg.mib_per_second:>8.1f}{leg.login_seconds:>9.3f}"
              f"{leg.quit_seconds:>8.3f}{leg.client_cpu_seconds:>12.3f}")
    rates = {(leg.server, leg.security): leg.rate for leg in legs}
    ratios = {
        f"postroom/dovecot {security}": rates[("postroom", security)] / rates[("dovecot", security)]
        for security in ("plain", "stls")
        if rates.get(("dovecot", security)) and ("postroom", security) in rates
    }
    round_rates = {(leg.server, leg.security): [leg.messages / t for t in leg.rounds]
                   for leg in legs}
    per_round = {
        f"postroom/dovecot {security}": round_ratios(round_rates[("postroom", security)],
                                                     round_rates[("dovecot", security)])
        for security in ("plain", "stls")
        if ("postroom", security) in round_rates and ("dovecot", security) in round_rates
    }
    print()
    for label, value in ratios.items():
        print(ratio_line(label, value, per_round.get(label)))
    if args.json:
        args.json.write_text(json.dumps(
            {
                "environment": env,
                "load": {"messages": args.messages, "size": args.size, "rounds": args.rounds},
                "legs": [{**asdict(leg), "rate": leg.rate} for leg in legs],
                "ratios": ratios,
                "per_round_ratios": per_round,
            },
            indent=2,
        ))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
