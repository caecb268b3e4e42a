"""The Config tree; each field that is a config key declares its default, parser and comment."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Any, Literal

from postroom.canonical import domain_of
from postroom.config.values import (
    Endpoint,
    parse_account,
    parse_acme_directory,
    parse_bool,
    parse_choice,
    parse_contacts,
    parse_domains,
    parse_duration,
    parse_durations,
    parse_folder,
    parse_hostname,
    parse_int,
    parse_listener,
    parse_mailbox,
    parse_milters,
    parse_names,
    parse_nameservers,
    parse_networks,
    parse_optional_listener,
    parse_optional_path,
    parse_path,
    parse_size,
    parse_store_url,
)
from postroom.milter.connection import MilterSpec
from postroom.store.api import StoreSettings

CONFIG_NAME = "postroom.toml"
DEFAULT_DATA_DIR = Path("var")
DEFAULT_SOURCE = "<default config>"  # names the embedded default in errors


class ConfigError(Exception):
    """A configuration problem; str() is one line naming the file, the key and the fault."""


@dataclass(frozen=True)
class Key:
    """One config key: its default as raw TOML, its parser, and the comment `postroom init` writes.

    Loading a file, building the embedded default (parse(default)) and rendering
    the commented file all read these, so the three cannot drift apart.
    """

    default: Any
    parse: Callable[[Any], Any]
    doc: str


def setting(default: Any, parse: Callable[[Any], Any], doc: str) -> Any:
    """A dataclass field that is a config key; the loader always passes its value."""
    return field(metadata={"key": Key(default, parse, doc)})


def keys(cls: type) -> dict[str, Key]:
    """The config keys of a section's dataclass (or of Config: the top level), in file order."""
    return {f.name: f.metadata["key"] for f in fields(cls) if "key" in f.metadata}


@dataclass(frozen=True)
class ListenConfig:
    """Where each service listens; None turns that listener off."""

    smtp: Endpoint | None = setting(
        "127.0.0.1:2525", parse_listener,
        "SMTP from other mail hosts (MX traffic, RFC 5321): no AUTH, mail only for "
        "local recipients. The standard port is 25.",
    )
    submission: Endpoint | None = setting(
        "127.0.0.1:2587", parse_listener,
        "Message submission for your users' mail clients (RFC 6409): STARTTLS, then "
        "AUTH is required. The standard port is 587.",
    )
    submissions: Endpoint | None = setting(
        "127.0.0.1:2465", parse_listener,
        "Submission over implicit TLS (RFC 8314). The standard port is 465.",
    )
    pop3: Endpoint | None = setting(
        "127.0.0.1:2110", parse_listener,
        "POP3 (RFC 1939) with STLS to upgrade to TLS. The standard port is 110.",
    )
    pop3s: Endpoint | None = setting(
        "127.0.0.1:2995", parse_listener,
        "POP3 over implicit TLS (RFC 8314). The standard port is 995.",
    )

    def enabled(self) -> dict[str, Endpoint]:
        """The listeners that are on, by name (smtp, submission, ...)."""
        endpoints = {name: getattr(self, name) for name in keys(ListenConfig)}
        return {name: endpoint for name, endpoint in endpoints.items() if endpoint is not None}


@dataclass(frozen=True)
class AcmeConfig:
    """[tls] acme = { ... }: the certificate comes from an ACME CA (RFC 8555)."""

    directory: str = setting(
        None, parse_acme_directory,
        'The CA\'s ACME directory URL (required), e.g. Let\'s Encrypt\'s '
        '"https://acme-v02.api.letsencrypt.org/directory".',
    )
    contact: tuple[str, ...] = setting(
        [], parse_contacts,
        "Addresses the CA may write to about the account (expiry notices), a string or a "
        "list; empty: none (RFC 8555 7.3).",
    )
    names: tuple[str, ...] = setting(
        None, parse_names,  # [hostname] when left out, filled in at load time
        "Host names the certificate is for; default: [hostname]. Each must resolve to "
        "this host, where the CA connects to check it.",
    )
    challenge_listen: Endpoint = setting(
        "0.0.0.0:80", parse_listener,
        "Where postroom answers the CA's HTTP-01 challenges (RFC 8555 8.3): the CA "
        "connects to port 80 of each name, so in production this is port 80.",
    )
    ca_bundle: Path | None = setting(
        "", parse_optional_path,
        "CA certificates (PEM) that the ACME server's HTTPS certificate is checked "
        "against, for a private CA; empty: the system's trusted CAs.",
    )
    renew_before: float = setting(
        "30d", parse_duration,
        "Renew this long before the certificate expires, or at two thirds of its "
        "lifetime if that comes first (short-lived certificates).",
    )
    retry_after: tuple[float, ...] = setting(
        ["5m", "30m", "2h", "6h"], parse_durations,
        "Waits between attempts while the CA cannot be reached or refuses; after the last "
        "one, every attempt waits that long again. The certificate in use stays meanwhile.",
    )


