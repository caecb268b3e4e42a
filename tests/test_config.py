"""Configuration: the embedded default, the TOML file, the rendered default, one-line errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from postroom.config import (
    Config,
    ConfigError,
    Endpoint,
    Route,
    default_config,
    load_config,
    postmaster_address,
    render_default_config,
)
from postroom.config.values import default_hostname, parse_duration, parse_endpoint, parse_size


def write(data: Path, text: str) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    path = data / "postroom.toml"
    path.write_text(text, encoding="utf-8")
    return path


def load_text(tmp_path: Path, text: str) -> Config:
    write(tmp_path, text)
    return load_config(tmp_path)


# -- the embedded default --------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    assert config.config_path is None
    assert config.data_dir == tmp_path
    assert config.hostname == default_hostname()
    assert config.domains == ("localhost",)
    assert config.listen.enabled() == {
        "smtp": Endpoint("127.0.0.1", 2525),
        "submission": Endpoint("127.0.0.1", 2587),
        "submissions": Endpoint("127.0.0.1", 2465),
        "pop3": Endpoint("127.0.0.1", 2110),
        "pop3s": Endpoint("127.0.0.1", 2995),
    }
    assert config.tls.cert == tmp_path / "tls" / "cert.pem"
    assert config.tls.key == tmp_path / "tls" / "key.pem"
    assert config.tls.generate
    assert config.dns.nameservers == ()
    assert config.routes == {}
    assert config.relay.mx_port == 25
    assert config.queue.retry_after == (60, 300, 900, 3600)
    assert config.queue.give_up_after == 5 * 86400
    assert config.users_db == tmp_path / "users.sqlite3"
    assert config.mail_dir == tmp_path / "mail"
    assert config.spool_dir == tmp_path / "spool"
    assert config.queue_dir == tmp_path / "queue"
    smtp = config.smtp
    assert smtp.max_message_size == 50 * 1024 * 1024
    assert (smtp.max_recipients, smtp.max_errors, smtp.max_received_headers) == (100, 10, 50)
    assert smtp.bare_newline == "reject"
    assert (smtp.max_connections, smtp.max_connections_per_client) == (500, 50)
    assert (smtp.command_timeout, smtp.data_timeout) == (300, 600)
    assert not smtp.allow_plaintext_auth and smtp.check_from_header
    assert not config.pop3.allow_plaintext_auth
    assert config.pop3.idle_timeout == 600


def test_relative_data_dir_becomes_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("var"))
    assert config.data_dir == tmp_path / "var"
    assert config.data_dir.is_absolute()


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(tmp_path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.hostname = "x"  # type: ignore[misc]


def test_rendered_default_loads_back_identical(tmp_path: Path) -> None:
    path = write(tmp_path, render_default_config())
    loaded = load_config(tmp_path)
    assert loaded.config_path == path
    assert loaded == default_config(tmp_path)
    assert dataclasses.replace(loaded, config_path=None) == default_config(tmp_path)


def test_rendered_default_comments_every_key() -> None:
    text = render_default_config()
    lines = text.splitlines()
    keys = [i for i, line in enumerate(lines) if line and line[0].isalpha()]
    assert len(keys) > 20
    for i in keys:
        assert lines[i - 1].startswith("#"), f"no comment above {lines[i]!r}"
    assert all(len(line) <= 100 for line in lines)


def test_rendered_with_hostname_and_domains(tmp_path: Path) -> None:
    write(tmp_path, render_default_config(hostname="mx.corp.example", domains=["Corp.Example"]))
    config = load_config(tmp_path)
    assert config.hostname == "mx.corp.example"
    assert config.domains == ("corp.example",)
    with pytest.raises(ConfigError):
        render_default_config(hostname="not a host")


# -- values from a file ----------------------------------------------------------


def test_full_file(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "c.pem").write_text("x")
    (tmp_path / "certs" / "k.pem").write_text("x")
    config = load_text(
        tmp_path,
        """
