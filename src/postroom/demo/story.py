"""The story the demo tells: its cast on loopback, and one function per step of DESIGN.md's seed.

The cast: a DNS server for the zone `example`, the provider's host mail.isp.example
(submission; relay, to the MX it asks that DNS server for) and corp.example's host
mx.corp.example (SMTP, POP3), in this process on free loopback ports. Each step prints
its real exchange and time and adds what did not hold to `Story.problems`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.policy
import re
import secrets
import smtplib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from postroom.client import fetch, send
from postroom.client.trace import format_hops, hops_of, message_date
from postroom.config import load_config
from postroom.demo.mailbox import MaildirView, PostgresView
from postroom.demo.nameserver import Answered, DemoDNS, Zone, Zones, start_dns
from postroom.demo.output import Exchange, LogLine, LogTap, Printer, pop3_states, span
from postroom.mailauth.keys import DKIMKey, KeyStore
from postroom.server.main import Running, start
from postroom.store.factory import open_store
from postroom.store.mailboxes import MaildirMailboxes
from postroom.store.pgconnect import describe

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
WAIT_SECONDS = 20.0  # for what the servers do on their own: steps 2 to 4


class DemoFailed(Exception):
    """A step did not do what the story says; str() says which and why."""


def _provider_config(dns_port: int, corp_smtp_port: int) -> str:
    return (
        f'hostname = "{PROVIDER}"\ndomains = ["isp.example"]\n'
        '[listen]\nsubmission = "127.0.0.1:0"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
        f"[relay]\nmx_port = {corp_smtp_port}\n"
        '[queue]\nretry_after = ["1s"]\ngive_up_after = "1m"\n'
    )


def _corp_config(dns_port: int) -> str:
    # The demo's hosts talk over loopback, which the checks leave alone by default
    # ([dmarc] ignore_clients): here the provider is a stranger like any other.
    return (
        f'hostname = "{CORP}"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\n'
        f'[dns]\nnameservers = ["127.0.0.1:{dns_port}"]\n'
        "[dmarc]\nignore_clients = []\n"
    )


def demo_zones(dkim: DKIMKey) -> Zones:
    """corp.example's MX; isp.example's SPF, DKIM and DMARC records and its mail host's
    name both ways (what the receiving host checks at step 4)."""
    # A TXT record's strings hold 255 octets each (RFC 1035 3.3.14); DKIM joins them.
    text = dkim.txt()
    strings = " ".join(f'"{text[i:i + 255]}"' for i in range(0, len(text), 255))
    return Zones(
        Zone("example", {
            ("corp.example", "MX"): [f"10 {CORP}."],
            (CORP, "A"): ["127.0.0.1"],
            ("isp.example", "TXT"): ['"v=spf1 ip4:127.0.0.1 -all"'],
            (dkim.record_name, "TXT"): [strings],
            ("_dmarc.isp.example", "TXT"): ['"v=DMARC1; p=reject"'],
            (PROVIDER, "A"): ["127.0.0.1"],
        }),
        Zone("127.in-addr.arpa", {("1.0.0.127.in-addr.arpa", "PTR"): [f"{PROVIDER}."]}),
    )


@dataclass
class World:
    """What the demo started, so that everything can be stopped whatever happens."""

    root: Path
    tap: LogTap
    started: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)
    store_url: str | None = None  # the receiving host's PostgreSQL store (None: Maildir)

    async def start(self, printer: Printer) -> Story:
        """Start the DNS server, then the receiving host, then the provider; say where."""
        passwords = {SMITH: secrets.token_urlsafe(12), BOSS: secrets.token_urlsafe(12)}
        # The provider's DKIM key, as `postroom dkim add` makes it, before DNS serves it.
        (self.root / "isp").mkdir(mode=0o700)
        key = await asyncio.to_thread(KeyStore(self.root / "isp").add, "isp.example", "demo")
        dns = await start_dns(demo_zones(key))
        self.started.callback(dns.close)
        corp_config = _corp_config(dns.address[1]) + (f'[store]\nurl = "{self.store_url}"\n'
                                                       if self.store_url else "")
        corp = await self._host("corp", corp_config, BOSS, passwords[BOSS])
        corp_smtp = corp.address("smtp")
        provider = await self._host(
            "isp", _provider_config(dns.address[1], corp_smtp[1]), SMITH, passwords[SMITH])
        printer.header(f"Setting up in {self.root}")
        printer.line(f"DNS       127.0.0.1:{dns.address[1]} (UDP): corp.example MX 10 {CORP}, "
                     f"{CORP} A 127.0.0.1; isp.example SPF, DKIM and DMARC (p=reject), "
                     f"{PROVIDER} A and PTR 127.0.0.1", indent=2)
        printer.line(f"provider  {PROVIDER} for isp.example: submission "
                     f"127.0.0.1:{provider.address('submission')[1]} (STARTTLS + AUTH)", indent=2)
        printer.line(f"receiver  {CORP} for corp.example: SMTP 127.0.0.1:{corp_smtp[1]}, "
                     f"POP3 127.0.0.1:{corp.address('pop3')[1]} (STLS)", indent=2)
        printer.line(f"users     {SMITH} and {BOSS}, random passwords", indent=2)
        mailbox: MaildirView | PostgresView
        if self.store_url:
            database = describe(self.store_url).rpartition("/")[2]
            printer.line(f"store     {CORP} keeps users and mail in PostgreSQL, database "
                         f"{database}", indent=2)
            mailbox = PostgresView(self.store_url, BOSS)
        else:
            mailbox = MaildirView(MaildirMailboxes(corp.config.mail_dir, CORP).maildir_for(BOSS),
                                  self.root)
        printer.line()
        return Story(self, printer, provider, corp, dns, passwords, mailbox)

    async def _host(self, folder: str, config_text: str, user: str, password: str) -> Running:
        """A host started from its config in root/folder, with `user` in its directory."""
        (self.root / folder).mkdir(mode=0o700, exist_ok=True)
        (self.root / folder / "postroom.toml").write_text(config_text, encoding="utf-8")
        config = load_config(self.root / folder)
        await asyncio.to_thread(open_store(config.store).users.add_user, user, password)
        running = await start(config)
        self.started.push_async_callback(running.stop, grace=2)
        return running

    async def stop(self) -> None:
        """Stop what started, the last first, each one even when another fails to stop."""
        with contextlib.suppress(Exception):
            await self.started.aclose()


@dataclass
class Story:
    """What the steps share: the hosts, the printer, what went wrong, what earlier steps learned."""

    world: World
    printer: Printer
    provider: Running
    corp: Running
    dns: DemoDNS
    passwords: dict[str, str]  # the users', drawn at random
    mailbox: MaildirView | PostgresView  # the boss's, on the receiving host
    problems: list[str] = field(default_factory=list)
    message: EmailMessage = field(default_factory=EmailMessage)  # as step 1 submitted it
    queue_id: str = ""  # the provider's, from step 1's 250 reply
    queued: list[LogLine] = field(default_factory=list)  # step 2's log lines
    corp_id: str = r"\S+"  # the receiving host's queue ID once step 3 has read it


async def tell(world: World, printer: Printer) -> list[str]:
    """Run the steps; return the problems found (none: the story held)."""
    story = await world.start(printer)
    await submission(story)
    await _relayed_and_filed(story)
    queue(story)
    mx_relay(story)
    receiving_host(story)
    await open_relay_check(story)
    download = await pop3(story)
    if download is not None:
        as_received(story, download)
    return story.problems


async def submission(story: Story) -> None:
    """1: Smith's mail client submits the message to the provider."""
    provider, printer = story.provider, story.printer
    story.message = send.build_message(
        sender=SMITH, sender_name="Smith", to=[BOSS], subject=SUBJECT, body=BODY)
    sent = Exchange()
    host, port = provider.address("submission")
    begun = time.time()
    result = await send.submit(story.message, send.SubmitOptions(
        host=host, port=port, security="starttls", user=SMITH,
        password=story.passwords[SMITH], cafile=str(provider.config.tls.cert),
        trace=sent, helo=CLIENT_HELO))
    printer.header(f"1. Smith's mail client submits the message to {PROVIDER}",
                   time.time() - begun)
    printer.note("SMTP submission (RFC 6409): STARTTLS first, then AUTH, then the message")
    printer.lines(line for _, line in sent)
    printer.note(f"accepted for {', '.join(result.accepted)}"
                 + (f"; {result.tls}, the server's certificate verified (the demo trusts "
                    "its self-signed one)" if result.tls else ""))
    found = re.search(r"queued as (\S+)", result.reply)
    if not found or result.refused:
        raise DemoFailed(f"the provider did not queue the message: {result.reply} "
                         f"{result.refused or ''}".strip())
    story.queue_id = found.group(1)