# The example [tls] shows for `acme` (it has no default: off unless written), as its
# own table; `acme = { directory = "...", names = [...] }` on one line is the same.
ACME_EXAMPLE = ("[tls.acme]\n"
                '# directory = "https://acme-v02.api.letsencrypt.org/directory"\n'
                '# contact = "postmaster@corp.example"\n'
                '# names = ["mx.corp.example"]')


@dataclass(frozen=True)
class MetricsConfig:
    listen: Endpoint | None = setting(
        "", parse_optional_listener,
        'Where to serve Prometheus metrics (/metrics) and a health check (/health), e.g. '
        '"127.0.0.1:9325"; keep it on loopback or behind a firewall. Empty: off.',
    )


@dataclass(frozen=True)
class TLSConfig:
    # True for the default paths: a self-signed pair is made on first start if
    # missing. Paths named explicitly must exist (no silent stand-in certificate).
    # With ACME the pair is the CA's, and a self-signed one stands in until the first.
    generate: bool
    cert: Path = setting(
        "tls/cert.pem", parse_path,
        "Certificate chain (PEM). At this default path a self-signed certificate is "
        "made on first start when missing; a path you choose must exist (unless acme "
        "below writes it). Replaced files are taken without a restart.",
    )
    key: Path = setting("tls/key.pem", parse_path, "Private key (PEM) of the certificate.")
    acme: AcmeConfig | None = None  # the table's keys are AcmeConfig's


@dataclass(frozen=True)
class DNSConfig:
    nameservers: tuple[Endpoint, ...] = setting(  # empty: the system resolver
        [], parse_nameservers,
        'DNS servers for MX, A and AAAA lookups, as "IP" or "IP:PORT". Empty: the '
        "system's resolver (/etc/resolv.conf).",
    )


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


# [routes] has no fixed keys: each key is a domain.
ROUTES_DOC = (
    'Static next hops, checked before MX lookup: "DOMAIN" = "HOST" or "HOST:PORT" '
    "(port 25 when left out). Mail for DOMAIN goes there instead of to its MX hosts."
)


@dataclass(frozen=True)
class RelayConfig:
    mx_port: int = setting(  # RFC 5321 4.5.4: SMTP relays to port 25
        25, parse_int(1, 65535),
        "Port used to deliver to hosts found by MX lookup. Only tests change it.",
    )


@dataclass(frozen=True)
class QueueConfig:
    retry_after: tuple[float, ...] = setting(  # seconds; the last one repeats
        ["1m", "5m", "15m", "1h"], parse_durations,
        "Waits between delivery attempts of a message that failed temporarily; after "
        "the last one, every attempt waits that long again.",
    )
    give_up_after: float = setting(
        "5d", parse_duration,
        "How long after its arrival a message that still cannot be delivered is "
        "returned to its sender with a bounce (RFC 5321 4.5.4.1: 4-5 days).",
    )
    delay_warning_after: float = setting(
        "4h", partial(parse_duration, zero=True),
        "After this long undelivered, the sender gets one notice that the message is "
        "delayed and still being retried (RFC 3464 action \"delayed\"). 0 turns it off.",
    )
    max_per_destination: int = setting(
        10, parse_int(1), "Simultaneous deliveries to one destination domain.",
    )


