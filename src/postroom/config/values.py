"""Config value parsers: a raw TOML value to a Python value, or ValueError saying what is wrong."""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from postroom.canonical import canonical_domain, domain_of, mail_domain, mailbox_address
from postroom.store.api import check_folder


@dataclass(frozen=True)
class Endpoint:
    """A host and port to listen on or to connect to."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def show(value: object) -> str:
    """A value as it would be written in TOML, for error messages and the rendered file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {show(v)}" for k, v in value.items()) + "}"
    return str(value)


# tomllib gives exactly these types; anything else is one of its date/time types.
_TYPE_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "a table"}


def type_name(value: object) -> str:
    return _TYPE_NAMES.get(type(value), "a date/time")


T = TypeVar("T")


def _expect(value: object, kind: type[T], what: str) -> T:
    """`value` if it is a `kind` (true and false are no numbers here)."""
    if isinstance(value, bool) and kind is not bool:
        raise ValueError(f"expected {what}, got {show(value)}")
    if not isinstance(value, kind):
        raise ValueError(f"expected {what}, got {type_name(value)}: {show(value)}")
    return value


def _check_host(host: str) -> str:
    """An IP address or a host name, normalized; ValueError otherwise."""
    with contextlib.suppress(ValueError):
        return str(ipaddress.ip_address(host))
    return canonical_domain(host)


def parse_endpoint(
    text: str, default_port: int | None = None, *, any_port: bool = False
) -> Endpoint:
    """Parse "HOST:PORT" or "[IPv6]:PORT" (the port may be left out if there is a default).

    With `any_port` (listeners), port 0 asks the kernel for any free port, which
    tests and `postroom demo` use.

    ValueError with a message such as
    ``"127.0.0.1:99999" is not HOST:PORT (port must be 1-65535)``.
    """
    shown = show(text)
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
    elif text.count(":") > 1:
        if default_port is not None:  # without a port, a bare IPv6 address is unambiguous
            with contextlib.suppress(ValueError):
                return Endpoint(str(ipaddress.IPv6Address(text)), default_port)
        raise bad("write IPv6 addresses in brackets: [::1]:25")
    else:
        host, sep, rest = text.partition(":")
        port_text = rest if sep else None
        if not host:
            raise bad("the host is missing; use 0.0.0.0 or [::] for all addresses")
        try:
            host = _check_host(host)
        except ValueError:
            raise bad(f"{host!r}: not an IP address or host name") from None
    if port_text is None:
        if default_port is None:
            raise bad("the port is missing")
        return Endpoint(host, default_port)
    lowest = 0 if any_port else 1
    if not port_text.isdigit() or not lowest <= int(port_text) <= 65535:
        raise bad(f"port must be {lowest}-65535")
    return Endpoint(host, int(port_text))


def parse_listener(value: object) -> Endpoint:
    return parse_endpoint(_expect(value, str, 'a string "HOST:PORT"'), any_port=True)


def parse_optional_listener(value: object) -> Endpoint | None:
    """A listener that is off when empty ("")."""
    text = _expect(value, str, 'a string "HOST:PORT" (or "" for off)')
    return parse_endpoint(text, any_port=True) if text else None


def parse_optional_path(value: object) -> Path | None:
    text = _expect(value, str, 'a file path string (or "" for none)')
    return Path(text).expanduser() if text else None


def parse_acme_directory(value: object) -> str:
    """An ACME directory URL: HTTPS only (RFC 8555 6.1)."""
    url = _expect(value, str, "the CA's directory URL")
    if not url.startswith("https://") or len(url) <= len("https://"):
        raise ValueError(f"{show(url)} is not an https:// URL (RFC 8555 6.1: ACME runs over "
                         "HTTPS)")
    return url


def parse_contacts(value: object) -> tuple[str, ...]:
    """Contact addresses for an ACME account, as mailto: URLs (RFC 8555 7.3)."""
    items = [value] if isinstance(value, str) else _expect(value, list, "a list of addresses")
    result = []
    for item in items:
        text = _expect(item, str, "an e-mail address string")
        address = text.removeprefix("mailto:")
        try:
            mailbox_address(address)
        except ValueError as e:
            raise ValueError(f"{show(text)}: {e}") from None
        result.append(f"mailto:{address}")
    return tuple(result)


