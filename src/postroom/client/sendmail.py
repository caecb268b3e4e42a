"""`postroom sendmail`: the /usr/sbin/sendmail interface for local programs (cron, mailx, scripts).

It reads one message on standard input, takes the recipients from the
arguments (or, with -t, from the To/Cc/Bcc headers), completes the header
section the way a submission server must (RFC 6409 8: Date, Message-ID and
From when missing), removes Bcc, turns every line ending into CRLF, queues
the message durably and tells the running server through its control
socket (postroom.control) so that it is sent at once. A server that is not
running sends it when it starts. Exit status 0 means queued; otherwise a
sysexits.h code and one line on standard error.

Options understood (the common subset of Sendmail's and Postfix's):

    -t            recipients from To, Cc and Bcc (Resent-* when present), plus
                  those given as arguments (Postfix's behaviour)
    -f ADDR, -r   envelope sender; "" or "<>" is the null sender.
                  Default: the invoking user's address when it has a mailbox
                  here (user@hostname, else user@ the first local domain),
                  else postmaster@ the first local domain: a bounce must
                  reach someone
    -F NAME       full name for the From header this adds when it is missing
    -i, -oi       a line with a single "." does not end the message
    -N DSN        NOTIFY: "never" or a comma list of success, delay, failure (RFC 3461)
    -R RET        "full" or "hdrs" (RFC 3461 4.3)
    -V ENVID      envelope ID (RFC 3461 4.4)
    -B TYPE       body type: 7BIT or 8BITMIME (RFC 6152)
    -v            say the queue ID on standard error
    -bm           deliver mail (the default); -bi and -I (rebuild aliases) do nothing
    --data DIR, --config FILE   as for every postroom command

Accepted and ignored, as Sendmail does: every other -o option (-odi, -oem,
-oQ...), -O, -L, -h, -p, -X, -G, -U, -m, -n.

Running it needs write access to the queue folder: run it as the user who
owns the data folder (a system-wide setup makes a small setgid wrapper).
"""

from __future__ import annotations

import contextlib
import email.utils
import getopt
import getpass
import itertools
import os
import pwd
import re
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

from postroom.canonical import canonical
from postroom.config import Config, ConfigError, load_config, postmaster_address
from postroom.control import ControlError, tell_server, tell_server_in_words, wake_request
from postroom.ids import new_queue_id
from postroom.mailauth.keys import KeyRing
from postroom.mailauth.sign import Signer, signed_stream
from postroom.queue.envelope import Envelope, Recipient
from postroom.queueopen import open_queue
from postroom.store.api import DirectoryError
from postroom.store.factory import open_store

# sysexits.h: what Sendmail's callers test for.
EX_OK = 0
EX_USAGE = 64  # bad arguments or addresses
EX_DATAERR = 65  # the message itself is unacceptable (too large)
EX_TEMPFAIL = 75  # try again later: the queue cannot be written now

PROG = "postroom sendmail"
MAX_HEADER_SECTION = 1024 * 1024  # octets of headers kept in memory before giving up
CHUNK = 64 * 1024  # body octets handed to the queue at a time

_SHORT_OPTIONS = "B:b:F:f:Gh:IiL:mN:nO:o:p:R:r:tUV:vX:"
_LONG_OPTIONS = ["data=", "config=", "help"]
# RFC 5322 3.6.8: field-name = 1*ftext (printable ASCII except ":"); obsolete
# syntax (4.5) allows white space before the colon.
_FIELD = re.compile(rb"([!-9;-~]+)[ \t]*:")
_NOTIFY_WORDS = {"SUCCESS", "DELAY", "FAILURE"}


class UsageError(Exception):
    """Bad arguments or addresses: exit EX_USAGE."""


class DataError(Exception):
    """The message cannot be accepted as it is: exit EX_DATAERR."""


@dataclass
class Options:
    """The parsed command line."""

    recipients: list[str] = field(default_factory=list)
    sender: str | None = None  # None: the invoking user's address
    full_name: str | None = None
    extract: bool = False  # -t
    ignore_dots: bool = False  # -i / -oi
    notify: tuple[str, ...] | None = None
    ret: str | None = None
    envid: str | None = None
    body: str | None = None
    verbose: bool = False
    mode: str = "m"  # -bm
    data_dir: Path | None = None
    config_file: Path | None = None
    help: bool = False