@dataclass(frozen=True)
class SMTPConfig:
    max_message_size: int = setting(
        "50M", parse_size, "Largest message accepted, announced with EHLO SIZE (RFC 1870).",
    )
    max_recipients: int = setting(
        100, parse_int(1),
        "Recipients per message; RFC 5321 4.5.3.1.8 requires accepting at least 100.",
    )
    max_errors: int = setting(
        10, parse_int(1), "Bad commands in one session before the connection is closed.",
    )
    max_received_headers: int = setting(
        50, parse_int(1),
        "Received: headers after which a message is taken to be looping and refused "
        "(RFC 5321 6.3).",
    )
    bare_newline: Literal["reject", "normalize"] = setting(
        "reject", parse_choice("reject", "normalize"),
        'A line ending in LF without CR inside DATA: "reject" the message (guards '
        'against SMTP smuggling) or "normalize" it to CRLF.',
    )
    max_connections: int = setting(500, parse_int(1), "Simultaneous SMTP sessions, all listeners.")
    max_connections_per_client: int = setting(
        50, parse_int(1), "Simultaneous SMTP sessions from one IP address.",
    )
    command_timeout: float = setting(
        "5m", parse_duration,
        "Idle time waiting for a command before the session is closed "
        "(RFC 5321 4.5.3.2.7: at least 5 minutes).",
    )
    data_timeout: float = setting(
        "10m", parse_duration,
        "Idle time waiting for more message data (RFC 5321 4.5.3.2.6: at least 3 minutes).",
    )
    allow_plaintext_auth: bool = setting(  # RFC 4954 4 advises against it
        False, parse_bool,
        "Offer AUTH on connections that are not encrypted (passwords in the clear).",
    )
    check_from_header: bool = setting(
        True, parse_bool,
        "Submission: refuse messages whose From: is not an address of the "
        "authenticated user.",
    )
    min_free_space: int = setting(
        "100M", partial(parse_size, zero=True),
        "Free space kept on the filesystems of the mailboxes and the queue: MAIL FROM "
        "gets 452 4.3.1 when less than this, plus the size the client declares with "
        "SIZE=, is free (as Postfix's queue_minfree). 0 checks the declared size alone.",
    )


@dataclass(frozen=True)
class POP3Config:
    allow_plaintext_auth: bool = setting(  # RFC 2595 2.3
        False, parse_bool,
        "Allow USER/PASS on connections that are not encrypted (passwords in the clear).",
    )
    idle_timeout: float = setting(
        "10m", parse_duration,
        "Idle time before an inactive session is closed (RFC 1939 3: at least 10 minutes).",
    )
    max_connections: int = setting(500, parse_int(1), "Simultaneous POP3 sessions, all listeners.")
    max_connections_per_client: int = setting(
        50, parse_int(1), "Simultaneous POP3 sessions from one IP address.",
    )
    apop: bool = setting(
        False, parse_bool,
        "Offer APOP (RFC 1939 7): the greeting then carries a timestamp. Only users "
        "given an APOP secret (postroom user apop ADDRESS on) can use it.",
    )
    auth_failure_delay: float = setting(
        "2s", partial(parse_duration, zero=True),
        "Wait before answering a failed login (POP3 and submission AUTH); doubles with "
        "each recent failure from the same address or for the same account, up to 15s. "
        "0 turns it off.",
    )


