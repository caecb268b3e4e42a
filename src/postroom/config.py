"""The configuration: one TOML file (or the embedded default) read into a frozen Config tree.

Every key is declared once in `_SPEC` with its default, its parser and the
comment `postroom init` writes above it. Loading the file, building the
embedded default and rendering the commented file all walk that one table, so
the three cannot drift apart. Errors are one line: the file, the key, and
what is wrong with it.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import json
import re
import socket
import textwrap
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, cast

from postroom.addresses import canonical_domain, domain_of, mail_domain, mailbox_address
from postroom.store.api import StoreSettings

CONFIG_NAME = "postroom.toml"
DEFAULT_DATA_DIR = Path("var")
DEFAULT_SOURCE = "<default config>"  # names the embedded default in errors
LISTENERS = ("smtp", "submission", "submissions", "pop3", "pop3s")


class ConfigError(Exception):
    """A configuration problem; str() is one line naming the file, the key and the fault."""


# -- the value types ---------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """A host and port to listen on or to connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ListenConfig:
    """Where each service listens; None turns that listener off."""

    smtp: Endpoint | None = None  # MX traffic: no AUTH, local recipients only
    submission: Endpoint | None = None  # RFC 6409, STARTTLS then AUTH
    submissions: Endpoint | None = None  # RFC 8314, implicit TLS then AUTH
    pop3: Endpoint | None = None  # RFC 1939, STLS (RFC 2595)
    pop3s: Endpoint | None = None  # RFC 8314, implicit TLS

    def enabled(self) -> dict[str, Endpoint]:
        """The listeners that are on, by name (smtp, submission, ...)."""
        result = {}
        for name in LISTENERS:
            endpoint = getattr(self, name)
            if endpoint is not None:
                result[name] = endpoint
        return result


@dataclass(frozen=True)
class TLSConfig:
    cert: Path
    key: Path
    # True for the default paths: a self-signed pair is made on first start if
    # missing. Paths named explicitly must exist (no silent stand-in certificate).
    generate: bool


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[Endpoint, ...] = ()  # empty: the system resolver


@dataclass(frozen=True)
class Route:
    """A static next hop for a domain, used instead of its MX records.

    A smarthost may insist on TLS (`tls = "required"`: no STARTTLS or a failed
    handshake, no delivery; "opportunistic" goes on in plaintext) and take a
    login (RFC 4954), sent only over TLS.
    """

    host: str
    port: int = 25
    tls: str = "opportunistic"  # "opportunistic" | "required" | "none"
    auth: tuple[str, str] | None = field(default=None, repr=False)  # (user, password)


@dataclass(frozen=True)
class RelayConfig:
    mx_port: int = 25  # RFC 5321 4.5.4: SMTP relays to port 25; tests point it elsewhere


@dataclass(frozen=True)
class QueueConfig:
    retry_after: tuple[float, ...]  # seconds between attempts; the last repeats
    give_up_after: float  # seconds after arrival before bouncing
    delay_warning_after: float  # seconds before one "delayed" DSN; 0 = never
    max_per_destination: int  # concurrent deliveries per destination domain


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int  # octets; advertised in EHLO SIZE (RFC 1870)
    max_recipients: int  # RFC 5321 4.5.3.1.8: at least 100 must be accepted
    max_errors: int  # bad commands before the session is dropped
    max_received_headers: int  # RFC 5321 6.3: loop detection by counting hops
    bare_newline: Literal["reject", "normalize"]  # LF without CR in DATA (smuggling)
    max_connections: int
    max_connections_per_client: int
    command_timeout: float  # RFC 5321 4.5.3.2.7: server timeout, at least 5 minutes
    data_timeout: float  # RFC 5321 4.5.3.2.6: data block, 3 minutes or more
    allow_plaintext_auth: bool  # AUTH before TLS (RFC 4954 4 advises against)
    check_from_header: bool  # submission: From: must be one of the user's addresses
    min_free_space: int  # octets kept free on the mail and queue filesystems (queue_minfree)


