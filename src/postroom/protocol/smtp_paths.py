"""The wire syntax of MAIL and RCPT arguments: paths (RFC 5321 4.1.2) and ESMTP parameters.

Parses what follows "MAIL FROM:" and "RCPT TO:" into a `Path` and its
`Parameters` (`parse_esmtp_parameters`), validating the values of the
extensions postroom offers:
SIZE (RFC 1870), BODY (RFC 6152), SMTPUTF8 (RFC 6531), RET/ENVID/NOTIFY/ORCPT
(RFC 3461) and AUTH (RFC 4954 5), including xtext decoding (RFC 3461 4).

Strict where ambiguity is dangerous (the path must be in angle brackets, no
control characters, one value for each parameter), lenient where real clients
differ harmlessly (spaces after the colon, case of keywords). A source route
(`<@a,@b:user@dom>`) is accepted and dropped from the address, as RFC 5321
4.1.1.3 and Appendix C ask, but kept on the `Path` for policy. A quoted local
part keeps its quotes in `address`: policy sees it as written, refuses one that
hides a route, and reduces the rest to one spelling (`postroom.canonical`).
Non-ASCII text is accepted in local parts and domains (RFC 6531 3.3); whether
it is allowed in the session is the caller's decision (`Path.is_utf8`).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import NamedTuple

MAX_LOCAL_PART = 64  # RFC 5321 4.5.3.1.1 (not enforced: 4.5.3.1 asks for no limits)
MAX_DOMAIN = 255  # RFC 5321 4.5.3.1.2 (enforced: no longer name can exist in the DNS)
MAX_ENVID = 100  # RFC 3461 4.4: an ENVID is at most 100 characters
MAX_ORCPT = 500  # RFC 3461 4.2: an ORCPT value is at most 500 characters
MAX_SIZE_DIGITS = 20  # RFC 1870 3: size-value ::= 1*20DIGIT

NOTIFY_NEVER = "NEVER"
NOTIFY_KEYWORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})  # RFC 3461 4.1
RET_VALUES = frozenset({"FULL", "HDRS"})  # RFC 3461 4.3
BODY_VALUES = frozenset({"7BIT", "8BITMIME"})  # RFC 6152 2 (BINARYMIME is RFC 3030's)


class AddressError(ValueError):
    """A path that does not follow RFC 5321 4.1.2; the message says why."""


class ParameterError(ValueError):
    """An ESMTP parameter or value that is malformed; the message says why."""


class UnsupportedParameter(ParameterError):
    """A parameter the command does not take here (`value` None: RFC 5321 4.1.1.11's
    555), or a value of a known one that is not implemented (`value` given: 504)."""

    def __init__(self, keyword: str, value: str | None = None) -> None:
        shown = keyword if value is None else f"{keyword}={value.upper()}"
        super().__init__(f"{shown} is not supported")
        self.keyword = keyword
        self.value = value


# RFC 5321 4.1.2 and RFC 6531 3.3: atext, qtext and sub-domains, where any
# non-ASCII character stands for UTF8-non-ascii.
_U = "\u0080-\U0010ffff"
_ATEXT = rf"[A-Za-z0-9!#$%&'*+/=?^_`{{|}}~\-{_U}]"
_DOT_STRING = rf"{_ATEXT}+(?:\.{_ATEXT}+)*"
_QUOTED = rf'"(?:[\x20\x21\x23-\x5b\x5d-\x7e{_U}]|\\[\x20-\x7e])*"'
_LET_DIG = rf"[A-Za-z0-9{_U}]"
_SUB_DOMAIN = rf"{_LET_DIG}(?:[A-Za-z0-9\-{_U}]*{_LET_DIG})?"
_DOMAIN = rf"{_SUB_DOMAIN}(?:\.{_SUB_DOMAIN})*"
_LITERAL = r"\[[\x21-\x5a\x5e-\x7e]*\]"  # dcontent, checked further below
_PATH_RE = re.compile(
    rf"<(?:(?P<route>@{_DOMAIN}(?:,@{_DOMAIN})*):)?"
    rf"(?P<local>{_DOT_STRING}|{_QUOTED})@(?P<domain>{_DOMAIN}|{_LITERAL})>"
)
_POSTMASTER_RE = re.compile(r"<(postmaster)>", re.IGNORECASE)  # RFC 5321 4.1.1.3
_KEYWORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9\-]*")  # RFC 5321 4.1.2 esmtp-keyword
# esmtp-value: any CHAR but "=", SP and controls (RFC 5321 4.1.2); RFC 6531 3.3
# allows UTF-8 as well.
_VALUE_RE = re.compile(rf"[\x21-\x3c\x3e-\x7e{_U}]+")
_IPV4_RE = re.compile(r"(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})")
_XTEXT_HEX_RE = re.compile(rb"\+([0-9A-Fa-f]{2})")
_ADDR_TYPE_RE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\-]+")  # an RFC 5322 atom
_UNITEXT_RE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}|\+([0-9A-Fa-f]{2})")


@dataclass(frozen=True, slots=True)
class Path:
    """A parsed reverse- or forward-path.

    `local_part` is as written (quotes and escapes kept); `domain` is as
    written, an address literal with its brackets. `route` holds the domains
    of a source route that was given and dropped. The null path has neither
    local part nor domain; `<Postmaster>` has a local part and no domain.
    """

    local_part: str = ""
    domain: str = ""
    route: tuple[str, ...] = ()

    @property
    def address(self) -> str:
        """`local@domain` (the route dropped), "" for the null path."""
        return f"{self.local_part}@{self.domain}" if self.domain else self.local_part

    @property
    def is_utf8(self) -> bool:
        """Non-ASCII characters anywhere: needs SMTPUTF8 (RFC 6531 3.3)."""
        return not (self.local_part.isascii() and self.domain.isascii())

    def __str__(self) -> str:
        return f"<{self.address}>"


NULL_PATH = Path()


def parse_reverse_path(text: str) -> tuple[Path, str]:
    """Parse the argument after "MAIL FROM:"; return the path and the rest.

    The rest is "" or the parameters (leading spaces removed).
    """
    text = text.lstrip(" ")
    if text.startswith("<>"):
        return NULL_PATH, _rest(text, 2)
    return _parse_path(text)


def parse_forward_path(text: str) -> tuple[Path, str]:
    """Parse the argument after "RCPT TO:"; return the path and the rest."""
    text = text.lstrip(" ")
    if text.startswith("<>"):
        raise AddressError("the null path is not a valid recipient")
    m = _POSTMASTER_RE.match(text)
    if m is not None:
        return Path(local_part=m.group(1)), _rest(text, m.end())
    return _parse_path(text)


def _parse_path(text: str) -> tuple[Path, str]:
    if not text.startswith("<"):
        raise AddressError("the address must be enclosed in <>")
    m = _PATH_RE.match(text)
    if m is None:
        raise AddressError(_path_problem(text))
    domain = m.group("domain")
    if domain.startswith("["):
        _check_literal(domain)
    elif len(domain.encode("utf-8")) > MAX_DOMAIN:
        raise AddressError(f"domain longer than {MAX_DOMAIN} octets")
    route_text = m.group("route")
    route = tuple(d[1:] for d in route_text.split(",")) if route_text else ()
    return Path(m.group("local"), domain, route), _rest(text, m.end())


def _rest(text: str, end: int) -> str:
    rest = text[end:]
    if rest and not rest.startswith(" "):
        raise AddressError("unexpected text after the address")
    return rest.lstrip(" ")


def _path_problem(text: str) -> str:
    """A short reason for a path that did not match (for the reply text)."""
    inner = text[1:]
    if ">" not in inner:
        return "missing closing >"
    if "@" not in inner:
        return "missing @domain"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in inner):
        return "control character in the address"
    if inner.startswith("@"):
        return "malformed source route"
    return "malformed address"


def _check_literal(literal: str) -> None:
    """Address literals (RFC 5321 4.1.3): IPv4 or "IPv6:" forms only."""
    body = literal[1:-1]
    m = _IPV4_RE.fullmatch(body)
    if m is not None:
        if all(int(octet) <= 255 for octet in m.groups()):
            return
        raise AddressError("invalid IPv4 address literal")
    tag, sep, value = body.partition(":")
    if sep and tag.lower() == "ipv6":
        try:
            ipaddress.IPv6Address(value)
        except ValueError:
            raise AddressError("invalid IPv6 address literal") from None
        return
    raise AddressError("unsupported address literal")


def parse_parameters(text: str) -> dict[str, str | None]:
    """ESMTP parameters (RFC 5321 4.1.2): keywords upper-cased, values as given.

    Raises ParameterError on a malformed keyword or value, or on a keyword
    given twice with different values. A keyword repeated exactly (both times
    without a value, or with the same value) says nothing new and is taken
    once: Python's smtplib sends "SMTPUTF8 SMTPUTF8" (and "BODY=8BITMIME"
    twice) when its caller passes the options it adds by itself, and Exim
    accepts that.
    """
    params: dict[str, str | None] = {}
    for item in text.split():
        keyword, sep, value = item.partition("=")
        if not _KEYWORD_RE.fullmatch(keyword):
            raise ParameterError(f"malformed parameter {_shown(keyword)}")
        if sep and not _VALUE_RE.fullmatch(value):
            raise ParameterError(f"malformed value for {keyword.upper()}")
        key = keyword.upper()
        given = value if sep else None
        if key in params and params[key] != given:
            raise ParameterError(f"duplicate parameter {key}")
        params[key] = given
    return params


class Parameters(NamedTuple):
    """The ESMTP parameters of one MAIL or RCPT command, checked and decoded."""

    size: int | None = None  # SIZE (RFC 1870)
    body: str | None = None  # BODY (RFC 6152)
    smtputf8: bool = False  # SMTPUTF8 (RFC 6531)
    ret: str | None = None  # RET (RFC 3461 4.3)
    envid: str | None = None  # ENVID, decoded (RFC 3461 4.4)
    auth: str | None = None  # AUTH=, decoded (RFC 4954 5)
    notify: tuple[str, ...] | None = None  # NOTIFY (RFC 3461 4.1)
    orcpt: str | None = None  # ORCPT as "type;decoded" (RFC 3461 4.2)


_NO_PARAMETERS = Parameters()
MAIL_PARAMETERS = frozenset({"SIZE", "BODY", "SMTPUTF8", "RET", "ENVID", "AUTH"})
RCPT_PARAMETERS = frozenset({"NOTIFY", "ORCPT"})


def parse_esmtp_parameters(text: str, offered: frozenset[str]) -> Parameters:
    """The parameters after a MAIL or RCPT path: UnsupportedParameter for a keyword not
    `offered` (or RFC 3030's BODY=BINARYMIME), ParameterError for anything malformed;
    keywords are checked first, then the values in the order of the fields."""
    if not text:
        return _NO_PARAMETERS
    params = parse_parameters(text)
    for keyword in params:
        if keyword not in offered:
            raise UnsupportedParameter(keyword)
    size = parse_size(params["SIZE"]) if "SIZE" in params else None
    body = params.get("BODY")
    if body is not None and body.upper() == "BINARYMIME":
        raise UnsupportedParameter("BODY", body)
    if params.get("SMTPUTF8") is not None:
        raise ParameterError("SMTPUTF8 takes no value")
    return Parameters(
        size=size,
        body=parse_body(body) if "BODY" in params else None,
        smtputf8="SMTPUTF8" in params,
        ret=parse_ret(params["RET"]) if "RET" in params else None,
        envid=parse_envid(params["ENVID"]) if "ENVID" in params else None,
        auth=parse_auth_param(params["AUTH"]) if "AUTH" in params else None,
        notify=parse_notify(params["NOTIFY"]) if "NOTIFY" in params else None,
        orcpt=parse_orcpt(params["ORCPT"]) if "ORCPT" in params else None,
    )


def _shown(text: str) -> str:
    """Client text safe to echo in a reply: printable ASCII, bounded."""
    clean = "".join(c if 0x21 <= ord(c) <= 0x7E else "?" for c in text[:40])
    return clean or '""'


def xtext_decode(text: str) -> str:
    """Decode an xtext (RFC 3461 4): "+XX" is the octet with hex value XX.

    The decoded octets must form UTF-8 text. Raises ParameterError on
    characters outside xchar or a malformed "+" escape.
    """
    for c in text:
        o = ord(c)
        if o < 0x21 or o > 0x7E or c == "=":
            raise ParameterError("invalid character in xtext")
    if text.count("+") != len(_XTEXT_HEX_RE.findall(text.encode("ascii"))):
        raise ParameterError("malformed + escape in xtext")
    raw = _XTEXT_HEX_RE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("ascii"))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ParameterError("xtext does not decode to UTF-8 text") from None


def xtext_encode(text: str) -> str:
    """Encode text as xtext (RFC 3461 4), for a client sending ENVID/ORCPT/AUTH."""
    out = []
    for byte in text.encode("utf-8"):
        if 0x21 <= byte <= 0x7E and byte not in (0x2B, 0x3D):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


def parse_size(value: str | None) -> int:
    """SIZE=n (RFC 1870 3): up to 20 digits."""
    if value is None or not value.isdigit() or not value.isascii():
        raise ParameterError("SIZE needs a number of octets")
    if len(value) > MAX_SIZE_DIGITS:
        raise ParameterError("SIZE value too long")
    return int(value)


def parse_notify(value: str | None) -> tuple[str, ...]:
    """NOTIFY (RFC 3461 4.1): NEVER alone, or a list of SUCCESS, FAILURE, DELAY."""
    if not value:
        raise ParameterError("NOTIFY needs a value")
    items = value.upper().split(",")
    if items == [NOTIFY_NEVER]:
        return (NOTIFY_NEVER,)
    if len(set(items)) != len(items) or not set(items) <= NOTIFY_KEYWORDS:
        raise ParameterError("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY")
    return tuple(items)


def parse_ret(value: str | None) -> str:
    """RET (RFC 3461 4.3): FULL or HDRS."""
    ret = (value or "").upper()
    if ret not in RET_VALUES:
        raise ParameterError("RET must be FULL or HDRS")
    return ret


def parse_envid(value: str | None) -> str:
    """ENVID (RFC 3461 4.4): xtext, decoded; printable ASCII, at most 100 characters."""
    if not value:
        raise ParameterError("ENVID needs a value")
    envid = xtext_decode(value)
    if len(envid) > MAX_ENVID:
        raise ParameterError(f"ENVID longer than {MAX_ENVID} characters")
    if not all(0x20 <= ord(c) <= 0x7E for c in envid):
        raise ParameterError("ENVID must be printable ASCII")
    return envid


def parse_orcpt(value: str | None) -> str:
    """ORCPT (RFC 3461 4.2): "addr-type;xtext", returned as "type;decoded".

    The "utf-8" address type's escapes (RFC 6533 3: "\\x{HEX}" and "+XX")
    are decoded too.
    """
    if not value:
        raise ParameterError("ORCPT needs a value")
    if len(value) > MAX_ORCPT:
        raise ParameterError(f"ORCPT longer than {MAX_ORCPT} characters")
    addr_type, sep, encoded = value.partition(";")
    if not sep or not _ADDR_TYPE_RE.fullmatch(addr_type) or not encoded:
        raise ParameterError("ORCPT must be addr-type;address")
    if addr_type.lower() == "utf-8":
        decoded = _unitext_decode(encoded)
    else:
        decoded = xtext_decode(encoded)
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        raise ParameterError("control character in ORCPT")
    return f"{addr_type};{decoded}"


def _unitext_decode(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        code = int(m.group(1) or m.group(2), 16)
        if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
            raise ParameterError("invalid code point in ORCPT")
        return chr(code)

    return _UNITEXT_RE.sub(one, text)


def parse_body(value: str | None) -> str:
    """BODY (RFC 6152 2): 7BIT or 8BITMIME, upper-cased."""
    body = (value or "").upper()
    if body not in BODY_VALUES:
        raise ParameterError("BODY must be 7BIT or 8BITMIME")
    return body


def parse_auth_param(value: str | None) -> str:
    """AUTH= on MAIL (RFC 4954 5): xtext of a mailbox or "<>", decoded."""
    if not value:
        raise ParameterError("AUTH needs a value")
    decoded = xtext_decode(value)
    if decoded == "<>":
        return decoded
    try:
        path, rest = parse_forward_path(f"<{decoded}>")
    except AddressError:
        raise ParameterError("AUTH must be a mailbox or <>") from None
    if rest or not path.domain:
        raise ParameterError("AUTH must be a mailbox or <>")
    return decoded