@dataclass(frozen=True)
class DMARCConfig:
    """Checking what strangers send to the smtp listener (postroom.mailauth)."""

    check: bool = setting(
        True, parse_bool,
        "Check SPF, DKIM, ARC, DMARC and iprev of mail arriving on the smtp listener, and "
        "put the results on top of it in an Authentication-Results header. Uses [dns].",
    )
    enforce: bool = setting(
        True, parse_bool,
        "Act on the sender domain's DMARC policy when its mail fails it: p=reject is "
        "refused (550 5.7.1), p=quarantine is filed in the recipient's Junk folder. false: "
        "only record the results. A failing SPF -all alone refuses nothing (DMARC decides).",
    )
    junk_folder: str = setting(
        "Junk", parse_folder,
        "The folder quarantined mail is filed in (Maildir++ .Junk, Dovecot's IMAP Junk).",
    )
    inbox_quarantine_domains: tuple[str, ...] = setting(
        [], parse_domains,
        "Local domains whose users read by POP3 only (which shows no folders): their "
        "quarantined mail goes to the inbox with an X-Spam-Flag: YES header instead.",
    )
    no_reject_domains: tuple[str, ...] = setting(
        [], parse_domains,
        "Local domains that never refuse mail for a failed p=reject: it is quarantined "
        "instead (for recipients who would rather look than lose).",
    )
    dns_errors: Literal["defer", "accept"] = setting(
        "defer", parse_choice("defer", "accept"),
        'When a DNS failure leaves a DMARC verdict open: "defer" answers 451 4.7.0 (the '
        'sender retries; nothing is lost), "accept" delivers it with a temperror result.',
    )
    ignore_clients: tuple[Any, ...] = setting(
        ["127.0.0.0/8", "::1"], parse_networks,
        "Clients whose mail is not checked (this host's own programs), as OpenDMARC's "
        "IgnoreHosts.",
    )
    trusted_arc_sealers: tuple[str, ...] = setting(
        [], parse_domains,
        "Domains (mailing lists, forwarders you rely on) whose valid ARC seal (RFC 8617) "
        "lets their forwarded mail in when it fails DMARC here.",
    )


@dataclass(frozen=True)
class DKIMConfig:
    """DKIM signing (RFC 6376, RFC 8463); the keys are made by `postroom dkim add`."""

    sign: bool = setting(
        True, parse_bool,
        "DKIM-sign the mail authenticated users submit (submission, submissions, "
        "postroom sendmail) and the delivery reports this host sends, with every active "
        "key of the From domain (postroom dkim add; keys live in DATA/dkim). A domain "
        "without a key is sent unsigned. false: sign nothing.",
    )


@dataclass(frozen=True)
class MiltersConfig:
    """[milters]: Sendmail/Postfix milter filters per SMTP listener (postroom.milter)."""

    smtp: tuple[Any, ...] = setting(
        [], parse_milters,
        'The filters (milters) of the smtp listener (MX), in order, as Postfix\'s '
        'smtpd_milters: "inet:HOST:PORT", "inet6:HOST:PORT" or "unix:PATH", or a table '
        '{ socket = "inet:...", default_action = "accept", connect_timeout = "5s", '
        "command_timeout = ..., content_timeout = ... } overriding the defaults below for "
        "one filter.")
    submission: tuple[Any, ...] = setting(
        [], parse_milters, "The filters of the submission listener, as for smtp.")
    submissions: tuple[Any, ...] | None = setting(
        None, parse_milters,
        "The filters of the submissions listener (implicit TLS); left out: the same as "
        "submission.")
    default_action: str = setting(
        "tempfail", parse_choice("tempfail", "accept"),
        'What a filter that is down, times out or answers garbage means (Postfix\'s '
        'milter_default_action): "tempfail" answers 451 4.7.1, so nothing is lost and '
        'nothing passes unfiltered; "accept" goes on without the filter.')
    connect_timeout: float = setting(
        "30s", parse_duration,
        "Time to connect to a filter and negotiate (Postfix's milter_connect_timeout).")
    command_timeout: float = setting(
        "30s", parse_duration,
        "Time a filter may take to answer the connect, HELO, MAIL and RCPT steps "
        "(Postfix's milter_command_timeout).")
    content_timeout: float = setting(
        "300s", parse_duration,
        "Time a filter may take to answer each piece of the message and its end "
        "(Postfix's milter_content_timeout).")

    def for_listener(self, name: str) -> tuple[MilterSpec, ...]:
        """The filters of listener `name`, each with its own limits filled in."""
        items = self.submission if name == "submissions" and self.submissions is None \
            else getattr(self, name, ())
        defaults = {"default_action": self.default_action,
                    "connect_timeout": self.connect_timeout,
                    "command_timeout": self.command_timeout,
                    "content_timeout": self.content_timeout}
        return tuple(MilterSpec(**{**defaults, **item}) for item in items or ())


# The defences' sections (their module uses setting() above).
from postroom.config.defense import (  # noqa: E402
    DNSBLConfig,
    GreylistConfig,
    LimitsConfig,
    ScreenConfig,
)