@dataclass(frozen=True)
class POP3Config:
    allow_plaintext_auth: bool  # USER/PASS before STLS (RFC 2595 2.3)
    idle_timeout: float  # RFC 1939 3: an autologout timer of at least 10 minutes
    max_connections: int
    max_connections_per_client: int
    auth_failure_delay: float  # seconds before a failed login is answered (doubling)
    apop: bool  # RFC 1939 7: greeting timestamp; users opt in with their own secret


@dataclass(frozen=True)
class Config:
    data_dir: Path
    hostname: str
    domains: tuple[str, ...]
    # The administrator's mailbox: postmaster@ of every local domain goes there
    # unless an alias says otherwise (RFC 5321 4.5.1); see postmaster_address().
    postmaster: str
    listen: ListenConfig
    tls: TLSConfig
    dns: DNSConfig
    routes: Mapping[str, Route]
    relay: RelayConfig
    queue: QueueConfig
    smtp: SMTPConfig
    pop3: POP3Config
    workers: int = 0  # server processes; 0 = one per CPU
    # Where the settings came from (None: the embedded default); not part of
    # the configuration's value, so a file with default content equals no file.
    config_path: Path | None = field(default=None, compare=False)

    @property
    def source(self) -> str:
        """The config file's path, or "<default config>": the prefix of ConfigError messages."""
        return str(self.config_path) if self.config_path is not None else DEFAULT_SOURCE

    @property
    def users_db(self) -> Path:
        return self.data_dir / "users.sqlite3"

    @property
    def mail_dir(self) -> Path:
        return self.data_dir / "mail"

    @property
    def store(self) -> StoreSettings:
        """What postroom.store.factory.open_store builds the users and mailboxes from."""
        return StoreSettings(self.users_db, self.mail_dir, self.hostname, self.domains,
                             self.postmaster, self.source)

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"


def postmaster_address(config: Config) -> str:
    """The postmaster address of this installation: postmaster@ its first local domain.

    Always deliverable (RFC 5321 4.5.1): the user directory files mail for
    postmaster@ any local domain in the administrator's mailbox
    (`config.postmaster`) unless an alias for it says otherwise. Send what is
    meant for the administrator of this host here.
    """
    domain = config.domains[0] if config.domains else domain_of(config.postmaster)
    return f"postmaster@{domain}"


# -- value parsers: raw TOML value -> Python value, or _Invalid(message) ------


class _Invalid(Exception):
    """A bad value; the message says what is wrong (the key is added by the loader)."""


def _show(value: object) -> str:
    """A value as it would be written in TOML, for error messages and the rendered file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_show(v)}" for k, v in value.items()) + "}"
    return str(value)


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _expect(value: object, kind: type | tuple[type, ...], what: str) -> None:
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise _Invalid(f"expected {what}, got {_show(value)}")
    if not isinstance(value, kind):
        raise _Invalid(f"expected {what}, got {_type_name(value)}: {_show(value)}")


_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
                       r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?")


def _check_host(host: str) -> str:
    """An IP address (normalized) or a host name; ValueError otherwise."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError("not an IP address or host name")
    return host.lower().rstrip(".")


