"""`postroom trace`: a message's path, hop by hop, read from its Received headers.

Every SMTP host that accepts a message prepends a Received header (RFC 5321
4.4), so the bottom one is the oldest hop. Its grammar (RFC 5321 4.4, RFC 5322
3.6.7) is a list of clauses, `from`, `by`, `via`, `with`, `id`, `for`, each
with comments in parentheses, then `;` and the date. Hosts fill it in very
differently, so the parser is lenient: it splits the header into words and
comments, takes whatever clauses it finds, and looks for TLS in the comments
in the shapes postroom ("using TLSv1.3 with cipher X"), Postfix (the same
words, in the `from` part), Sendmail and Gmail ("version=TLS1_3 cipher=X")
and Exim ("(TLS1.3) tls X") write. The `with` word says TLS and AUTH too (RFC
3848: ESMTPS, ESMTPSA; RFC 6531: UTF8SMTPS ...).

A message is named by its file, or by a queue ID: the one in a Received
header's `id` clause, which postroom also uses as the queue file's name and in
every log line about the message.
"""

from __future__ import annotations

import email
import email.utils
import re
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from postroom.config import Config

# RFC 5321 4.4 "Additional-Registered-Clauses" aside, these start a clause.
CLAUSES = ("from", "by", "via", "with", "id", "for")

# Header bytes read from a stored message to find its Received fields; a header
# section longer than this is not one a mail host wrote.
MAX_HEADER_BYTES = 1024 * 1024

# RFC 3848 and RFC 6531 3.7.3: [UTF8](SMTP|ESMTP|LMTP) then S (TLS), then A (AUTH).
_PROTOCOL = re.compile(r"(UTF8)?(E?SMTP|LMTP)(S?)(A?)", re.IGNORECASE)
_TLS_VERSION = re.compile(r"\b(?:TLS ?v?|TLS_?)(1(?:[._][0-3])?)\b|\b(SSLv3)\b", re.IGNORECASE)
_TLS_CIPHER = re.compile(r"(?:with cipher|cipher=)\s*([A-Za-z0-9_-]+)", re.IGNORECASE)
_ADDRESS_LITERAL = re.compile(r"\[(?:IPv6:)?([0-9A-Fa-f:.]+)\]")


@dataclass(frozen=True)
class Hop:
    """What one Received header says about one hop; None where it says nothing."""

    helo: str | None  # the `from` name: what the client said in HELO/EHLO
    client_name: str | None  # the client's name from reverse DNS, when the host wrote one
    client_ip: str | None
    by: str | None  # the host that received the message
    software: str | None  # "postroom", "Postfix" ... from the comment after `by`
    protocol: str | None  # the `with` word, upper-cased: ESMTPSA, SMTP, LMTP, HTTP ...
    tls: bool
    tls_version: str | None  # "TLSv1.3"
    tls_cipher: str | None
    authenticated: bool
    queue_id: str | None
    recipient: str | None
    when: datetime | None  # always with a time zone (UTC when the header says -0000)

    @property
    def client(self) -> str:
        """The sending side, as "helo (name [ip])" with the parts that are known."""
        inner = " ".join(x for x in (self.client_name, f"[{self.client_ip}]"
                                     if self.client_ip else None) if x)
        if self.helo and inner:
            return f"{self.helo} ({inner})"
        return self.helo or inner or "(unknown)"


def protocol_flags(protocol: str | None) -> tuple[bool, bool]:
    """(TLS, AUTH) as the `with` word states them (RFC 3848, RFC 6531 3.7.3)."""
    match = _PROTOCOL.fullmatch(protocol or "")
    if match is None:
        return False, False
    return bool(match.group(3)), bool(match.group(4))


def _unfold(value: str) -> str:
    return " ".join(value.split())


