"""What an SMTP listener offers: its limits, its extensions, and the EHLO and HELP lines.

The server layer builds an `SMTPServerConfig` per listener; the core asks it what
to announce and accept in a session's condition (TLS started, authenticated).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postroom.protocol.header_limits import MAX_HEADER_FIELDS, MAX_HEADER_SECTION
from postroom.protocol.lines import BARE_NEWLINE_MODES
from postroom.protocol.smtp_paths import MAIL_PARAMETERS, RCPT_PARAMETERS

MAX_COMMAND_LINE = 512  # RFC 5321 4.5.3.1.4: command line including CRLF
SIZE_ALLOWANCE = 26  # RFC 1870 3 (5): " SIZE=" and up to 20 digits on MAIL
DSN_MAIL_ALLOWANCE = 100  # RFC 3461 4: RET and ENVID on MAIL
DSN_RCPT_ALLOWANCE = 500  # RFC 3461 4: NOTIFY and ORCPT on RCPT
SMTPUTF8_ALLOWANCE = 10  # RFC 6531 3.1 (5): " SMTPUTF8" on MAIL
BODY_ALLOWANCE = 16  # " BODY=8BITMIME" (RFC 6152 names no figure; room for it)
AUTH_PARAM_ALLOWANCE = 500  # AUTH=<mailbox> as xtext (RFC 4954 5 names no figure)
MAX_MAIL_LINE = (MAX_COMMAND_LINE + SIZE_ALLOWANCE + DSN_MAIL_ALLOWANCE + SMTPUTF8_ALLOWANCE
                 + BODY_ALLOWANCE + AUTH_PARAM_ALLOWANCE)
MAX_RCPT_LINE = MAX_COMMAND_LINE + DSN_RCPT_ALLOWANCE
MAX_AUTH_LINE = 12288  # RFC 4954 4: AUTH lines and SASL responses
MAX_RECIPIENTS = 100  # RFC 5321 4.5.3.1.8: the recipients buffer's minimum
MAX_CHUNK_DIGITS = 20  # BDAT chunk sizes, like RFC 1870's size-value
DEFAULT_MAX_MESSAGE_SIZE = 50 * 1024 * 1024
DEFAULT_MAX_ERRORS = 10

# Per-command line limits, checked once the verb is known (the line buffer keeps
# the longest, MAX_AUTH_LINE).
LINE_LIMITS = {"MAIL": MAX_MAIL_LINE, "RCPT": MAX_RCPT_LINE, "AUTH": MAX_AUTH_LINE}

_MECHANISM_RE = re.compile(r"[A-Z0-9_-]{1,20}")  # RFC 4422 3.1


@dataclass(frozen=True, slots=True)
class SMTPServerConfig:
    """What a listener offers. See smtp_server's docstring for who answers what."""

    hostname: str
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE  # RFC 1870 SIZE; 0 = no limit
    max_recipients: int = MAX_RECIPIENTS  # then 452 4.5.3 (RFC 5321 4.5.3.1.10)
    max_errors: int = DEFAULT_MAX_ERRORS  # then 421 4.7.0 and close; 0 = no limit
    bare_newline: str = "reject"  # "reject" | "normalize" (bare LF/CR in lines)
    starttls: bool = False  # STARTTLS offered (until TLS is active)
    tls_active: bool = False  # implicit TLS (port 465) from the start
    auth_mechanisms: tuple[str, ...] = ()  # offered with TLS (or auth_plaintext)
    auth_plaintext: bool = False  # allow AUTH before TLS
    auth_required: bool = False  # MAIL before AUTH -> 530 5.7.0 (submission)
    chunking: bool = True  # RFC 3030 CHUNKING (BDAT)
    dsn: bool = True  # RFC 3461
    smtputf8: bool = True  # RFC 6531
    eightbitmime: bool = True  # RFC 6152
    pipelining: bool = True  # RFC 2920 (advertised; input is read in order anyway)
    max_header_size: int = MAX_HEADER_SECTION  # octets of the header section, then 552
    max_header_fields: int = MAX_HEADER_FIELDS  # fields in the header section, then 554

    def __post_init__(self) -> None:
        if self.bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline must be one of {BARE_NEWLINE_MODES}")
        if not self.hostname or any(ord(c) < 0x21 or ord(c) == 0x7F for c in self.hostname):
            raise ValueError("hostname must be a non-empty name without spaces or controls")
        if self.max_message_size < 0 or self.max_errors < 0 or self.max_recipients < 1:
            raise ValueError("limits must be positive (0 = none for size and errors)")
        if self.max_header_size < 1 or self.max_header_fields < 1:
            raise ValueError("header limits must be positive")
        for mech in self.auth_mechanisms:
            if not _MECHANISM_RE.fullmatch(mech):
                raise ValueError(f"invalid SASL mechanism name {mech!r}")

    @property
    def smtputf8_offered(self) -> bool:
        # RFC 6531 3.1 (8): SMTPUTF8 only comes with 8BITMIME.
        return self.smtputf8 and self.eightbitmime

    def starttls_offered(self, tls: bool) -> bool:
        return self.starttls and not tls

    def auth_offered(self, tls: bool, authenticated: bool) -> bool:
        return bool(self.auth_mechanisms) and not authenticated and (tls or self.auth_plaintext)

    def extensions(self, tls: bool, authenticated: bool) -> list[str]:
        """The EHLO keyword lines (RFC 5321 4.1.1.1) for a session in this condition."""
        ext = []
        if self.pipelining:
            ext.append("PIPELINING")
        ext.append(f"SIZE {self.max_message_size}" if self.max_message_size else "SIZE")
        if self.eightbitmime:
            ext.append("8BITMIME")
        ext.append("ENHANCEDSTATUSCODES")
        if self.smtputf8_offered:
            ext.append("SMTPUTF8")
        if self.starttls_offered(tls):
            ext.append("STARTTLS")
        if self.auth_offered(tls, authenticated):
            ext.append("AUTH " + " ".join(self.auth_mechanisms))
        if self.chunking:
            ext.append("CHUNKING")
        if self.dsn:
            ext.append("DSN")
        return ext

    def help_text(self, tls: bool, authenticated: bool) -> str:
        """HELP's answer: the commands this session may use."""
        commands = ["EHLO", "HELO", "MAIL", "RCPT", "DATA"]
        if self.chunking:
            commands.append("BDAT")
        commands += ["RSET", "NOOP", "QUIT", "VRFY", "HELP"]
        if self.starttls_offered(tls):
            commands.append("STARTTLS")
        if self.auth_offered(tls, authenticated):
            commands.append("AUTH")
        return "Commands: " + " ".join(commands)

    def mail_parameters(self) -> frozenset[str]:
        """The MAIL parameters taken: SIZE always, the rest with their extensions."""
        dropped = set()
        if not self.eightbitmime:
            dropped.add("BODY")
        if not self.smtputf8_offered:
            dropped.add("SMTPUTF8")
        if not self.dsn:
            dropped |= {"RET", "ENVID"}
        if not self.auth_mechanisms:
            dropped.add("AUTH")  # RFC 4954 5: with AUTH offered, taken even before AUTH
        return MAIL_PARAMETERS - dropped

    def rcpt_parameters(self) -> frozenset[str]:
        return RCPT_PARAMETERS if self.dsn else frozenset()