def parse_endpoint(
    text: str, default_port: int | None = None, *, any_port: bool = False
) -> Endpoint:
    """Parse "HOST:PORT" or "[IPv6]:PORT" (the port may be left out if there is a default).

    With `any_port` (listeners), port 0 asks the kernel for any free port, which
    tests and `postroom demo` use.

    ValueError with a message such as
    ``"127.0.0.1:99999" is not HOST:PORT (port must be 1-65535)``.
    """
    shown = _show(text)
    form = "HOST:PORT" if default_port is None else "HOST[:PORT]"

    def bad(why: str) -> ValueError:
        return ValueError(f"{shown} is not {form} ({why})")

    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise bad("missing ']'")
        if rest and not rest.startswith(":"):
            raise bad("expected ':' after ']'")
        port_text = rest[1:] if rest else None
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise bad("brackets hold an IPv6 address") from None
    else:
        if text.count(":") > 1:
            if default_port is not None:
                # Without a port, a bare IPv6 address is unambiguous.
                try:
                    return Endpoint(str(ipaddress.IPv6Address(text)), default_port)
                except ValueError:
                    pass
            raise bad("write IPv6 addresses in brackets: [::1]:25")
        host, sep, port_text_ = text.partition(":")
        port_text = port_text_ if sep else None
        if not host:
            raise bad("the host is missing; use 0.0.0.0 or [::] for all addresses")
        try:
            host = _check_host(host)
        except ValueError as e:
            raise bad(f"{host!r}: {e}") from None
    if port_text is None:
        if default_port is None:
            raise bad("the port is missing")
        return Endpoint(host, default_port)
    lowest = 0 if any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise bad(f"port must be {lowest}-65535")
    return Endpoint(host, int(port_text))


def _endpoint(value: object) -> Endpoint:
    _expect(value, str, 'a string "HOST:PORT"')
    try:
        return parse_endpoint(str(value), any_port=True)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _nameservers(value: object) -> tuple[Endpoint, ...]:
    _expect(value, list, 'a list of "IP[:PORT]" strings')
    result = []
    for item in value:  # type: ignore[attr-defined]
        _expect(item, str, 'a string "IP[:PORT]"')
        try:
            endpoint = parse_endpoint(item, default_port=53)
            ipaddress.ip_address(endpoint.host)
        except ValueError as e:
            msg = str(e) if " is not " in str(e) else f"{_show(item)} is not an IP address"
            raise _Invalid(msg) from None
        result.append(endpoint)
    return tuple(result)


def _hostname(value: object) -> str:
    _expect(value, str, "a string")
    try:
        name = canonical_domain(str(value))
    except ValueError:
        raise _Invalid(f"{_show(value)} is not a host name") from None
    # RFC 5321 4.1.1.1: EHLO names the host by its domain name; an IP address
    # would need brackets, and "1.2.3.4" is no name (RFC 3696 2).
    if name.startswith("[") or name.rpartition(".")[2].isdigit():
        raise _Invalid(f"{_show(value)} is not a host name")
    return name


def _domains(value: object) -> tuple[str, ...]:
    _expect(value, list, "a list of domain names")
    result: list[str] = []
    for item in value:  # type: ignore[attr-defined]
        _expect(item, str, "a domain name string")
        try:
            canonical_domain(item)
        except ValueError:
            raise _Invalid(f"{_show(item)} is not a domain name") from None
        try:
            name = mail_domain(item)  # a name, but one that can receive mail?
        except ValueError as e:
            raise _Invalid(str(e)) from None
        if name not in result:
            result.append(name)
    return tuple(result)


def _mailbox(value: object) -> str:
    _expect(value, str, 'an address such as "boss@corp.example"')
    try:
        address = mailbox_address(str(value))
        mail_domain(domain_of(address))
    except ValueError as e:
        raise _Invalid(f"{_show(value)}: {e}") from None
    return address


