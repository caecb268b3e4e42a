"""Addresses as this host stores and compares them: one canonical spelling of each.

Where protocol.smtp_paths reads an address off the wire as the client wrote it,
this module splits, checks and reduces it to the one spelling every lookup uses.

The canonical form keeps the local part as written (RFC 5321 2.4: only the
destination host may interpret it), except that a needlessly quoted local part
such as ``"john"`` loses its quotes (RFC 5321 4.1.2: they are the same
mailbox). The domain is lower-cased, loses one trailing dot, and is written as
ASCII: internationalized labels become their A-labels (``xn--...``,
RFC 5890 2.3.2.1). ASCII is the form DNS, routes, the user directory and
Maildir folder names all agree on; `display_domain` turns it back into
U-labels for people.
"""

from __future__ import annotations

import functools
import ipaddress
import re

try:  # IDNA 2008 with UTS 46 mapping when the `idna` package is present ...
    import idna as _idna
except ImportError:  # pragma: no cover - ... else Python's own IDNA 2003 codec
    _idna = None  # type: ignore[assignment]

# RFC 5321 4.1.2: Atom = 1*atext (RFC 5322 3.2.3); Dot-string = Atom *("." Atom).
# RFC 6531 3.3 adds UTF-8 characters to atext for SMTPUTF8.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# RFC 5321 4.1.2: Let-dig [Ldh-str]; labels of at most 63 octets (RFC 1035 2.3.4).
_LDH_LABEL = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2


def split(address: str) -> tuple[str, str]:
    """Split ``local@domain`` at the last "@" that is not inside a quoted string.

    The parts come back exactly as written. ValueError when there is no such
    "@" or a quoted string is left open.
    """
    at = -1
    quoted = False
    escaped = False
    for i, ch in enumerate(address):
        if escaped:
            escaped = False
        elif quoted and ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "@" and not quoted:
            at = i
    if quoted:
        raise ValueError(f"unbalanced quotes in address: {address!r}")
    if at < 0:
        raise ValueError(f"no @ in address: {address!r}")
    return address[:at], address[at + 1 :]


def is_dot_string(local: str) -> bool:
    """True when `local` needs no quotes (RFC 5321 Dot-string, UTF-8 allowed)."""
    return _DOT_STRING.fullmatch(local) is not None


def is_quoted(local: str) -> bool:
    """True when the local part is written as a quoted string (RFC 5321 4.1.2)."""
    return len(local) >= 2 and local[0] == '"' and local[-1] == '"'


def unquoted(local: str) -> str:
    """The text a local part stands for: a quoted string loses its quotes and the
    backslashes of its quoted pairs (RFC 5321 4.1.2); a dot-string is itself."""
    return re.sub(r"\\(.)", r"\1", local[1:-1]) if is_quoted(local) else local


def _canonical_local(local: str, address: str) -> str:
    if not local:
        raise ValueError(f"empty local part in address: {address!r}")
    if is_dot_string(local):
        return local
    if is_quoted(local):
        inner = unquoted(local)
        if any(ch in "\r\n\0" for ch in inner):
            raise ValueError(f"control characters in address: {address!r}")
        # RFC 5321 4.1.2: a quoted string whose content is a Dot-string names the
        # same mailbox as the unquoted form, so only one spelling is kept.
        return inner if is_dot_string(inner) else local
    raise ValueError(f"local part must be a dot-atom or a quoted string: {address!r}")