def parse_names(value: object) -> tuple[str, ...]:
    """Host names for a certificate: canonical, without repeats, at least one."""
    result: list[str] = []
    for item in _expect(value, list, "a list of host names"):
        name = parse_hostname(item)
        if name not in result:
            result.append(name)
    if not result:
        raise ValueError("the list is empty; name at least one host")
    return tuple(result)


def parse_nameservers(value: object) -> tuple[Endpoint, ...]:
    result = []
    for item in _expect(value, list, 'a list of "IP[:PORT]" strings'):
        endpoint = parse_endpoint(_expect(item, str, 'a string "IP[:PORT]"'), default_port=53)
        try:
            ipaddress.ip_address(endpoint.host)
        except ValueError:
            raise ValueError(f"{show(item)} is not an IP address") from None
        result.append(endpoint)
    return tuple(result)


def parse_hostname(value: object) -> str:
    text = _expect(value, str, "a string")
    try:
        name = canonical_domain(text)
    except ValueError:
        raise ValueError(f"{show(value)} is not a host name") from None
    # RFC 5321 4.1.1.1: EHLO names the host by its domain name; an IP address
    # would need brackets, and "1.2.3.4" is no name (RFC 3696 2).
    if name.startswith("[") or name.rpartition(".")[2].isdigit():
        raise ValueError(f"{show(value)} is not a host name")
    return name


@functools.cache
def default_hostname() -> str:
    """This machine's fully qualified name, or "localhost" when it has no usable one."""
    try:
        return parse_hostname(socket.getfqdn())
    except (ValueError, OSError):
        return "localhost"


def parse_domains(value: object) -> tuple[str, ...]:
    """Mail domains, canonical and without repeats; a name that cannot receive mail is refused."""
    result: list[str] = []
    for item in _expect(value, list, "a list of domain names"):
        text = _expect(item, str, "a domain name string")
        try:
            canonical_domain(text)
        except ValueError:
            raise ValueError(f"{show(text)} is not a domain name") from None
        name = mail_domain(text)
        if name not in result:
            result.append(name)
    return tuple(result)


def parse_mailbox(value: object) -> str:
    text = _expect(value, str, 'an address such as "boss@corp.example"')
    try:
        address = mailbox_address(text)
        mail_domain(domain_of(address))
    except ValueError as e:
        raise ValueError(f"{show(value)}: {e}") from None
    return address