def _path(value: object) -> Path:
    _expect(value, str, "a file path string")
    if not value:
        raise _Invalid("the path is empty")
    return Path(str(value)).expanduser()


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object, *, zero: bool = False) -> float:
    """Seconds from 30, 1.5, "30s", "5m", "1h", "5d", "2w" or "500ms"; ValueError if not.

    0 is refused unless `zero` (for settings where 0 turns something off).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration such as \"5m\", got {_show(value)}")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise ValueError(
                f'{_show(value)} is not a duration (use seconds or "30s", "5m", "1h", "5d")'
            )
        unit = m.group(2).lower() if m.group(2) else None
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        seconds = float(value)
    if not (seconds > 0 or (zero and seconds == 0)):  # also refuses NaN
        raise ValueError(f"{_show(value)}: the duration must be more than zero")
    return seconds


def _duration(value: object) -> float:
    try:
        return parse_duration(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _duration_or_off(value: object) -> float:
    """A duration where 0 (or "0s") turns the feature off."""
    try:
        return parse_duration(value, zero=True)
    except ValueError as e:
        raise _Invalid(str(e).replace("more than zero", "zero (off) or more")) from None


def _durations(value: object) -> tuple[float, ...]:
    _expect(value, list, 'a list of durations such as ["1m", "5m"]')
    if not value:
        raise _Invalid("the list is empty; give at least one interval")
    return tuple(_duration(item) for item in value)  # type: ignore[attr-defined]


_SIZE = re.compile(r"\s*([0-9]+)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: object) -> int:
    """Octets from 1000, "10K", "50M", "1G" (binary multiples: K = 1024); ValueError if not."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'expected a size such as "50M", got {_show(value)}')
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if not m:
            raise ValueError(f'{_show(value)} is not a size (use bytes or "10K", "50M", "1G")')
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    else:
        size = value
    if size <= 0:
        raise ValueError(f"{_show(value)}: the size must be more than zero")
    return size


def _size(value: object) -> int:
    try:
        return parse_size(value)
    except ValueError as e:
        raise _Invalid(str(e)) from None


def _int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        _expect(value, int, "an integer")
        number = cast(int, value)
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            raise _Invalid(f"{number} is out of range (must be {bound})")
        return number

    return parse


def _bool(value: object) -> bool:
    _expect(value, bool, "true or false")
    return bool(value)


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        _expect(value, str, "a string")
        if value not in options:
            listed = " or ".join(_show(o) for o in options)
            raise _Invalid(f"{_show(value)} is not one of {listed}")
        return str(value)

    return parse


# -- the table of every key ---------------------------------------------------


@dataclass(frozen=True)
class _Key:
    default: Any  # the raw TOML value; the embedded default is parse(default)
    parse: Callable[[Any], Any]
    doc: str  # the comment `postroom init` writes above the key


@functools.cache
def default_hostname() -> str:
    """This machine's fully qualified name, or "localhost" when it has no usable one."""
    try:
        return _hostname(socket.getfqdn())
    except (_Invalid, OSError):
        return "localhost"


_TOP: dict[str, _Key] = {
    "hostname": _Key(
        None,  # default_hostname(), filled in at load time
        _hostname,
        "The name this host gives in its SMTP greeting, EHLO and Received: headers.",
    ),
    "domains": _Key(
        ["localhost"],
        _domains,
        "Mail domains this host receives mail for. `postroom domain add` adds more "
        "without editing this file.",
    ),
    "postmaster": _Key(
        None,  # postmaster@ the first of `domains`, filled in at load time
        _mailbox,
        "The administrator's mailbox. Mail to postmaster@ of every local domain (RFC 5321 "
        "4.5.1 requires that address, in any letter case) is filed here unless an alias for "
        "postmaster@DOMAIN exists. An address in a local domain; until `postroom user add` "
        "gives it a password, its mail waits in its mailbox folder (mail/DOMAIN/NAME in the "
        "data folder).",
    ),
    "workers": _Key(
        0, _int(0),
        "Server processes sharing the listeners (Python runs one core per process); 0 "
        "means one per CPU. Connection limits and login delays count per process. The "
        "first process also relays the queue, so it takes a submission connection only "
        "when the others leave it waiting.",
    ),
}

