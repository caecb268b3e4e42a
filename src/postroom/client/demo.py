"""`postroom demo`: the seed's whole path on loopback, each step shown with its real exchange.

It starts, in a temporary folder and on free loopback ports, three servers in
this one process: a DNS server for the zone `example` (client.dnsdemo), the
provider's host mail.isp.example (submission, relay) and corp.example's host
mx.corp.example (SMTP for its domain, POP3). The provider asks that DNS server
for corp.example's MX and relays to the port the receiving host listens on, so
every hop is a real protocol exchange over a socket. Then one message goes
from smith@isp.example to boss@corp.example, told in the steps of DESIGN.md's
seed: the client side's lines come from the user tools' trace callbacks, the
servers' side from their own log lines (caught with a logging handler), the DNS
answers from what the DNS server answered. The exit status is 0 only if the
body arrived byte for byte (line ends aside), the server's maildrop is empty
after the QUIT, and the receiving host refused to relay for a stranger.
Everything it started is stopped before it returns, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import re
import secrets
import shutil
import signal
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TextIO

from postroom.client.dnsdemo import DemoDNS, mail_zone, start_dns
from postroom.client.trace import format_hops, hops_of, message_date
from postroom.config import load_config
from postroom.server.main import Running, start
from postroom.store.maildir import MailStore, list_messages
from postroom.store.users import open_user_directory

SMITH = "smith@isp.example"
BOSS = "boss@corp.example"
PROVIDER = "mail.isp.example"
CORP = "mx.corp.example"
CLIENT_HELO = "laptop.isp.example"  # the name Smith's mail client greets with
STRANGER_RCPT = "someone@elsewhere.example"
SUBJECT = "Quarterly report"
# The line that starts with a dot shows SMTP's transparency at work (RFC 5321
# 4.5.2: the client doubles it, the server removes the extra dot) and POP3's
# (RFC 1939 3): it must arrive exactly as written.
BODY = (
    "Hello,\n\nthe quarterly numbers are in: sales are up 12%.\n"
    ".signed off by accounting (this line starts with a dot)\n\nSmith\n"
)
WAIT_SECONDS = 20.0  # for the relay and delivery; a loopback run takes well under a second
WIDTH = 100  # of the output when it is not a terminal
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class DemoFailed(Exception):
    """A step did not do what the story says; str() says which and why."""


# -- output ----------------------------------------------------------------------------


class Printer:
    """Step headers with their time right-aligned, indented exchange lines, plain text
    unless the output is a terminal (then bold headers and a coloured verdict)."""

    def __init__(self, out: TextIO, color: bool | None = None) -> None:
        self.out = out
        tty = hasattr(out, "isatty") and out.isatty()
        self.color = tty if color is None else color
        self.width = shutil.get_terminal_size((WIDTH, 24)).columns if tty else WIDTH
        self.width = max(60, min(self.width, 120))

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "", indent: int = 0) -> None:
        prefix = " " * indent
        if not text:
            print(file=self.out)
            return
        wrapped = textwrap.wrap(text, self.width - indent, subsequent_indent="    ",
                                break_on_hyphens=False, break_long_words=False) or [""]
        for part in wrapped:
            print(prefix + part, file=self.out)

    def header(self, text: str, seconds: float | None = None) -> None:
        took = f"[{_duration(seconds)}]" if seconds is not None else ""
        room = self.width - len(took) - 1
        if len(text) > room:
            print(self._paint("1", text), file=self.out)
            text = ""
        print(self._paint("1", text.ljust(room)) + " " + took if took else
              self._paint("1", text), file=self.out)

    def verdict(self, ok: bool, text: str) -> None:
        word = "OK" if ok else "FAILED"
        lines = textwrap.wrap(f"{word}: {text}", self.width, subsequent_indent="    ")
        painted = self._paint("1;32", word) if ok else self._paint("1;31", word)
        lines[0] = painted + lines[0][len(word):]
        for line in lines:
            print(line, file=self.out)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:.2f} s"


# -- what the servers log --------------------------------------------------------------


@dataclass(frozen=True)
class LogLine:
    logger: str
    created: float
    text: str


class LogTap(logging.Handler):
    """Keeps the "postroom" loggers' records while the demo runs (they are the servers'
    side of the story: queue IDs, relay results, deliveries)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not stop the demo
            text = str(record.msg)
        self.lines.append(LogLine(record.name, record.created, text))

    def find(self, pattern: str) -> list[LogLine]:
        regex = re.compile(pattern)
        return [line for line in list(self.lines) if regex.search(line.text)]

    @contextlib.contextmanager
    def attached(self) -> Iterator[LogTap]:
        root = logging.getLogger("postroom")
        saved = (root.level, root.propagate)
        root.addHandler(self)
        root.setLevel(logging.INFO)
        root.propagate = False  # the demo prints what matters; nothing else on stderr
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(saved[0])
            root.propagate = saved[1]


SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s")


def _show_log(printer: Printer, host: str, lines: list[LogLine]) -> None:
    """Log lines as "host program: text", the listener's name standing for the program."""
    for line in lines:
        program, sep, rest = line.text.partition(": ")
        if not (sep and program in SERVICES):
            program, rest = line.logger.removeprefix("postroom.").split(".")[0], line.text
        printer.line(f"{host} {program}: {rest}", indent=5)


# -- the protocol exchanges the user tools report -------------------------------------


@dataclass
class Exchange:
    """Trace lines with the time each arrived."""

    lines: list[tuple[float, str]] = field(default_factory=list)

    def __call__(self, line: str) -> None:
        self.lines.append((time.time(), line))


# The commands whose +OK ends the AUTHORIZATION state (RFC 1939 4, RFC 5034 4);
# USER's +OK only asks for PASS.
POP3_LOGIN_COMMANDS = ("PASS", "APOP", "AUTH")


def _pop3_states(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The trace split by RFC 1939 state: before login, after it, from QUIT on."""
    auth: list[str] = []
    transaction: list[str] = []
    update: list[str] = []
    state = auth
    login_sent = False
    for line in lines:
        command = line[3:].split(" ", 1)[0].upper() if line.startswith("C: ") else ""
        if command == "QUIT" and state is transaction:
            state = update
        state.append(line)
        if command in POP3_LOGIN_COMMANDS:
            login_sent = True
        elif state is auth and login_sent and line.startswith("S: +OK"):
            state = transaction
    return auth, transaction, update


# -- the two hosts and the DNS server -------------------------------------------------


def _provider_config(dns_port: int, corp_smtp_port: int) -> str:
    return (
        f'hostname = "{PROVIDER}"\ndomains = ["isp.example"]\n'
        '[listen]\nsubmission = "127.0.0.1:0"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
        f"[relay]\nmx_port = {corp_smtp_port}\n"
        '[queue]\nretry_after = ["1s"]\ngive_up_after = "1m"\n'
    )


def _corp_config() -> str:
    return (
        f'hostname = "{CORP}"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\n'
    )


async def _start_host(root: Path, text: str, address: str, password: str) -> Running:
    root.mkdir(mode=0o700)
    (root / "postroom.toml").write_text(text, encoding="utf-8")
    config = load_config(root)
    await asyncio.to_thread(open_user_directory(config).add_user, address, password)
    return await start(config)


@dataclass
class World:
    """What the demo started, so that everything can be stopped whatever happens."""

    root: Path
    tap: LogTap
    dns: DemoDNS | None = None
    provider: Running | None = None
    corp: Running | None = None
    passwords: dict[str, str] = field(default_factory=dict)

    async def stop(self) -> None:
        for running in (self.provider, self.corp):
            if running is not None:
                with contextlib.suppress(Exception):
                    await running.stop(grace=2)
        self.provider = self.corp = None
        if self.dns is not None:
            self.dns.close()
            self.dns = None


async def _set_up(world: World, printer: Printer) -> tuple[Running, Running, DemoDNS]:
    world.passwords = {SMITH: secrets.token_urlsafe(12), BOSS: secrets.token_urlsafe(12)}
    world.dns = await start_dns(mail_zone("corp.example", CORP, "127.0.0.1"))
    world.corp = await _start_host(world.root / "corp", _corp_config(), BOSS,
                                   world.passwords[BOSS])
    corp_smtp = world.corp.address("smtp")
    world.provider = await _start_host(
        world.root / "isp", _provider_config(world.dns.address[1], corp_smtp[1]), SMITH,
        world.passwords[SMITH])
    submission = world.provider.address("submission")
    pop3 = world.corp.address("pop3")
    printer.header(f"Setting up in {world.root}")
    printer.line(f"DNS       127.0.0.1:{world.dns.address[1]} (UDP): corp.example MX 10 {CORP}, "
                 f"{CORP} A 127.0.0.1", indent=2)
    printer.line(f"provider  {PROVIDER} for isp.example: submission 127.0.0.1:{submission[1]} "
                 "(STARTTLS + AUTH)", indent=2)
    printer.line(f"receiver  {CORP} for corp.example: SMTP 127.0.0.1:{corp_smtp[1]}, "
                 f"POP3 127.0.0.1:{pop3[1]} (STLS)", indent=2)
    printer.line(f"users     {SMITH} and {BOSS}, random passwords", indent=2)
    printer.line()
    return world.provider, world.corp, world.dns


# -- the story -------------------------------------------------------------------------


def _body(raw: bytes) -> bytes:
    """The body of a message, line ends made LF (Maildir files and wire differ there)."""
    data = raw.replace(b"\r\n", b"\n")
    head, sep, body = data.partition(b"\n\n")
    return body if sep else b""


async def _wait_for(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not check():
        if loop.time() > deadline:
            raise DemoFailed(f"gave up waiting {WAIT_SECONDS:.0f}s for {what}")
        await asyncio.sleep(0.02)


async def _smtp_exchange(host: str, port: int, commands: list[str]) -> list[tuple[str, str]]:
    """Plain SMTP commands, one at a time: [(command, or "" for the greeting, reply)];
    a multi-line reply (RFC 5321 4.2.1) is shown as its first line and a count."""
    reader, writer = await asyncio.open_connection(host, port)
    result: list[tuple[str, str]] = []

    async def reply() -> str:
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(reader.readline(), 10)
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if not raw or len(line) < 4 or line[3] != "-":
                more = f" (and {len(lines) - 1} more lines)" if len(lines) > 1 else ""
                return lines[0][:3] + " " + lines[0][4:] + more

    try:
        result.append(("", await reply()))
        for command in commands:
            writer.write(command.encode("ascii") + b"\r\n")
            await writer.drain()
            result.append((command, await reply()))
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return result


async def _story(world: World, printer: Printer) -> list[str]:
    """Run the steps; return the problems found (none: the story held)."""
    from postroom.client.fetch import fetch
    from postroom.client.send import build_message, submit, wire_bytes

    provider, corp, dns = await _set_up(world, printer)
    problems: list[str] = []
    tap = world.tap

    # 1 -- submission
    message: EmailMessage = build_message(
        sender=SMITH, sender_name="Smith", to=[BOSS], subject=SUBJECT, body=BODY)
    sent = Exchange()
    host, port = provider.address("submission")
    begun = time.time()
    result = await submit(
        message, host=host, port=port, security="starttls", user=SMITH,
        password=world.passwords[SMITH], cafile=str(provider.config.tls.cert), trace=sent,
        helo=CLIENT_HELO)
    submitted = time.time()
    printer.header(f"1. Smith's mail client submits the message to {PROVIDER}",
                   submitted - begun)
    printer.line("SMTP submission (RFC 6409): STARTTLS first, then AUTH, then the message",
                 indent=3)
    for _, line in sent.lines:
        printer.line(line, indent=5)
    printer.line(f"accepted for {', '.join(result.accepted)}"
                 + (f"; {result.tls}, the server's certificate verified (the demo trusts "
                    "its self-signed one)" if result.tls else ""), indent=3)
    found = re.search(r"queued as (\S+)", result.reply)
    if not found or result.refused:
        raise DemoFailed(f"the provider did not queue the message: {result.reply} "
                         f"{result.refused or ''}".strip())
    queue_id = found.group(1)

    # Steps 2 to 4 run in the servers on their own; wait until the queue is empty
    # and the message is in the boss's Maildir.
    maildir = MailStore(corp.config.mail_dir).maildir_for(BOSS)
    await _wait_for(
        lambda: bool(tap.find(rf"^{queue_id}: removed$"))
        or bool(tap.find(rf"^{queue_id}: to=<{re.escape(BOSS)}>.*status=(bounced|expired)")),
        "the provider to relay the message")
    await _wait_for(lambda: bool(list_messages(maildir)), "the message in the Maildir")

    # 2 -- the queue
    queued = tap.find(rf"^submission: {queue_id}: (from=|to=)")
    printer.header(f"2. {PROVIDER} queues it durably", _span(
        tap.find(rf"^submission: {queue_id}: client="), queued))
    printer.line("written and fsynced to its queue before it answered 250 (RFC 5321 6.1)",
                 indent=3)
    _show_log(printer, PROVIDER, queued)
    queue_file = provider.relay.queue.message_path(queue_id)
    printer.line(f"queue file: {queue_file.relative_to(world.root)}", indent=5)

    # 3 -- the MX lookup and the relay
    relayed = tap.find(rf"^{queue_id}: ")
    sent_line = [x for x in relayed if "status=sent" in x.text]
    printer.header(f"3. {PROVIDER} looks up corp.example's MX and relays it with SMTP",
                   _span(queued[-1:], sent_line))
    printer.line(f"DNS queries it sent to 127.0.0.1:{dns.address[1]}:", indent=3)
    for answered in dns.queries:
        said = ", ".join(r.split(" IN ", 1)[-1] for r in answered.records) or (
            "no records" if answered.rcode == "NOERROR" else answered.rcode)
        printer.line(f"{answered.qname} {answered.qtype}?  ->  {said}", indent=5)
    if not any(q.qtype == "MX" and q.records for q in dns.queries):
        problems.append("the provider never asked DNS for corp.example's MX")
    printer.line("then SMTP to the MX host (STARTTLS, as RFC 3207 allows; no AUTH "
                 "between mail hosts):", indent=3)
    _show_log(printer, CORP, tap.find(r"^smtp: TLS established"))
    _show_log(printer, PROVIDER, relayed)
    if not sent_line:
        problems.append(f"the relay did not say status=sent for {queue_id}")
        raise DemoFailed("; ".join(problems))
    corp_id_match = re.search(r"queued as (\S+?)\)?$", sent_line[0].text)
    corp_id = corp_id_match.group(1) if corp_id_match else r"\S+"

    # 4 -- the receiving host
    filed = tap.find(rf"^smtp: {corp_id}: to=<{re.escape(BOSS)}>.*relay=local")
    printer.header(f"4. {CORP} accepts it for its own user and files it in the Maildir",
                   _span(tap.find(rf"^smtp: {corp_id}: client="), filed))
    _show_log(printer, CORP, tap.find(rf"^smtp: {corp_id}: "))
    for entry in list_messages(maildir):
        printer.line(f"Maildir file: {entry.path.relative_to(world.root)}", indent=5)
    printer.line("never an open relay: a stranger's client tries the same port",
                 indent=3)
    smtp_host, smtp_port = corp.address("smtp")
    replies = await _smtp_exchange(smtp_host, smtp_port, [
        "EHLO stranger.example", "MAIL FROM:<spam@stranger.example>",
        f"RCPT TO:<{STRANGER_RCPT}>", "RCPT TO:<nobody@corp.example>", "QUIT"])
    for command, reply in replies:
        if command:
            printer.line(f"C: {command}", indent=5)
        printer.line(f"S: {reply}", indent=5)
    refusals = dict(replies)
    if not refusals.get(f"RCPT TO:<{STRANGER_RCPT}>", "").startswith("554 5.7.1"):
        problems.append(f"{CORP} did not refuse to relay to {STRANGER_RCPT}")
    else:
        printer.line("refused: another domain (554 5.7.1) and an unknown user (550 5.1.1)",
                     indent=3)

    # 5a and 5b -- POP3
    got = Exchange()
    pop_host, pop_port = corp.address("pop3")
    dest = world.root / "boss-laptop"
    begun = time.time()
    fetched = await fetch(
        host=pop_host, port=pop_port, security="stls", user=BOSS,
        password=world.passwords[BOSS], dest=dest, cafile=str(corp.config.tls.cert),
        trace=got)
    ended = time.time()
    texts = [line for _, line in got.lines]
    auth, transaction, update = _pop3_states(texts)
    quit_at = next((t for t, line in got.lines if line.upper().startswith("C: QUIT")), ended)
    printer.header("5a. The boss's POP3 client logs on, lists and downloads", quit_at - begun)
    printer.line("Authentication state (RFC 1939: AUTHORIZATION): STLS, then the login",
                 indent=3)
    for line in auth:
        printer.line(line, indent=5)
    printer.line("Transaction state: list, download, mark for deletion", indent=3)
    for line in transaction:
        printer.line(line, indent=5)
    printer.header("5b. QUIT commits the deletion (Update state)", ended - quit_at)
    for line in update:
        printer.line(line, indent=5)
    left = list_messages(maildir)
    printer.line(f"{BOSS}'s maildrop on {CORP}: "
                 + ("empty" if not left else f"{len(left)} message(s) left"), indent=3)
    if left:
        problems.append(f"the maildrop still holds {len(left)} message(s) after QUIT")
    if fetched.downloaded != 1 or len(fetched.paths) != 1:
        problems.append(f"expected one message downloaded, got {fetched.downloaded}")
        return problems
    printer.line(f"downloaded {fetched.octets} octets to "
                 f"{fetched.paths[0].relative_to(world.root)}", indent=3)
    printer.line()

    # The message as it arrived, and its path.
    raw = fetched.paths[0].read_bytes()
    printer.header("The message as the boss received it")
    for text in raw.decode("utf-8", "replace").replace("\r\n", "\n").rstrip("\n").split("\n"):
        print(f"  | {text}", file=printer.out)
    printer.line()
    received = email.message_from_bytes(raw, policy=email.policy.compat32)
    hops = hops_of(received)
    printer.header(f"Its path, read from its {len(hops)} Received headers (oldest first)")
    for line in format_hops(hops, message_date(received), indent="  "):
        print(line, file=printer.out)
    if [h.by for h in hops] != [PROVIDER, CORP]:
        problems.append(f"the Received headers name {[h.by for h in hops]}, "
                        f"not [{PROVIDER!r}, {CORP!r}]")
    if _body(raw) != _body(wire_bytes(message)):
        problems.append("the body that arrived differs from the body that was sent")
    return problems


def _span(first: list[LogLine], last: list[LogLine]) -> float | None:
    if not first or not last:
        return None
    return max(0.0, last[-1].created - first[0].created)


async def _main(world: World, printer: Printer) -> list[str]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated: list[bool] = []
    if task is not None:
        def on_term() -> None:
            terminated.append(True)
            task.cancel()

        # Only the main thread may handle signals; elsewhere SIGTERM keeps its default.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await _story(world, printer)
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        # A second Ctrl-C or SIGTERM while stopping must not leave servers half stopped.
        stopping = asyncio.ensure_future(world.stop())
        while not stopping.done():
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                continue


def _write_log(path: Path, tap: LogTap) -> None:
    """Every log line the servers wrote, for a look after a --keep-data run."""
    with contextlib.suppress(OSError), path.open("w", encoding="utf-8") as f:
        for line in tap.lines:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(line.created))
            f.write(f"{stamp}.{int(line.created % 1 * 1000):03d} {line.logger}: {line.text}\n")


class _Terminated(Exception):
    """SIGTERM arrived; everything is stopped already."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _signals(handler: Callable[[int, object], None] | int) -> Iterator[None]:
    """SIGTERM (and during clean-up SIGINT) handled by `handler`; restored after."""
    names = (signal.SIGTERM,) if callable(handler) else (signal.SIGTERM, signal.SIGINT)
    saved = {}
    try:
        for name in names:
            saved[name] = signal.signal(name, handler)
    except ValueError:  # not the main thread: signals stay as they are
        pass
    try:
        yield
    finally:
        for name, previous in saved.items():
            signal.signal(name, previous)


def run_demo(*, keep_data: bool = False, out: TextIO | None = None,
             color: bool | None = None) -> int:
    """`postroom demo`: 0 when the message arrived intact and the maildrop is empty."""
    printer = Printer(out if out is not None else sys.stdout, color)
    printer.line(f"postroom demo: one message from {SMITH} to {BOSS}, every hop on loopback")
    printer.line()
    begun = time.monotonic()
    # SIGTERM before and after the event loop runs (the loop has its own handler).
    with _signals(_raise_terminated):
        try:
            root = Path(tempfile.mkdtemp(prefix="postroom-demo-"))
        except _Terminated:
            return EXIT_TERMINATED
        world = World(root, LogTap())
        try:
            with world.tap.attached():
                problems = asyncio.run(_main(world, printer))
        except DemoFailed as e:
            problems = [str(e)]
        except _Terminated:
            printer.line()
            printer.line("terminated: stopped the servers it started")
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            printer.line()
            printer.line("interrupted: stopped the servers it started")
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - a demo reports what broke, then cleans up
            problems = [f"{type(e).__name__}: {e}"]
        finally:
            with _signals(signal.SIG_IGN):  # the folder goes, whatever arrives now
                if keep_data:
                    _write_log(root / "postroom.log", world.tap)
                    printer.line(f"kept the demo's folder: {root}")
                else:
                    shutil.rmtree(root, ignore_errors=True)
    printer.line()
    took = time.monotonic() - begun
    if problems:
        for problem in problems:
            printer.verdict(False, problem)
        return EXIT_FAILED
    printer.verdict(True, f"the body arrived byte for byte, the maildrop on {CORP} is empty "
                    f"and relaying for strangers was refused ({_duration(took)} in all)")
    return 0
