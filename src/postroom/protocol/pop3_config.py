"""What a POP3 listener offers: its limits, its configuration, and the CAPA lines.

The server layer builds a `POP3ServerConfig` per listener; the core checks it
once (`check`) and asks it what to announce and accept with or without TLS.
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.protocol._core import LocalProtocolError
from postroom.protocol.pop3_wire import TIMESTAMP_RE

# RFC 2449 4: a command line, keyword and arguments with the terminating CRLF, is at
# most 255 octets.
MAX_COMMAND_LINE = 255
# RFC 5034 4: SASL responses are not bound by the 255-octet command limit (tokens such
# as GSSAPI's outgrow it); 8 KiB holds every mechanism postroom offers with room left.
MAX_AUTH_LINE = 8192
# Mechanisms that send the password itself: refused before TLS unless allowed.
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


@dataclass(frozen=True)
class POP3ServerConfig:
    """What this listener offers; the server layer builds one per connection kind."""

    implementation: str = "postroom"
    stls: bool = False  # STLS offered (until TLS is active)
    tls_active: bool = False  # implicit TLS (pop3s, RFC 8314)
    allow_plaintext_auth: bool = False  # USER/PASS and AUTH PLAIN/LOGIN before TLS
    sasl_mechanisms: tuple[str, ...] = ("PLAIN", "LOGIN")
    apop_timestamp: str | None = None  # "<pid.clock@host>" in the greeting turns APOP on
    login_delay: int | None = None  # RFC 2449 6.5, seconds
    expire: str | None = None  # RFC 2449 6.7: "NEVER" or days
    max_errors: int = 10

    def check(self) -> None:
        """LocalProtocolError if the core cannot work with this configuration."""
        if self.apop_timestamp is not None and not TIMESTAMP_RE.fullmatch(self.apop_timestamp):
            raise LocalProtocolError(
                f"APOP timestamp must look like <x@y>: {self.apop_timestamp!r}"
            )
        if "\r" in self.implementation or "\n" in self.implementation:
            raise LocalProtocolError("implementation must be one line")
        if self.max_errors < 1:
            raise LocalProtocolError("max_errors must be at least 1")

    def plaintext_allowed(self, tls: bool) -> bool:
        return tls or self.allow_plaintext_auth

    def stls_offered(self, tls: bool) -> bool:
        return self.stls and not tls

    def mechanisms(self, tls: bool) -> list[str]:
        """The SASL mechanisms on offer: those that send the password only with TLS,
        unless plaintext is allowed."""
        plain_ok = self.plaintext_allowed(tls)
        names = (m.upper() for m in self.sasl_mechanisms)
        return [m for m in names if plain_ok or m not in PLAINTEXT_MECHANISMS]

    def capabilities(self, tls: bool, logged_in: bool) -> list[str]:
        """The CAPA lines on offer (RFC 2449 5)."""
        caps = ["TOP", "UIDL"]
        # RFC 2449 5: what AUTHORIZATION offers is announced in both states; USER and
        # SASL follow whether plaintext passwords are allowed on this connection now.
        if self.plaintext_allowed(tls):
            caps.append("USER")
        mechanisms = self.mechanisms(tls)
        if mechanisms:
            caps.append("SASL " + " ".join(mechanisms))
        # RFC 2595 4: STLS only before TLS and only in AUTHORIZATION, so it is left out
        # after login where issuing it could only fail.
        if self.stls_offered(tls) and not logged_in:
            caps.append("STLS")
        caps += ["RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
        if self.login_delay is not None:
            caps.append(f"LOGIN-DELAY {self.login_delay}")
        if self.expire is not None:
            caps.append(f"EXPIRE {self.expire}")
        caps.append(f"IMPLEMENTATION {self.implementation}")
        return caps