_SPEC: dict[str, dict[str, _Key]] = {
    "listen": {
        "smtp": _Key(
            "127.0.0.1:2525", _endpoint,
            "SMTP from other mail hosts (MX traffic, RFC 5321): no AUTH, mail only for "
            "local recipients. The standard port is 25.",
        ),
        "submission": _Key(
            "127.0.0.1:2587", _endpoint,
            "Message submission for your users' mail clients (RFC 6409): STARTTLS, then "
            "AUTH is required. The standard port is 587.",
        ),
        "submissions": _Key(
            "127.0.0.1:2465", _endpoint,
            "Submission over implicit TLS (RFC 8314). The standard port is 465.",
        ),
        "pop3": _Key(
            "127.0.0.1:2110", _endpoint,
            "POP3 (RFC 1939) with STLS to upgrade to TLS. The standard port is 110.",
        ),
        "pop3s": _Key(
            "127.0.0.1:2995", _endpoint,
            "POP3 over implicit TLS (RFC 8314). The standard port is 995.",
        ),
    },
    "tls": {
        "cert": _Key(
            "tls/cert.pem", _path,
            "Certificate chain (PEM). At this default path a self-signed certificate is "
            "made on first start when missing; a path you choose must exist.",
        ),
        "key": _Key("tls/key.pem", _path, "Private key (PEM) of the certificate."),
    },
    "dns": {
        "nameservers": _Key(
            [], _nameservers,
            'DNS servers for MX, A and AAAA lookups, as "IP" or "IP:PORT". Empty: the '
            "system's resolver (/etc/resolv.conf).",
        ),
    },
    "relay": {
        "mx_port": _Key(
            25, _int(1, 65535),
            "Port used to deliver to hosts found by MX lookup. Only tests change it.",
        ),
    },
    "queue": {
        "retry_after": _Key(
            ["1m", "5m", "15m", "1h"], _durations,
            "Waits between delivery attempts of a message that failed temporarily; after "
            "the last one, every attempt waits that long again.",
        ),
        "give_up_after": _Key(
            "5d", _duration,
            "How long after its arrival a message that still cannot be delivered is "
            "returned to its sender with a bounce (RFC 5321 4.5.4.1: 4-5 days).",
        ),
        "delay_warning_after": _Key(
            "4h", _duration_or_off,
            "After this long undelivered, the sender gets one notice that the message is "
            "delayed and still being retried (RFC 3464 action \"delayed\"). 0 turns it off.",
        ),
        "max_per_destination": _Key(
            10, _int(1), "Simultaneous deliveries to one destination domain.",
        ),
    },
    "smtp": {
        "max_message_size": _Key(
            "50M", _size,
            "Largest message accepted, announced with EHLO SIZE (RFC 1870).",
        ),
        "max_recipients": _Key(
            100, _int(1),
            "Recipients per message; RFC 5321 4.5.3.1.8 requires accepting at least 100.",
        ),
        "max_errors": _Key(
            10, _int(1), "Bad commands in one session before the connection is closed.",
        ),
        "max_received_headers": _Key(
            50, _int(1),
            "Received: headers after which a message is taken to be looping and refused "
            "(RFC 5321 6.3).",
        ),
        "bare_newline": _Key(
            "reject", _choice("reject", "normalize"),
            'A line ending in LF without CR inside DATA: "reject" the message (guards '
            'against SMTP smuggling) or "normalize" it to CRLF.',
        ),
        "max_connections": _Key(500, _int(1), "Simultaneous SMTP sessions, all listeners."),
        "max_connections_per_client": _Key(
            50, _int(1), "Simultaneous SMTP sessions from one IP address.",
        ),
        "command_timeout": _Key(
            "5m", _duration,
            "Idle time waiting for a command before the session is closed "
            "(RFC 5321 4.5.3.2.7: at least 5 minutes).",
        ),
        "data_timeout": _Key(
            "10m", _duration,
            "Idle time waiting for more message data (RFC 5321 4.5.3.2.6: at least 3 minutes).",
        ),
        "allow_plaintext_auth": _Key(
            False, _bool,
            "Offer AUTH on connections that are not encrypted (passwords in the clear).",
        ),
        "check_from_header": _Key(
            True, _bool,
            "Submission: refuse messages whose From: is not an address of the "
            "authenticated user.",
        ),
        "min_free_space": _Key(
            "100M", _size,
            "Free space kept on the filesystems of the mailboxes and the queue: MAIL FROM "
            "gets 452 4.3.1 when less than this, plus the size the client declares with "
            "SIZE=, is free (as Postfix's queue_minfree). 0 checks the declared size alone.",
        ),
    },
    "pop3": {
        "allow_plaintext_auth": _Key(
            False, _bool,
            "Allow USER/PASS on connections that are not encrypted (passwords in the clear).",
        ),
        "idle_timeout": _Key(
            "10m", _duration,
            "Idle time before an inactive session is closed (RFC 1939 3: at least 10 minutes).",
        ),
        "max_connections": _Key(500, _int(1), "Simultaneous POP3 sessions, all listeners."),
        "max_connections_per_client": _Key(
            50, _int(1), "Simultaneous POP3 sessions from one IP address.",
        ),
        "apop": _Key(
            False, _bool,
            "Offer APOP (RFC 1939 7): the greeting then carries a timestamp. Only users "
            "given an APOP secret (postroom user apop ADDRESS on) can use it.",
        ),
        "auth_failure_delay": _Key(
            "2s", _duration_or_off,
            "Wait before answering a failed login (POP3 and submission AUTH); doubles with "
            "each recent failure from the same address or for the same account, up to 15s. "
            "0 turns it off.",
        ),
    },
}