hostname = "MX.Corp.Example."
domains = ["corp.example", "Bücher.example", "corp.example"]
[listen]
smtp = "0.0.0.0:25"
pop3s = "[::1]:995"
[tls]
cert = "certs/c.pem"
key = "certs/k.pem"
[dns]
nameservers = ["127.0.0.1:5353", "::1", "[::1]:53"]
[routes]
"ISP.example" = "127.0.0.1:3525"
"other.example" = "relay.example"
[relay]
mx_port = 2526
[queue]
retry_after = [30, "1.5m", "2h"]
give_up_after = "1w"
[smtp]
max_message_size = 1000
bare_newline = "normalize"
command_timeout = "30s"
allow_plaintext_auth = true
[pop3]
idle_timeout = 5
max_connections = 3
""",
    )
    assert config.hostname == "mx.corp.example"
    assert config.domains == ("corp.example", "xn--bcher-kva.example")
    assert config.listen.enabled() == {
        "smtp": Endpoint("0.0.0.0", 25),
        "pop3s": Endpoint("::1", 995),
    }
    assert config.listen.submission is None
    assert str(config.listen.pop3s) == "[::1]:995"
    assert config.tls.cert == tmp_path / "certs" / "c.pem"
    assert not config.tls.generate
    assert config.dns.nameservers == (
        Endpoint("127.0.0.1", 5353), Endpoint("::1", 53), Endpoint("::1", 53)
    )
    assert config.routes == {
        "isp.example": Route("127.0.0.1", 3525),
        "other.example": Route("relay.example", 25),
    }
    assert config.relay.mx_port == 2526
    assert config.queue.retry_after == (30, 90, 7200)
    assert config.queue.give_up_after == 7 * 86400
    assert config.smtp.max_message_size == 1000
    assert config.smtp.bare_newline == "normalize"
    assert config.smtp.command_timeout == 30
    assert config.smtp.allow_plaintext_auth
    assert config.smtp.max_recipients == 100  # untouched keys keep their defaults
    assert (config.pop3.idle_timeout, config.pop3.max_connections) == (5, 3)


def test_empty_listen_table_turns_everything_off(tmp_path: Path) -> None:
    assert load_text(tmp_path, "[listen]\n").listen.enabled() == {}


def test_explicit_config_file(tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('hostname = "other.example"\n')
    write(tmp_path / "data", 'hostname = "ignored.example"\n')
    config = load_config(tmp_path / "data", other)
    assert config.hostname == "other.example"
    assert config.config_path == other
    assert config.data_dir == tmp_path / "data"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [(30, 30), (1.5, 1.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("5d", 432000),
     ("2w", 1209600), ("500ms", 0.5), ("10", 10), ("1.5H", 5400)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5x", "-1m", "0", 0, True, "m5", [1]])
def test_bad_durations(text: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "octets"),
    [(1000, 1000), ("10K", 10240), ("50M", 52428800), ("1G", 1 << 30), ("2mb", 2 << 20),
     ("3KiB", 3072), ("77", 77)],
)
def test_sizes(text: object, octets: int) -> None:
    assert parse_size(text) == octets


@pytest.mark.parametrize("text", ["", "10T", "1.5M", "-1", 0, False, 2.5])
def test_bad_sizes(text: object) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [("127.0.0.1:25", Endpoint("127.0.0.1", 25)), ("[::]:587", Endpoint("::", 587)),
     ("Localhost:2525", Endpoint("localhost", 2525)),
     ("[0:0::1]:1", Endpoint("::1", 1)),
     ("Bücher.example.:25", Endpoint("xn--bcher-kva.example", 25))],  # as domains are
)
def test_endpoints(text: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(text) == endpoint


# -- errors: one line, naming the file and the key -------------------------------------

ERRORS = [
    # (file content, the key named, words in the message)
    ("hostname = \n", None, "invalid TOML"),
    ('[smtp]\nmax_recipients = 5\nmax_recipients = 6\n', None, "line 3"),
    ('hostnme = "x"\n', "hostnme", "unknown key (did you mean hostname?)"),
    ("[smpt]\nmax_errors = 3\n", "smpt", "unknown section (did you mean smtp?)"),
    ("[smtp]\nmax_recipient = 5\n", "smtp.max_recipient", "did you mean max_recipients?"),
    ("[pop3]\nfrobnicate = 1\n", "pop3.frobnicate", "unknown key"),
    ("smtp = 5\n", "smtp", "expected a table [smtp]"),
    ('[listen]\nsmtp = "127.0.0.1:99999"\n', "listen.smtp",
     '"127.0.0.1:99999" is not HOST:PORT (port must be 0-65535)'),
    ('[listen]\nsmtp = "127.0.0.1"\n', "listen.smtp", "the port is missing"),
    ('[listen]\nsmtp = "::1:25"\n', "listen.smtp", "write IPv6 addresses in brackets"),
    ('[listen]\nsmtp = "[nonsense]:25"\n', "listen.smtp", "IPv6"),
    ('[listen]\nsmtp = ":25"\n', "listen.smtp", "the host is missing"),
    ('[listen]\nsmtp = "bad host:25"\n', "listen.smtp", "not an IP address or host name"),
    ("[listen]\nsmtp = 25\n", "listen.smtp", "expected a string"),
    ('[listen]\nsmtp = "127.0.0.1:25"\npop3 = "127.0.0.1:25"\n', "listen.pop3",
     "is also listen.smtp"),
    ('[smtp]\nmax_recipients = "ten"\n', "smtp.max_recipients", 'expected an integer, got'),
    ("[smtp]\nmax_recipients = true\n", "smtp.max_recipients", "expected an integer"),
    ("[smtp]\nmax_recipients = 0\n", "smtp.max_recipients", "out of range"),
    ('[smtp]\nmax_message_size = "lots"\n', "smtp.max_message_size", "is not a size"),
    ('[smtp]\ncommand_timeout = "5 minutes"\n', "smtp.command_timeout", "is not a duration"),
    ('[smtp]\nbare_newline = "fix"\n', "smtp.bare_newline", '"reject" or "normalize"'),
    ('[smtp]\nallow_plaintext_auth = "yes"\n', "smtp.allow_plaintext_auth", "true or false"),
    ("[pop3]\nidle_timeout = -5\n", "pop3.idle_timeout", "more than zero"),
    ("[queue]\nretry_after = []\n", "queue.retry_after", "the list is empty"),
    ('[queue]\nretry_after = "5m"\n', "queue.retry_after", "expected a list"),
    ('[queue]\ngive_up_after = "forever"\n', "queue.give_up_after", "is not a duration"),
    ("[relay]\nmx_port = 70000\n", "relay.mx_port", "out of range (must be 1-65535)"),
    ('[dns]\nnameservers = ["dns.example"]\n', "dns.nameservers", "is not an IP address"),
    ('[dns]\nnameservers = "127.0.0.1"\n', "dns.nameservers", "expected a list"),
    ('[routes]\n"isp.example" = "127.0.0.1:0"\n', 'routes."isp.example"', "port must be 1-65535"),
    ('[routes]\n"isp.example" = 25\n', 'routes."isp.example"', "expected a string"),
    ('[routes]\n"not a domain" = "h:25"\n', 'routes."not a domain"', "is not a domain name"),
    ('routes = "x"\n', "routes", "expected a table [routes]"),
    ('domains = "corp.example"\n', "domains", "expected a list of domain names"),
    ('domains = ["corp..example"]\n', "domains", "is not a domain name"),
    ('domains = ["[127.0.0.1]"]\n', "domains", "address literal"),
    ('hostname = "bad host"\n', "hostname", "is not a host name"),
    ('hostname = "192.0.2.1"\n', "hostname", "is not a host name"),
    ('domains = ["1.2.3.4"]\n', "domains", "1.2.3.4 is an IP address, not a mail domain"),
    ('domains = ["mail.example.42"]\n', "domains", "last label is a number"),
    ('domains = []\n', "postmaster", "`domains` is empty, so name the administrator"),
    ('postmaster = "boss"\n', "postmaster", "no @"),
    ('postmaster = "boss@"\n', "postmaster", "no domain after the @"),
    ('postmaster = "boss@10.0.0.1"\n', "postmaster", "not a mail domain"),
    ('postmaster = "\\"a b\\"@corp.example"\n', "postmaster", "plain dot-atom"),
    ("postmaster = 5\n", "postmaster", "expected an address"),
    ("[queue]\ndelay_warning_after = -1\n", "queue.delay_warning_after", "zero (off) or more"),
    ('[pop3]\nauth_failure_delay = "soon"\n', "pop3.auth_failure_delay", "not a duration"),
    ("[queue]\ngive_up_after = 0\n", "queue.give_up_after", "more than zero"),
    ("[smtp]\nmax_message_size = 0\n", "smtp.max_message_size", "more than zero"),
    ("[smtp]\nmin_free_space = -1\n", "smtp.min_free_space", "must be zero or more"),
    ('[tls]\ncert = "missing.pem"\n', "tls.cert", "does not exist (named here)"),
    ('[tls]\ncert = ""\n', "tls.cert", "the path is empty"),
]


@pytest.mark.parametrize(("text", "key", "words"), ERRORS)
def test_errors_are_one_line_with_file_and_key(
    tmp_path: Path, text: str, key: str | None, words: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    if key is not None:
        assert message.startswith(f"{path}: {key}: "), message
    assert words in message


def test_exact_port_message(tmp_path: Path) -> None:
    write(tmp_path, '[listen]\nsmtp = "127.0.0.1:99999"\n')
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert str(e.value) == (
        f'{tmp_path}/postroom.toml: listen.smtp: "127.0.0.1:99999" is not HOST:PORT '
        "(port must be 0-65535)"
    )


def test_tls_key_missing_when_cert_is_named(tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    write(tmp_path, '[tls]\ncert = "c.pem"\n')
    with pytest.raises(ConfigError, match=r"tls\.key: .*key\.pem does not exist"):
        load_config(tmp_path)


def test_default_cert_need_not_exist(tmp_path: Path) -> None:
    write(tmp_path, '[tls]\ncert = "tls/cert.pem"\nkey = "tls/key.pem"\n')
    assert load_config(tmp_path).tls.generate


def test_named_config_file_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file$"):
        load_config(tmp_path, tmp_path / "nope.toml")


def test_config_file_not_utf8(tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").write_bytes(b'hostname = "\xff"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(tmp_path)


def test_config_file_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").mkdir()
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


@pytest.mark.parametrize("zero", [0, 0.0, "0", "0s", "0m"])
def test_zero_turns_the_delays_off(tmp_path: Path, zero: object) -> None:
    # The README and `postroom init` promise it for these two keys.
    value = f'"{zero}"' if isinstance(zero, str) else str(zero)
    config = load_text(tmp_path, f"[queue]\ndelay_warning_after = {value}\n"
                                 f"[pop3]\nauth_failure_delay = {value}\n")
    assert (config.queue.delay_warning_after, config.pop3.auth_failure_delay) == (0, 0)


@pytest.mark.parametrize("zero", [0, "0", "0K"])
def test_zero_min_free_space_checks_the_declared_size_alone(tmp_path: Path, zero: object) -> None:
    # The README and `postroom init` promise it (diskspace.FreeSpace then needs SIZE= alone).
    value = f'"{zero}"' if isinstance(zero, str) else str(zero)
    assert load_text(tmp_path, f"[smtp]\nmin_free_space = {value}\n").smtp.min_free_space == 0


def test_postmaster_defaults_to_the_first_domain(tmp_path: Path) -> None:
    config = load_text(tmp_path, 'domains = ["Corp.Example", "other.example"]\n')
    assert config.postmaster == "postmaster@corp.example"
    assert postmaster_address(config) == "postmaster@corp.example"
    assert load_config(tmp_path / "none").postmaster == "postmaster@localhost"


def test_postmaster_names_the_administrator(tmp_path: Path) -> None:
    config = load_text(tmp_path, 'domains = ["corp.example"]\npostmaster = "Boss@Other.Example"\n')
    assert config.postmaster == "boss@other.example"
    assert postmaster_address(config) == "postmaster@corp.example"
    # With no domain in the file, the administrator's (a `domain add` one) is the first.
    config = load_text(tmp_path, 'domains = []\npostmaster = "it@added.example"\n')
    assert postmaster_address(config) == "postmaster@added.example"


def test_rendered_with_a_postmaster(tmp_path: Path) -> None:
    text = render_default_config(hostname="mx.corp.example", domains=["corp.example"],
                                 postmaster="Boss@corp.example")
    assert 'postmaster = "boss@corp.example"' in text
    assert load_text(tmp_path, text).postmaster == "boss@corp.example"
    with pytest.raises(ConfigError, match="postroom.toml: .*no @"):
        render_default_config(postmaster="boss")