def _split(text: str) -> list[tuple[str, str]]:
    """("word", w) and ("comment", c) tokens; comments nest and take backslash escapes."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch == "(":
            depth, start = 0, i
            while i < n:
                if text[i] == "\\":
                    i += 2
                    continue
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            tokens.append(("comment", text[start + 1 : i - 1 if depth == 0 else i].strip()))
        else:
            start = i
            while i < n and not text[i].isspace() and text[i] != "(":
                i += 1
            tokens.append(("word", text[start:i]))
    return tokens


def _split_date(value: str) -> tuple[str, str]:
    """The clauses and the date: the date follows the last ";" outside comments."""
    depth, cut = 0, -1
    for i, ch in enumerate(value):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        elif ch == ";" and depth == 0:
            cut = i
    if cut < 0:
        return value, ""
    return value[:cut], value[cut + 1 :]


def _parse_date(text: str) -> datetime | None:
    words = " ".join(w for kind, w in _split(text) if kind == "word")
    if not words:
        return None
    try:
        when = email.utils.parsedate_to_datetime(words)
    except (TypeError, ValueError, IndexError):
        return None
    # RFC 5322 3.3: "-0000" means the zone is unknown, the time is UTC.
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _tls_version(text: str) -> str | None:
    match = _TLS_VERSION.search(text)
    if match is None:
        return None
    if match.group(2):
        return "SSLv3"
    number = match.group(1).replace("_", ".")
    return f"TLSv{number if '.' in number else number + '.0'}"


def parse_received(value: str) -> Hop:
    """One Received header's value (folded or not) as a Hop; never raises."""
    clauses_text, date_text = _split_date(_unfold(value))
    clauses, comments = _clauses(clauses_text)

    def first(name: str) -> str | None:
        words = clauses.get(name) or []
        return words[0] if words else None

    helo, client_name, client_ip = _client(first("from"), comments.get("from", []))
    by_comments = comments.get("by", [])
    software = None
    if by_comments:  # "(Postfix)", "(Postfix, from userid 0)", "(postroom)"
        software = by_comments[0].split(",")[0].strip() or None
    protocol = first("with")
    protocol = protocol.upper() if protocol else None
    said_tls, said_auth = protocol_flags(protocol)
    every_comment = " ".join(c for cs in comments.values() for c in cs)
    tls_version, tls_cipher = _tls(clauses, every_comment)
    recipient = first("for")
    if recipient:
        recipient = recipient.strip("<>") or None
    return Hop(
        helo=helo,
        client_name=client_name,
        client_ip=client_ip,
        by=first("by"),
        software=software,
        protocol=protocol,
        tls=said_tls or tls_version is not None or tls_cipher is not None,
        tls_version=tls_version,
        tls_cipher=tls_cipher,
        authenticated=said_auth or "authenticated sender" in every_comment.lower(),
        queue_id=first("id"),
        recipient=recipient,
        when=_parse_date(date_text),
    )


def _clauses(text: str) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """The words of each clause (from, by, via, with, id, for) and the comments after
    each, keyed by clause name ("" for what comes before the first)."""
    clauses: dict[str, list[str]] = {}
    comments: dict[str, list[str]] = {}
    current = ""
    for kind, word in _split(text):
        if kind == "comment":
            comments.setdefault(current, []).append(word)
        elif word.lower() in CLAUSES and word.lower() not in clauses:
            current = word.lower()
            clauses[current] = []
        else:
            clauses.setdefault(current, []).append(word)
    return clauses, comments


def _client(
    helo: str | None, from_comments: list[str]
) -> tuple[str | None, str | None, str | None]:
    """(HELO name, client host name, client IP) from the from clause and its comment."""
    client_name = client_ip = None
    if helo:  # Exim: "from [ip] (helo=name)", the address first
        literal = _ADDRESS_LITERAL.fullmatch(helo)
        client_ip = literal.group(1) if literal else None
    for comment in from_comments[:1]:  # the TCP-info comment comes first
        literal = _ADDRESS_LITERAL.search(comment)
        client_ip = literal.group(1) if literal else client_ip
        name = comment[: literal.start()].strip() if literal else comment.strip()
        if name.lower().startswith("helo="):
            helo = name[5:]
        elif name and "=" not in name and " " not in name and name.lower() != "unknown":
            client_name = name
    return helo, client_name, client_ip


def _tls(clauses: dict[str, list[str]], every_comment: str) -> tuple[str | None, str | None]:
    """(TLS version, cipher) as the comments (Postfix, postroom) or the with clause's
    extra words (Exim, Sendmail) name them."""
    extra_words = " ".join(" ".join(clauses.get(k, [])[1:]) for k in clauses)
    version = _tls_version(every_comment) or _tls_version(extra_words)
    cipher_match = _TLS_CIPHER.search(every_comment)
    cipher = cipher_match.group(1) if cipher_match else None
    with_words = clauses.get("with", [])
    if cipher is None and "tls" in (w.lower() for w in with_words[1:-1]):
        cipher = with_words[[w.lower() for w in with_words].index("tls", 1) + 1]
    return version, cipher


def hops_of(message: Message) -> list[Hop]:
    """The message's hops, oldest first (each host prepends its Received header)."""
    return [parse_received(str(v)) for v in reversed(message.get_all("Received") or [])]


def message_date(message: Message) -> datetime | None:
    value = message.get("Date")
    return _parse_date(str(value)) if value else None


# -- showing a path ------------------------------------------------------------------


def human_delay(seconds: float) -> str:
    sign, seconds = ("-" if seconds < 0 else ""), abs(seconds)
    if seconds < 60:
        return f"{sign}{seconds:.0f}s"
    if seconds < 3600:
        return f"{sign}{int(seconds // 60)}m {int(seconds % 60)}s"
    if seconds < 86400:
        return f"{sign}{int(seconds // 3600)}h {int(seconds % 3600 // 60)}m"
    return f"{sign}{int(seconds // 86400)}d {int(seconds % 86400 // 3600)}h"