async def _relayed_and_filed(story: Story) -> None:
    """Steps 2 to 4 run in the servers on their own: wait until they are done."""
    tap, queue_id = story.world.tap, story.queue_id
    await _wait_for(
        lambda: bool(tap.find(rf"^{queue_id}: removed$"))
        or bool(tap.find(rf"^{queue_id}: to=<{re.escape(BOSS)}>.*status=(bounced|expired)")),
        "the provider to relay the message")
    await _wait_for(lambda: bool(story.mailbox.listing()),
                    f"the message in {story.mailbox.where}")


def queue(story: Story) -> None:
    """2: the provider queues it durably."""
    tap, printer, queue_id = story.world.tap, story.printer, story.queue_id
    story.queued = tap.find(rf"^submission: {queue_id}: (from=|to=)")
    printer.header(f"2. {PROVIDER} queues it durably", span(
        tap.find(rf"^submission: {queue_id}: client="), story.queued))
    printer.note("DKIM-signed (RFC 6376) with isp.example's key, then written and fsynced "
                 "to its queue before it answered 250 (RFC 5321 6.1)")
    signed = tap.find(rf"^submission: {queue_id}: DKIM-signed")
    if not signed:
        story.problems.append("the provider did not DKIM-sign the message")
    printer.log(PROVIDER, signed + story.queued)
    queue_file = story.provider.relay.queue.message_path(queue_id)
    printer.line(f"queue file: {queue_file.relative_to(story.world.root)}", indent=5)