def parse_args(argv: list[str]) -> Options:
    """Sendmail's getopt-style arguments (options may follow recipients); UsageError if bad."""
    try:
        pairs, rest = getopt.gnu_getopt(argv, _SHORT_OPTIONS, _LONG_OPTIONS)
    except getopt.GetoptError as e:
        raise UsageError(str(e)) from None
    opts = Options(recipients=list(rest))
    for name, value in pairs:
        if name in ("-f", "-r"):
            opts.sender = value
        elif name == "-F":
            opts.full_name = value
        elif name == "-t":
            opts.extract = True
        elif name == "-i" or (name == "-o" and value == "i"):
            opts.ignore_dots = True
        elif name == "-N":
            opts.notify = _parse_notify(value)
        elif name == "-R":
            if value.upper() not in ("FULL", "HDRS"):
                raise UsageError(f"-R must be full or hdrs, not {value!r}")
            opts.ret = value.upper()
        elif name == "-V":
            if not value or len(value) > 100 or not value.isascii() or not value.isprintable():
                raise UsageError("-V needs at most 100 printable ASCII characters")
            opts.envid = value
        elif name == "-B":
            if value.upper() not in ("7BIT", "8BITMIME"):
                raise UsageError(f"-B must be 7BIT or 8BITMIME, not {value!r}")
            opts.body = value.upper()
        elif name == "-v":
            opts.verbose = True
        elif name == "-b":
            if value not in ("m", "i"):
                raise UsageError(f"-b{value} is not supported (only -bm, to send mail)")
            opts.mode = value
        elif name == "-I":
            opts.mode = "i"
        elif name == "--data":
            opts.data_dir = Path(value)
        elif name == "--config":
            opts.config_file = Path(value)
        elif name == "--help":
            opts.help = True
        # Everything else (-o*, -O, -L, -h, -p, -X, -G, -U, -m, -n) changes nothing here.
    return opts


def _parse_notify(value: str) -> tuple[str, ...]:
    words = tuple(w.strip().upper() for w in value.split(",") if w.strip())
    if words == ("NEVER",):
        return words
    if not words or not set(words) <= _NOTIFY_WORDS:
        raise UsageError(f"-N must be never or a list of success, delay, failure: {value!r}")
    return words


def default_sender(user: str, config: Config) -> str:
    """The envelope sender without -f: an address whose mail is delivered here.

    The invoking user's own (at the host name, else at the first local domain)
    when the user directory files mail for it in a mailbox; else the
    postmaster's, which always reaches the administrator. Postfix's default
    user@$myorigin reaches a person through aliases(5); a sender nobody reads
    would drop its bounces.
    """
    postmaster = postmaster_address(config)
    if not config.users_db.exists():
        return postmaster  # no users yet (reading would create the database)
    candidates = []
    for domain in (config.hostname, postmaster.rpartition("@")[2]):
        with contextlib.suppress(UsageError):
            candidates.append(_address(user, domain, "sender"))
    directory = open_store(config.store).users
    try:
        for address in dict.fromkeys(candidates):
            expansion = directory.expand(address)
            # Mailboxes only: local delivery cannot forward to remote targets.
            if expansion is not None and expansion.mailboxes and not expansion.remote:
                return address
    except (sqlite3.Error, DirectoryError):
        pass  # an unreadable directory: the postmaster's address still works
    finally:
        directory.close()
    return postmaster