def delays(hops: list[Hop], date: datetime | None) -> list[str]:
    """Per hop: the time since the previous hop (for the first, since the Date header)."""
    result = []
    previous = date
    for i, hop in enumerate(hops):
        if hop.when is None or previous is None:
            result.append("")
        else:
            since = "after Date" if i == 0 else "after the previous hop"
            took = (hop.when - previous).total_seconds()
            note = " (clocks differ)" if took < 0 else ""
            result.append(f"{human_delay(took)} {since}{note}")
        previous = hop.when or previous
    return result


def describe_with(hop: Hop) -> str:
    """ "ESMTPSA (TLS, AUTH)": the protocol and what the hop's header says of it."""
    facts = [word for word, present in (("TLS", hop.tls), ("AUTH", hop.authenticated))
             if present]
    protocol = hop.protocol or "?"
    return f"{protocol} ({', '.join(facts)})" if facts else protocol


def format_hops(hops: list[Hop], date: datetime | None, indent: str = "") -> list[str]:
    """The path as lines: one block per hop, labels aligned."""
    lines: list[str] = []
    for number, (hop, delay) in enumerate(zip(hops, delays(hops, date), strict=True), 1):
        by = hop.by or "(unknown)"
        rows = [
            ("from", hop.client),
            ("by", f"{by} ({hop.software})" if hop.software else by),
            ("with", describe_with(hop)),
        ]
        if hop.tls_version or hop.tls_cipher:
            rows.append(("tls", " ".join(x for x in (hop.tls_version, hop.tls_cipher) if x)))
        if hop.queue_id:
            rows.append(("id", hop.queue_id))
        if hop.recipient:
            rows.append(("for", f"<{hop.recipient}>"))
        if hop.when is not None:
            stamp = hop.when.strftime("%Y-%m-%d %H:%M:%S %z")
            rows.append(("time", f"{stamp}" + (f"  ({delay})" if delay else "")))
        head = f"{indent}hop {number}"
        for label, value in rows:
            lines.append(f"{head:<{len(indent) + 7}}{label:<5} {value}")
            head = indent
    return lines


def format_trace(message: Message, source: str) -> list[str]:
    """The whole report for one message: what it is, then its path."""
    hops = hops_of(message)
    lines = [f"{source}"]
    for name in ("Message-ID", "Subject", "From", "Date"):
        if message.get(name):
            lines.append(f"  {name + ':':<12}{_unfold(str(message[name]))}")
    if not hops:
        lines.append("  no Received headers: the message has not passed through a mail host")
        return lines
    plural = "s" if len(hops) != 1 else ""
    lines.append(f"  {len(hops)} hop{plural}, oldest first:")
    lines.extend(format_hops(hops, message_date(message), indent="  "))
    date, last = message_date(message), hops[-1].when
    if date is not None and last is not None:
        lines.append(f"  in transit {human_delay((last - date).total_seconds())} "
                     f"from its Date to the last hop")
    return lines


# -- finding a message ---------------------------------------------------------------


def read_headers(path: Path) -> Message:
    """The header section of a stored message (the body is not read); a queue file is
    read past its envelope line."""
    from postroom.queue.queuefile import open_content

    f, _ = open_content(path)
    with f:
        data = b""
        while len(data) < MAX_HEADER_BYTES:
            chunk = f.read(65536)
            if not chunk:
                break
            data += chunk
            if b"\r\n\r\n" in data or b"\n\n" in data:
                break
    return email.message_from_bytes(data)


def _stored_messages(config: Config) -> Iterator[Path]:
    from postroom.queue.store import QueueStore

    store = QueueStore(config.queue_dir, create=False)
    if store.messages.is_dir():
        yield from sorted(p for p in store.messages.iterdir() if p.is_file())
    if config.mail_dir.is_dir():
        for folder in sorted(config.mail_dir.rglob("*")):
            if folder.name in ("new", "cur") and folder.is_dir():
                yield from sorted(p for p in folder.iterdir() if p.is_file())


def find_queue_id(config: Config, queue_id: str) -> list[Path]:
    """Stored messages (queue first, then Maildirs) whose Received headers say `id queue_id`."""
    found = []
    for path in _stored_messages(config):
        try:
            if any(hop.queue_id == queue_id for hop in hops_of(read_headers(path))):
                found.append(path)
        except OSError:
            continue  # delivered or removed while we looked
    return found


def trace(target: str, load_config: Callable[[], Config], out: TextIO) -> int:
    """`postroom trace FILE|QUEUE-ID`: print the path(s); 0, or 1 when nothing is found."""
    paths: Iterable[Path]
    path = Path(target)
    if path.is_file():
        paths = [path]
    else:
        from postroom.queue.store import QueueError, check_queue_id

        try:
            check_queue_id(target)
        except QueueError:
            raise ValueError(f"{target}: no such file, and not a queue ID") from None
        config = load_config()
        paths = find_queue_id(config, target)
        if not paths:
            print(f"postroom trace: no message with queue ID {target} in {config.queue_dir} "
                  f"or {config.mail_dir} (and no such file)", file=sys.stderr)
            return 1
    for i, found in enumerate(paths):
        if i:
            print(file=out)
        for line in format_trace(read_headers(found), str(found)):
            print(line, file=out)
    return 0