# Sections whose keys are not fixed.
_ROUTES_DOC = (
    'Static next hops, checked before MX lookup: "DOMAIN" = "HOST" or "HOST:PORT" '
    "(port 25 when left out). Mail for DOMAIN goes there instead of to its MX hosts."
)
_ORDER = ("listen", "tls", "dns", "routes", "relay", "queue", "smtp", "pop3")


# -- loading -----------------------------------------------------------------


def _suggest(name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


class _Loader:
    """Turns the parsed TOML document into a Config, naming the file in every error."""

    def __init__(self, data_dir: Path, shown: str) -> None:
        self.data_dir = data_dir
        self.shown = shown

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.shown}: {key}: {message}")

    def value(self, key: str, spec: _Key, raw: object) -> Any:
        try:
            return spec.parse(raw)
        except _Invalid as e:
            raise self.error(key, str(e)) from None

    def section(self, doc: dict[str, Any], name: str) -> dict[str, Any]:
        raw = doc.get(name, {})
        if not isinstance(raw, dict):
            raise self.error(name, f"expected a table [{name}], got {_type_name(raw)}")
        spec = _SPEC[name]
        for key in raw:
            if key not in spec:
                raise self.error(f"{name}.{key}", "unknown key" + _suggest(key, list(spec)))
        return raw

    def load(self, doc: dict[str, Any]) -> Config:
        known_top = [*_TOP, *_ORDER]
        for key, raw in doc.items():
            if key not in known_top:
                kind = "unknown section" if isinstance(raw, dict) else "unknown key"
                raise self.error(key, kind + _suggest(key, known_top))
        hostname = (
            self.value("hostname", _TOP["hostname"], doc["hostname"])
            if "hostname" in doc else default_hostname()
        )
        domains = self.value("domains", _TOP["domains"], doc.get("domains", ["localhost"]))
        if "postmaster" in doc:
            postmaster = self.value("postmaster", _TOP["postmaster"], doc["postmaster"])
        elif domains:
            postmaster = f"postmaster@{domains[0]}"
        else:
            raise self.error("postmaster", "`domains` is empty, so name the administrator's "
                             'address here (postmaster = "boss@corp.example")')
        workers = self.value("workers", _TOP["workers"], doc.get("workers", 0))

        parsed: dict[str, dict[str, Any]] = {}
        for name in ("tls", "dns", "relay", "queue", "smtp", "pop3"):
            raw = self.section(doc, name)
            parsed[name] = {
                key: self.value(f"{name}.{key}", spec, raw.get(key, spec.default))
                for key, spec in _SPEC[name].items()
            }

        listen_raw = self.section(doc, "listen")
        listen_given = "listen" in doc
        endpoints: dict[str, Endpoint] = {}
        for key, spec in _SPEC["listen"].items():
            if key in listen_raw or not listen_given:
                # A [listen] table lists exactly the listeners to run; without one,
                # all five run on their defaults.
                endpoint = self.value(f"listen.{key}", spec, listen_raw.get(key, spec.default))
                for other, seen in endpoints.items():
                    if seen == endpoint and endpoint.port != 0:  # port 0: any free port
                        raise self.error(f"listen.{key}", f"{endpoint} is also listen.{other}")
                endpoints[key] = endpoint

        tls = self.tls(parsed["tls"], doc.get("tls", {}))
        return Config(
            data_dir=self.data_dir,
            hostname=hostname,
            domains=domains,
            postmaster=postmaster,
            workers=workers,
            listen=ListenConfig(**endpoints),
            tls=tls,
            dns=DNSConfig(**parsed["dns"]),
            routes=self.routes(doc.get("routes", {})),
            relay=RelayConfig(**parsed["relay"]),
            queue=QueueConfig(**parsed["queue"]),
            smtp=SMTPConfig(**parsed["smtp"]),
            pop3=POP3Config(**parsed["pop3"]),
        )

    def tls(self, values: dict[str, Any], raw: dict[str, Any]) -> TLSConfig:
        cert = self.data_dir / values["cert"]
        key = self.data_dir / values["key"]
        default_cert = self.data_dir / _SPEC["tls"]["cert"].default
        default_key = self.data_dir / _SPEC["tls"]["key"].default
        generate = cert == default_cert and key == default_key
        if not generate:
            for name, path in (("cert", cert), ("key", key)):
                if not path.is_file():
                    where = "named here" if name in raw else "the default, as the other one is not"
                    raise self.error(f"tls.{name}", f"{path} does not exist ({where})")
        return TLSConfig(cert=cert, key=key, generate=generate)

    def routes(self, raw: object) -> dict[str, Route]:
        if not isinstance(raw, dict):
            raise self.error("routes", f"expected a table [routes], got {_type_name(raw)}")
        routes: dict[str, Route] = {}
        for domain, target in raw.items():
            key = f"routes.{_show(domain)}"
            try:
                name = canonical_domain(domain)
            except ValueError:
                raise self.error(key, f"{_show(domain)} is not a domain name") from None
            if isinstance(target, dict):
                route = self.smarthost(key, target)
            elif isinstance(target, str):
                try:
                    endpoint = parse_endpoint(target, default_port=25)
                except ValueError as e:
                    raise self.error(key, str(e)) from None
                route = Route(endpoint.host, endpoint.port)
            else:
                raise self.error(
                    key, 'expected a string "HOST[:PORT]" or a table { host = ..., tls = ..., '
                    f"user = ..., password_file = ... }}, got {_type_name(target)}"
                )
            if name in routes:
                raise self.error(key, f"{name} has a route already")
            routes[name] = route
        return routes

    def smarthost(self, key: str, table: dict[str, Any]) -> Route:
        """`"corp.example" = { host = "relay.example:587", tls = "required", user = "u",
        password_file = "secrets/relay" }`: the password is read from a file (relative to
        the data folder) so the config can be shared without it."""
        known = {"host", "tls", "user", "password_file"}
        for name in table:
            if name not in known:
                raise self.error(f"{key}.{name}",
                                 f"unknown key{_suggest(name, sorted(known))}")
        host = table.get("host")
        if not isinstance(host, str):
            raise self.error(f"{key}.host", 'expected a string "HOST[:PORT]"')
        try:
            endpoint = parse_endpoint(host, default_port=25)
        except ValueError as e:
            raise self.error(f"{key}.host", str(e)) from None
        tls = table.get("tls", "opportunistic")
        if tls not in ("opportunistic", "required", "none"):
            raise self.error(f"{key}.tls",
                             f'{_show(tls)} is not "opportunistic", "required" or "none"')
        user, password_file = table.get("user"), table.get("password_file")
        auth: tuple[str, str] | None = None
        if (user is None) != (password_file is None):
            raise self.error(key, "give both user and password_file, or neither")
        if user is not None:
            if not isinstance(user, str) or not isinstance(password_file, str):
                raise self.error(key, "user and password_file are strings")
            path = self.data_dir / password_file
            try:
                password = path.read_text(encoding="utf-8").strip("\r\n")
            except OSError as e:
                raise self.error(f"{key}.password_file",
                                 f"cannot read {path}: {e.strerror or e}") from None
            auth = (user, password)
        return Route(endpoint.host, endpoint.port, tls=str(tls), auth=auth)