def invoking_user() -> str:
    """The login name of the real user (not $USER, which the caller controls)."""
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a uid with no passwd entry (a container's)
        return getpass.getuser()


# -- the message -----------------------------------------------------------------


def _lines(stream: BinaryIO, ignore_dots: bool) -> Iterator[bytes]:
    """Standard input as lines without their endings, ending early at "." unless -i."""
    for raw in stream:
        line = raw[:-1] if raw.endswith(b"\n") else raw
        if line.endswith(b"\r"):
            line = line[:-1]
        if line == b"." and not ignore_dots:
            return  # Sendmail's end of input without -i
        yield line


@dataclass
class Header:
    name: str
    lines: list[bytes]  # the field's lines without line endings (continuations included)

    @property
    def value(self) -> str:
        text = b" ".join(line.strip() for line in self.lines)
        return text.split(b":", 1)[1].strip().decode("utf-8", "replace")


def read_headers(lines: Iterator[bytes]) -> tuple[list[Header], list[bytes]]:
    """The header section, and the body's first line when no blank line came before it."""
    headers: list[Header] = []
    size = 0
    for line in lines:
        size += len(line) + 2
        if size > MAX_HEADER_SECTION:
            raise DataError("the header section is larger than 1 MiB")
        if line == b"":
            break
        if line[:1] in (b" ", b"\t") and headers:
            headers[-1].lines.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            return headers, [line]  # no header section: this is already the body
        headers.append(Header(match.group(1).decode("ascii"), [line]))
    return headers, []


def header_recipients(headers: list[Header]) -> list[str]:
    """-t: addresses in To, Cc and Bcc; Resent-To/Cc/Bcc instead when any Resent- field exists."""
    resent = any(h.name.lower().startswith("resent-") for h in headers)
    names = {"resent-to", "resent-cc", "resent-bcc"} if resent else {"to", "cc", "bcc"}
    values = [h.value for h in headers if h.name.lower() in names]
    return [address for _name, address in email.utils.getaddresses(values) if address]


def _body(lines: Iterable[bytes], seen: dict[str, bool]) -> Iterator[bytes]:
    """The body lines with CRLF endings, in chunks; notes whether any octet is 8-bit."""
    buffer: list[bytes] = []
    size = 0
    for line in lines:
        buffer.append(line + b"\r\n")
        size += len(line) + 2
        if not line.isascii():
            seen["8bit"] = True
        if size >= CHUNK:
            yield b"".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield b"".join(buffer)


def _limited(chunks: Iterable[bytes], limit: int) -> Iterator[bytes]:
    total = 0
    for chunk in chunks:
        total += len(chunk)
        if total > limit:
            raise DataError(f"the message is larger than the limit of {limit} octets")
        yield chunk


def _address(raw: str, hostname: str, what: str) -> str:
    """Canonical form of an address; a bare name gets @hostname (Sendmail's local delivery)."""
    address = raw.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1].strip()
    if "@" not in address:
        address = f"{address}@{hostname}"
    try:
        return canonical(address)
    except ValueError:
        raise UsageError(f"invalid {what} address: {raw!r}") from None


def submit(stream: BinaryIO, opts: Options, config: Config, *, user: str | None = None
           ) -> Envelope:
    """Read the message from `stream`, complete it and queue it; returns the queued envelope.

    Raises UsageError, DataError, or OSError when the queue cannot be written.
    """
    now = time.time()
    user = user or invoking_user()
    own_address = default_sender(user, config)
    sender = _envelope_sender(opts.sender, own_address, config.hostname)
    lines = _lines(stream, opts.ignore_dots)
    headers, first = read_headers(lines)
    recipients = _recipients(opts, headers, config.hostname)
    queue_id = new_queue_id(now)
    head = _head(headers, queue_id, now, config.hostname, opts.full_name, sender or own_address)
    seen = {"8bit": not head.isascii()}
    envelope = Envelope(
        queue_id=queue_id,
        sender=sender,
        recipients=[Recipient(address=a, notify=opts.notify) for a in recipients],
        created=now,
        ret=opts.ret,
        envid=opts.envid,
        smtputf8=not (sender.isascii() and all(a.isascii() for a in recipients)),
        body=opts.body,
        auth_user=user,
        extra={"submitted_by": "sendmail"},
    )

    def chunks() -> Iterator[bytes]:
        yield head
        yield from _body(itertools.chain(first, lines), seen)
        if envelope.body is None:  # the store writes the envelope after the last chunk
            envelope.body = "8BITMIME" if seen["8bit"] else "7BIT"

    content: Iterable[bytes] = _limited(chunks(), config.smtp.max_message_size)
    if config.dkim.sign:  # DKIM: the mail of a local user, signed like submission's
        content = signed_stream(content, Signer(KeyRing(config.data_dir)).start(),
                                f"sendmail: {queue_id}: ")
    open_queue(config).add(envelope, content)
    return envelope