def parse_path(value: object) -> Path:
    path = _expect(value, str, "a file path string")
    if not path:
        raise ValueError("the path is empty")
    return Path(path).expanduser()


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: object, *, zero: bool = False) -> float:
    """Seconds from 30, 1.5, "30s", "5m", "1h", "5d", "2w" or "500ms"; ValueError if not.

    0 is refused unless `zero` (for settings where 0 turns something off).
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration such as \"5m\", got {show(value)}")
    if isinstance(value, str):
        m = _DURATION.fullmatch(value)
        if not m:
            raise ValueError(
                f'{show(value)} is not a duration (use seconds or "30s", "5m", "1h", "5d")'
            )
        unit = m.group(2).lower() if m.group(2) else None
        seconds = float(m.group(1)) * _DURATION_UNITS[unit]
    else:
        seconds = float(value)
    if not (seconds > 0 or (zero and seconds == 0)):  # also refuses NaN
        bound = "zero (off) or more" if zero else "more than zero"
        raise ValueError(f"{show(value)}: the duration must be {bound}")
    return seconds


def parse_durations(value: object) -> tuple[float, ...]:
    items = _expect(value, list, 'a list of durations such as ["1m", "5m"]')
    if not items:
        raise ValueError("the list is empty; give at least one interval")
    return tuple(parse_duration(item) for item in items)


_SIZE = re.compile(r"\s*([0-9]+)\s*([KMG]?)(?:I?B)?\s*", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(value: object, *, zero: bool = False) -> int:
    """Octets from 1000, "10K", "50M", "1G" (binary multiples: K = 1024); ValueError if not.

    0 is refused unless `zero` (for settings where 0 turns something off).
    """
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f'expected a size such as "50M", got {show(value)}')
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if not m:
            raise ValueError(f'{show(value)} is not a size (use bytes or "10K", "50M", "1G")')
        size = int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    else:
        size = value
    if size < 0 or (size == 0 and not zero):
        bound = "zero or more" if zero else "more than zero"
        raise ValueError(f"{show(value)}: the size must be {bound}")
    return size


def parse_int(minimum: int, maximum: int | None = None) -> Callable[[object], int]:
    """A parser of integers from `minimum` up to `maximum` (None: no upper bound)."""
    def parse(value: object) -> int:
        number = _expect(value, int, "an integer")
        if number < minimum or (maximum is not None and number > maximum):
            bound = f"{minimum}-{maximum}" if maximum is not None else f"at least {minimum}"
            raise ValueError(f"{number} is out of range (must be {bound})")
        return number

    return parse


def parse_bool(value: object) -> bool:
    return _expect(value, bool, "true or false")


def parse_choice(*options: str) -> Callable[[object], str]:
    """A parser that takes exactly one of `options`."""
    def parse(value: object) -> str:
        text = _expect(value, str, "a string")
        if text not in options:
            listed = " or ".join(show(o) for o in options)
            raise ValueError(f"{show(text)} is not one of {listed}")
        return text

    return parse


def parse_networks(value: object) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """IP networks ("192.0.2.0/24", "::1"; an address alone is one host)."""
    result = []
    for item in _expect(value, list, "a list of IP networks"):
        text = _expect(item, str, 'an IP network string such as "192.0.2.0/24"')
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ValueError(f"{show(text)} is not an IP network") from None
    return tuple(result)


def parse_folder(value: object) -> str:
    """A mailbox folder name ("Junk"; "." separates levels, as Dovecot shows them)."""
    return check_folder(_expect(value, str, "a folder name"))


MILTER_KEYS = ("socket", "default_action", "connect_timeout", "command_timeout",
               "content_timeout")


def parse_milters(value: object) -> tuple[dict[str, object], ...] | None:
    """[milters] lists: each filter a socket string or a table of its own settings;
    what it gives, parsed (the section's defaults fill the rest)."""
    if value is None:
        return None
    from postroom.milter.connection import parse_socket

    out = []
    for item in _expect(value, list, 'a list of "inet:HOST:PORT" or "unix:PATH" strings'):
        table = {"socket": item} if isinstance(item, str) else _expect(item, dict, "a table")
        unknown = [k for k in table if k not in MILTER_KEYS]
        if unknown:
            raise ValueError(f"unknown milter key {show(unknown[0])} (known: "
                             f"{', '.join(MILTER_KEYS)})")
        socket_text = _expect(table.get("socket"), str, 'a string socket = "inet:HOST:PORT"')
        parse_socket(socket_text)
        parsed: dict[str, object] = {"socket": socket_text}
        for key, raw in table.items():
            if key == "default_action":
                parsed[key] = parse_choice("tempfail", "accept")(raw)
            elif key.endswith("_timeout"):
                parsed[key] = parse_duration(raw)
        out.append(parsed)
    return tuple(out)


def parse_account(value: object) -> str:
    """A user or group name as useradd(8) accepts it (NAME_REGEX), or a number."""
    if not isinstance(value, str) or not RUN_ACCOUNT.fullmatch(value):
        raise ValueError(f"{show(value)} is not a user or group name")
    return value


# shadow-utils' default NAME_REGEX (useradd(8)), plus plain numeric IDs.
RUN_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]*[$]?|[0-9]+", re.ASCII)
def parse_store_url(value: object) -> str:
    """"" (the embedded store) or a postgresql:// URL (libpq's URI form); ValueError if not."""
    if not isinstance(value, str):
        raise ValueError(f'expected "" or "postgresql://...", got {show(value)}')
    if value and not value.startswith(("postgresql://", "postgres://")):
        raise ValueError(f'{show(value)}: the store URL must start with "postgresql://" '
                         '(or be empty for the store in the data folder)')
    return value