def load_config(data_dir: Path | str = DEFAULT_DATA_DIR, config_file: Path | None = None) -> Config:
    """Read DATA/postroom.toml, or `config_file`, or use the embedded default.

    A missing DATA/postroom.toml means the default; a missing `config_file`
    (one the user named) is an error. Relative paths in the file are relative
    to the data directory. Raises ConfigError with a one-line message.
    """
    given_dir = Path(data_dir).expanduser()
    data = given_dir.absolute()
    path = Path(config_file).expanduser() if config_file is not None else given_dir / CONFIG_NAME
    shown = str(path)
    if config_file is None and not path.exists():
        return _Loader(data, DEFAULT_SOURCE).load({})
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{shown}: is a directory, not a config file") from None
    except OSError as e:
        raise ConfigError(f"{shown}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{shown}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{shown}: invalid TOML: {e}") from None
    return replace(_Loader(data, shown).load(doc), config_path=path.absolute())


def default_config(data_dir: Path | str = DEFAULT_DATA_DIR) -> Config:
    """The embedded default Config for a data directory (what no file means)."""
    return _Loader(Path(data_dir).expanduser().absolute(), DEFAULT_SOURCE).load({})


# -- rendering the commented default file ---------------------------------------


def _comment(text: str) -> Iterator[str]:
    for line in textwrap.wrap(text, width=96):
        yield f"# {line}"