def _envelope_sender(given: str | None, own_address: str, hostname: str) -> str:
    """-f's address, "" for the null reverse-path (RFC 5321 4.5.5), else the user's own."""
    if given is None:
        return own_address
    if given.strip() in ("", "<>"):
        return ""
    return _address(given, hostname, "sender")


def _recipients(opts: Options, headers: list[Header], hostname: str) -> list[str]:
    """The arguments' addresses, and with -t the header fields' (each once)."""
    wanted = list(opts.recipients)
    if opts.extract:
        wanted += header_recipients(headers)
    recipients: list[str] = []
    for value in wanted:
        parsed = [a for _n, a in email.utils.getaddresses([value]) if a] or [value]
        for raw in parsed:
            address = _address(raw, hostname, "recipient")
            if address not in recipients:
                recipients.append(address)
    if not recipients:
        raise UsageError("no recipients: give addresses as arguments, or use -t")
    return recipients


def _head(headers: list[Header], queue_id: str, now: float, hostname: str,
          full_name: str | None, author: str) -> bytes:
    """The header section as queued: our Received field first, Bcc dropped, and Date,
    Message-ID and From added where the message has none."""
    present = {h.name.lower() for h in headers}
    date = email.utils.formatdate(now, localtime=True)
    section = [
        f"Received: by {hostname} (postroom sendmail, uid {os.getuid()})".encode(),
        f"\tid {queue_id}; {date}".encode(),
    ]
    for header in headers:
        # RFC 5322 3.6.2: Bcc must not reach the other recipients; dropped in every mode.
        if header.name.lower() not in ("bcc", "resent-bcc"):
            section += header.lines
    # RFC 6409 8.1-8.3: a submission server completes what the client left out.
    if "date" not in present:
        section.append(f"Date: {date}".encode())
    if "message-id" not in present:
        section.append(f"Message-ID: {email.utils.make_msgid(domain=hostname)}".encode())
    if "from" not in present:
        pretty = email.utils.formataddr((full_name or "", author), charset="utf-8")
        section.append(f"From: {pretty}".encode())
    return b"".join(line + b"\r\n" for line in section) + b"\r\n"


# -- the command -----------------------------------------------------------------


def usage() -> str:
    return (__doc__ or "").split("\n\n", 1)[1].split("Running it needs")[0].rstrip() + "\n"


def main(
    argv: list[str],
    *,
    data_dir: Path,
    config_file: Path | None = None,
    stdin: BinaryIO | None = None,
    stdout: TextIO | None = None,
) -> int:
    """Run `sendmail ARGS`; returns the exit status (see the module docstring)."""
    err = sys.stderr

    def fail(code: int, message: str) -> int:
        print(f"{PROG}: error: {message}", file=err)
        return code

    try:
        opts = parse_args(argv)
    except UsageError as e:
        return fail(EX_USAGE, str(e))
    if opts.help:
        print(f"usage: {PROG} [options] [recipient ...] < message\n", file=stdout or sys.stdout)
        print(usage(), file=stdout or sys.stdout)
        return EX_OK
    if opts.mode == "i":
        return EX_OK  # no alias database to rebuild: aliases live in the user directory
    try:
        config = load_config(opts.data_dir or data_dir, opts.config_file or config_file)
    except ConfigError as e:
        return fail(EX_TEMPFAIL, str(e))
    try:
        envelope = submit(stdin or sys.stdin.buffer, opts, config)
    except UsageError as e:
        return fail(EX_USAGE, str(e))
    except DataError as e:
        return fail(EX_DATAERR, str(e))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        return fail(EX_TEMPFAIL, f"cannot queue the message: {e.strerror or e}{where}")
    if opts.verbose:
        told = tell_server_in_words(config.data_dir, wake_request(envelope.queue_id))
        print(f"{PROG}: queued as {envelope.queue_id}; {told}", file=err)
    else:
        with contextlib.suppress(ControlError):  # queued: the server finds it later
            tell_server(config.data_dir, request=wake_request(envelope.queue_id))
    return EX_OK