def _routing(answered: Answered) -> bool:
    """A question the provider asked to route the message (the rest are the checks')."""
    return answered.qname == "corp.example" or answered.qname.endswith(".corp.example")


def _print_queries(printer: Printer, queries: list[Answered]) -> None:
    for answered in queries:
        said = ", ".join(r.split(" IN ", 1)[-1] for r in answered.records) or (
            "no records" if answered.rcode == "NOERROR" else answered.rcode)
        printer.line(f"{answered.qname} {answered.qtype}?  ->  {said}", indent=5)


def mx_relay(story: Story) -> None:
    """3: the provider looks up corp.example's MX and relays the message with SMTP."""
    tap, printer, dns = story.world.tap, story.printer, story.dns
    relayed = tap.find(rf"^{story.queue_id}: ")
    sent_line = [x for x in relayed if "status=sent" in x.text]
    printer.header(f"3. {PROVIDER} looks up corp.example's MX and relays it with SMTP",
                   span(story.queued[-1:], sent_line))
    printer.note(f"DNS queries it sent to 127.0.0.1:{dns.address[1]}:")
    _print_queries(printer, [q for q in dns.queries if _routing(q)])
    if not any(q.qtype == "MX" and q.records for q in dns.queries):
        story.problems.append("the provider never asked DNS for corp.example's MX")
    printer.note("then SMTP to the MX host (STARTTLS, as RFC 3207 allows; no AUTH "
                 "between mail hosts):")
    printer.log(CORP, tap.find(r"^smtp: TLS established"))
    printer.log(PROVIDER, relayed)
    if not sent_line:
        story.problems.append(f"the relay did not say status=sent for {story.queue_id}")
        raise DemoFailed("; ".join(story.problems))
    corp_id = re.search(r"queued as (\S+?)\)?$", sent_line[0].text)
    if corp_id:
        story.corp_id = corp_id.group(1)


def receiving_host(story: Story) -> None:
    """4: the receiving host accepts the message for its own user and files it."""
    tap, printer, corp_id = story.world.tap, story.printer, story.corp_id
    filed = tap.find(rf"^smtp: {corp_id}: to=<{re.escape(BOSS)}>.*relay=local")
    printer.header(f"4. {CORP} accepts it for its own user and files it in "
                   f"{story.mailbox.where}",
                   span(tap.find(rf"^smtp: {corp_id}: client="), filed))
    printer.note("checked first: SPF, DKIM, DMARC and iprev, recorded on top of the message "
                 "in an Authentication-Results header (RFC 8601); the DNS queries for them:")
    _print_queries(printer, [q for q in story.dns.queries if not _routing(q)])
    printer.log(CORP, tap.find(rf"^smtp: {corp_id}: "))
    checked = tap.find(rf"^smtp: {corp_id}: auth: ")
    if not checked or "dmarc=pass" not in checked[0].text:
        story.problems.append(f"{CORP} did not find the message passing DMARC")
    if not checked or "dkim=pass" not in checked[0].text:
        story.problems.append(f"{CORP} did not find the provider's DKIM signature valid")
    for line in story.mailbox.listing():
        printer.line(line, indent=5)