def _canonical_literal(domain: str) -> str:
    # RFC 5321 4.1.3 address literals: [1.2.3.4] and [IPv6:...].
    inner = domain[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            return f"[IPv6:{ipaddress.IPv6Address(inner[5:]).compressed}]"
        return f"[{ipaddress.IPv4Address(inner)}]"
    except ValueError:
        raise ValueError(f"not an address literal: {domain!r}") from None


def _to_ascii(domain: str) -> str:
    if _idna is not None:
        try:
            return str(_idna.encode(domain, uts46=True).decode("ascii"))
        except _idna.IDNAError as e:
            raise ValueError(f"not a valid domain name: {domain!r} ({e})") from None
    try:  # pragma: no cover - only without the idna package
        return domain.encode("idna").decode("ascii")
    except UnicodeError as e:  # pragma: no cover
        raise ValueError(f"not a valid domain name: {domain!r} ({e})") from None


@functools.lru_cache(maxsize=4096)
def canonical_domain(domain: str) -> str:
    """Lower-case ASCII form of a domain (A-labels), one trailing dot removed.

    Remembered for the last few thousand names (a pure function, asked about
    the same domains on every message; invalid names are checked each time).

    Address literals are kept as literals with a normalized IP address.
    ValueError when the name is not a valid domain.
    """
    if domain.startswith("[") and domain.endswith("]"):
        return _canonical_literal(domain)
    name = domain[:-1] if domain.endswith(".") else domain
    if not name:
        raise ValueError(f"empty domain: {domain!r}")
    if not name.isascii():
        name = _to_ascii(name)
    name = name.lower()
    labels = name.split(".")
    for label in labels:
        if not _LDH_LABEL.fullmatch(label):
            raise ValueError(f"not a valid domain name: {domain!r}")
        if label.startswith("xn--"):
            # An A-label must decode; a bogus one would name a domain nobody can own.
            try:
                display_domain(label)
            except ValueError:
                raise ValueError(f"not a valid domain name: {domain!r}") from None
    if len(name) > MAX_DOMAIN:
        raise ValueError(f"domain longer than {MAX_DOMAIN} octets: {domain!r}")
    return name


def display_domain(domain: str) -> str:
    """The U-label (Unicode) form of a canonical domain, for people to read."""
    if domain.startswith("["):
        return domain
    if _idna is not None:
        try:
            return str(_idna.decode(domain))
        except _idna.IDNAError as e:
            raise ValueError(f"not a valid domain name: {domain!r} ({e})") from None
    try:  # pragma: no cover
        return domain.encode("ascii").decode("idna")
    except UnicodeError as e:  # pragma: no cover
        raise ValueError(f"not a valid domain name: {domain!r} ({e})") from None


def mail_domain(name: str) -> str:
    """The canonical form of a name this host may receive mail for, or ValueError.

    Stricter than `canonical_domain`: an address literal ("[1.2.3.4]") names a
    host, not a mail domain, and neither does a dotted IP address written
    without brackets. RFC 3696 2 rules out an all-numeric top-level label, so
    a name such as "1.2.3.4" cannot be a domain in the DNS (RFC 5321 2.3.5
    wants mail domains to be names that resolve).
    """
    canon = canonical_domain(name)
    if canon.startswith("["):
        raise ValueError(f"{name}: an address literal is not a mail domain")
    if canon.rpartition(".")[2].isdigit():
        what = "an IP address" if _is_ip(canon) else "a name whose last label is a number"
        raise ValueError(f"{name} is {what}, not a mail domain (a name such as corp.example)")
    return canon


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def canonical(address: str) -> str:
    """The canonical spelling of ``local@domain`` (see the module docstring).

    ValueError when the address is not a valid mailbox.
    """
    local, domain = split(address)
    if not domain:
        raise ValueError(f"no domain after the @ in address: {address!r}")
    local = _canonical_local(local, address)
    if len(local.encode("utf-8")) > MAX_LOCAL_PART:
        raise ValueError(f"local part longer than {MAX_LOCAL_PART} octets: {address!r}")
    return f"{local}@{canonical_domain(domain)}"


def mailbox_address(address: str) -> str:
    """The key of a mailbox on this host: canonical, its local part lower-cased.

    A mailbox's local part becomes a folder name, so it must be a plain
    dot-atom without "/" or "\\" (the dot-atom grammar already rules out a
    leading dot). Local parts compare case-insensitively here, as Postfix and
    Dovecot do for virtual users. ValueError says what is wrong.
    """
    local, domain = split(canonical(address))
    if not is_dot_string(local) or "/" in local or "\\" in local:
        raise ValueError(
            f"{address}: a mailbox name must be a plain dot-atom such as first.last "
            "(no quotes, no '/')"
        )
    return f"{local.lower()}@{domain}"


def domain_of(address: str) -> str:
    """The canonical domain of an address."""
    return canonical_domain(split(address)[1])