def render_default_config(
    hostname: str | None = None,
    domains: Sequence[str] | None = None,
    postmaster: str | None = None,
) -> str:
    """The commented TOML file `postroom init` writes: every key at its default.

    Loads back to the same Config as having no file at all (unless `hostname`,
    `domains` or `postmaster` are given, which replace those defaults).
    """
    host = hostname if hostname is not None else default_hostname()
    # Validate early so init never writes a file that will not load.
    try:
        _hostname(host)
        doms = list(_domains(list(domains) if domains is not None
                             else _TOP["domains"].default))
        if postmaster is None and not doms:
            raise _Invalid("with no domain, name the administrator's address (postmaster)")
        admin = _mailbox(postmaster) if postmaster is not None else f"postmaster@{doms[0]}"
    except _Invalid as e:
        raise ConfigError(f"{CONFIG_NAME}: {e}") from None
    lines = [
        "# postroom configuration (written by `postroom init`).",
        "#",
        '# Durations are seconds or "30s", "5m", "1h", "5d"; sizes are octets or "10K", "50M",',
        '# "1G" (K = 1024). Addresses are "HOST:PORT" or "[IPv6]:PORT". Relative paths are',
        "# relative to the data folder that holds this file.",
        "",
    ]
    lines += [*_comment(_TOP["hostname"].doc), f"hostname = {_show(host)}", ""]
    lines += [*_comment(_TOP["domains"].doc), f"domains = {_show(doms)}", ""]
    lines += [*_comment(_TOP["postmaster"].doc), f"postmaster = {_show(admin)}", ""]
    lines += [*_comment(_TOP["workers"].doc), "workers = 0", ""]
    for name in _ORDER:
        lines.append(f"[{name}]")
        if name == "listen":
            lines += _comment("Remove or comment out a line to turn that listener off.")
        if name == "routes":
            lines += _comment(_ROUTES_DOC)
            lines.append('# "isp.example" = "127.0.0.1:3525"')
            lines.append("")
            continue
        for key, spec in _SPEC[name].items():
            lines += _comment(spec.doc)
            lines.append(f"{key} = {_show(spec.default)}")
        lines.append("")
    return "\n".join(lines)