@dataclass(frozen=True)
class RunConfig:
    """Who the server runs as once its listeners are bound (server.privileges)."""

    user: str = setting(
        "postroom", parse_account,
        "Started as root, `postroom serve` binds its listeners (ports below 1024 need "
        "root or CAP_NET_BIND_SERVICE), then runs as this user; the data folder, queue "
        "and mailboxes must belong to it (`postroom init --system` prepares that). "
        '"root" keeps running as root, which is not recommended. Started as another '
        "user, it stays that user. `postroom serve --user` overrides this key.",
    )
    group: str = setting(
        "postroom", parse_account,
        "The group the server runs as after the switch to `user`; files it creates "
        "belong to it.",
    )


@dataclass(frozen=True)
class StoreConfig:
    url: str = setting(
        "", parse_store_url,
        'Where users, domains, aliases and mailboxes live. Empty: in the data folder '
        '(SQLite and Maildirs). "postgresql://USER@HOST:PORT/DATABASE" keeps them in '
        "PostgreSQL, shared by every postroom node that names the same database (a "
        "password is better kept in ~/.pgpass or PGPASSWORD than here).",
    )


# The tables of the file in the order `postroom init` writes them; None: [routes].
SECTIONS: dict[str, type | None] = {
    "listen": ListenConfig, "tls": TLSConfig, "dns": DNSConfig, "routes": None,
    "relay": RelayConfig, "queue": QueueConfig, "smtp": SMTPConfig, "pop3": POP3Config,
    "dmarc": DMARCConfig,
    "dkim": DKIMConfig,
    "milters": MiltersConfig,
    "limits": LimitsConfig, "screen": ScreenConfig, "dnsbl": DNSBLConfig,
    "greylist": GreylistConfig,
    "metrics": MetricsConfig,
    "run": RunConfig,
    "store": StoreConfig,
}
# A table whose Config field has another name (Config.store is the StoreSettings).
SECTION_FIELDS = {"store": "store_config"}


@dataclass(frozen=True)
class Config:
    """The whole configuration: the top-level keys, then one field per table."""

    data_dir: Path
    listen: ListenConfig
    tls: TLSConfig
    dns: DNSConfig
    routes: Mapping[str, Route]
    relay: RelayConfig
    queue: QueueConfig
    smtp: SMTPConfig
    pop3: POP3Config
    dmarc: DMARCConfig
    dkim: DKIMConfig
    milters: MiltersConfig
    limits: LimitsConfig
    screen: ScreenConfig
    dnsbl: DNSBLConfig
    greylist: GreylistConfig
    metrics: MetricsConfig
    run: RunConfig
    hostname: str = setting(
        None,  # default_hostname(), filled in at load time
        parse_hostname,
        "The name this host gives in its SMTP greeting, EHLO and Received: headers.",
    )
    domains: tuple[str, ...] = setting(
        ["localhost"], parse_domains,
        "Mail domains this host receives mail for. `postroom domain add` adds more "
        "without editing this file.",
    )
    # postmaster@ of every local domain goes here unless an alias says otherwise
    # (RFC 5321 4.5.1); see postmaster_address().
    postmaster: str = setting(
        None,  # postmaster@ the first of `domains`, filled in at load time
        parse_mailbox,
        "The administrator's mailbox. Mail to postmaster@ of every local domain (RFC 5321 "
        "4.5.1 requires that address, in any letter case) is filed here unless an alias for "
        "postmaster@DOMAIN exists. An address in a local domain; until `postroom user add` "
        "gives it a password, its mail waits in its mailbox folder (mail/DOMAIN/NAME in the "
        "data folder).",
    )
    workers: int = setting(
        0, parse_int(0),
        "Server processes sharing the listeners (Python runs one core per process); 0 "
        "means one per CPU. [limits] and login delays count across all of them. The "
        "first process also relays the queue, so it takes a submission connection only "
        "when the others leave it waiting.",
    )
    # Where the settings came from (None: the embedded default); not part of
    # the configuration's value, so a file with default content equals no file.
    config_path: Path | None = field(default=None, compare=False)
    store_config: StoreConfig = field(default_factory=StoreConfig)  # [store]

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
                             self.postmaster, self.source, url=self.store_config.url or None,
                             spool_dir=self.data_dir / "store-spool")

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