async def open_relay_check(story: Story) -> None:
    """4, continued: the receiving host is no open relay; a stranger's client tries it."""
    printer = story.printer
    printer.note("never an open relay: a stranger's client tries the same port")
    replies = await asyncio.to_thread(_smtp_exchange, *story.corp.address("smtp"), [
        "EHLO stranger.example", "MAIL FROM:<spam@stranger.example>",
        f"RCPT TO:<{STRANGER_RCPT}>", "RCPT TO:<nobody@corp.example>", "QUIT"])
    for command, reply in replies:
        if command:
            printer.line(f"C: {command}", indent=5)
        printer.line(f"S: {reply}", indent=5)
    if not dict(replies).get(f"RCPT TO:<{STRANGER_RCPT}>", "").startswith("554 5.7.1"):
        story.problems.append(f"{CORP} did not refuse to relay to {STRANGER_RCPT}")
    else:
        printer.note("refused: another domain (554 5.7.1) and an unknown user (550 5.1.1)")


async def pop3(story: Story) -> Path | None:
    """5a and 5b: the boss's POP3 client logs on, lists and downloads; QUIT commits the
    deletion. The downloaded file, or None when there is not exactly one."""
    printer, root, corp = story.printer, story.world.root, story.corp
    got = Exchange()
    pop_host, pop_port = corp.address("pop3")
    begun = time.time()
    fetched = await fetch.fetch(fetch.FetchOptions(
        host=pop_host, port=pop_port, security="stls", user=BOSS,
        password=story.passwords[BOSS], dest=root / "boss-laptop",
        cafile=str(corp.config.tls.cert), trace=got))
    ended = time.time()
    auth, transaction, update = pop3_states([line for _, line in got])
    quit_at = next((t for t, line in got if line.upper().startswith("C: QUIT")), ended)
    printer.header("5a. The boss's POP3 client logs on, lists and downloads", quit_at - begun)
    printer.note("Authentication state (RFC 1939: AUTHORIZATION): STLS, then the login")
    printer.lines(auth)
    printer.note("Transaction state: list, download, mark for deletion")
    printer.lines(transaction)
    printer.header("5b. QUIT commits the deletion (Update state)", ended - quit_at)
    printer.lines(update)
    left = story.mailbox.listing()
    printer.note(f"{BOSS}'s maildrop on {CORP}: "
                 + ("empty" if not left else f"{len(left)} message(s) left"))
    if left:
        story.problems.append(f"the maildrop still holds {len(left)} message(s) after QUIT")
    if fetched.downloaded != 1 or len(fetched.paths) != 1:
        story.problems.append(f"expected one message downloaded, got {fetched.downloaded}")
        return None
    printer.note(f"downloaded {fetched.octets} octets to {fetched.paths[0].relative_to(root)}")
    printer.line()
    return fetched.paths[0]


def as_received(story: Story, download: Path) -> None:
    """The end: the message as the boss received it, and its path from its Received headers."""
    printer = story.printer
    raw = download.read_bytes()
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
        story.problems.append(f"the Received headers name {[h.by for h in hops]}, "
                              f"not [{PROVIDER!r}, {CORP!r}]")
    if _body(raw) != _body(send.wire_bytes(story.message)):
        story.problems.append("the body that arrived differs from the body that was sent")


def _body(raw: bytes) -> bytes:
    """The body of a message, line ends made LF (Maildir files and wire differ there)."""
    head, sep, body = raw.replace(b"\r\n", b"\n").partition(b"\n\n")
    return body if sep else b""


async def _wait_for(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_SECONDS
    while not check():
        if loop.time() > deadline:
            raise DemoFailed(f"gave up waiting {WAIT_SECONDS:.0f}s for {what}")
        await asyncio.sleep(0.02)


def _smtp_exchange(host: str, port: int, commands: list[str]) -> list[tuple[str, str]]:
    """Plain SMTP commands, one at a time: [(command, or "" for the greeting, reply)];
    a multi-line reply (RFC 5321 4.2.1) is shown as its first line and a count."""
    def said(code: int, text: bytes) -> str:
        first, *more = text.decode("utf-8", "replace").split("\n")
        return f"{code} {first}" + (f" (and {len(more)} more lines)" if more else "")

    smtp = smtplib.SMTP(local_hostname="stranger.example", timeout=10)  # no getfqdn() lookup
    try:
        return [("", said(*smtp.connect(host, port)))] + [
            (command, said(*smtp.docmd(command))) for command in commands]
    finally:
        smtp.close()
