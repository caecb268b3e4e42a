"""The config file: read into a Config, or written commented by `postroom init`."""

from __future__ import annotations

import difflib
import textwrap
import tomllib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from postroom.canonical import canonical_domain
from postroom.config.model import (
    ACME_EXAMPLE,
    CONFIG_NAME,
    DEFAULT_DATA_DIR,
    DEFAULT_SOURCE,
    ROUTES_DOC,
    SECTION_FIELDS,
    SECTIONS,
    AcmeConfig,
    Config,
    ConfigError,
    Key,
    ListenConfig,
    Route,
    TLSConfig,
    keys,
)
from postroom.config.values import default_hostname, parse_endpoint, show, type_name

SMARTHOST_KEYS = ("host", "password_file", "tls", "user")
ROUTE_TLS = ("opportunistic", "required", "none")


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

    def value(self, key: str, spec: Key, raw: object) -> Any:
        try:
            return spec.parse(raw)
        except ValueError as e:
            raise self.error(key, str(e)) from None

    def table(self, key: str, raw: object, known: Sequence[str]) -> dict[str, Any]:
        """`raw`, which must be a table holding only `known` keys."""
        if not isinstance(raw, dict):
            raise self.error(key, f"expected a table [{key}], got {type_name(raw)}")
        for name in raw:
            if name not in known:
                raise self.error(f"{key}.{name}", "unknown key" + _suggest(name, known))
        return raw

    def section(self, doc: dict[str, Any], name: str, cls: type) -> dict[str, Any]:
        """The values of table [name], each key parsed from the file or from its default."""
        specs = keys(cls)
        raw = self.table(name, doc.get(name, {}), list(specs))
        return {key: self.value(f"{name}.{key}", spec, raw.get(key, spec.default))
                for key, spec in specs.items()}

    def load(self, doc: dict[str, Any]) -> Config:
        known_top = [*keys(Config), *SECTIONS]
        for key, raw in doc.items():
            if key not in known_top:
                kind = "unknown section" if isinstance(raw, dict) else "unknown key"
                raise self.error(key, kind + _suggest(key, known_top))
        top = self.top(doc)
        sections = {SECTION_FIELDS.get(name, name): cls(**self.section(doc, name, cls))
                    for name, cls in SECTIONS.items()
                    if cls is not None and cls not in (ListenConfig, TLSConfig)}
        return Config(data_dir=self.data_dir, listen=self.listen(doc),
                      tls=self.tls(doc, top["hostname"]),
                      routes=self.routes(doc.get("routes", {})), **sections, **top)

    def top(self, doc: dict[str, Any]) -> dict[str, Any]:
        """The top-level keys; hostname and postmaster have defaults computed here."""
        top = {key: self.value(key, spec, doc.get(key, spec.default))
               for key, spec in keys(Config).items() if key in doc or spec.default is not None}
        top.setdefault("hostname", default_hostname())
        if "postmaster" not in top:
            if not top["domains"]:
                raise self.error("postmaster", "`domains` is empty, so name the administrator's "
                                 'address here (postmaster = "boss@corp.example")')
            top["postmaster"] = f"postmaster@{top['domains'][0]}"
        return top

    def listen(self, doc: dict[str, Any]) -> ListenConfig:
        """A [listen] table lists exactly the listeners to run; without one, all five run."""
        specs = keys(ListenConfig)
        raw = self.table("listen", doc.get("listen", {}), list(specs))
        endpoints: dict[str, Any] = dict.fromkeys(specs)
        for key, spec in specs.items():
            if key in raw or "listen" not in doc:
                endpoint = self.value(f"listen.{key}", spec, raw.get(key, spec.default))
                for other, seen in endpoints.items():
                    if seen == endpoint and endpoint.port != 0:  # port 0: any free port
                        raise self.error(f"listen.{key}", f"{endpoint} is also listen.{other}")
                endpoints[key] = endpoint
        return ListenConfig(**endpoints)

    def tls(self, doc: dict[str, Any], hostname: str) -> TLSConfig:
        """Paths relative to the data folder; only the default ones may be missing, or
        any with ACME, which writes them."""
        raw = doc.get("tls", {})
        acme = None
        if isinstance(raw, dict) and "acme" in raw:
            acme = self.acme(raw["acme"], hostname)
            doc = {**doc, "tls": {k: v for k, v in raw.items() if k != "acme"}}
        paths = {key: self.data_dir / path
                 for key, path in self.section(doc, "tls", TLSConfig).items()}
        generate = acme is not None or all(
            path == self.data_dir / keys(TLSConfig)[key].default for key, path in paths.items())
        if not generate:
            for key, path in paths.items():
                if not path.is_file():
                    where = ("named here" if key in doc.get("tls", {})
                             else "the default, as the other one is not")
                    raise self.error(f"tls.{key}", f"{path} does not exist ({where})")
        return TLSConfig(generate=generate, acme=acme, **paths)

    def acme(self, raw: object, hostname: str) -> AcmeConfig:
        """[tls] acme = { directory = ..., ... }: a table of AcmeConfig's keys."""
        specs = keys(AcmeConfig)
        table = self.table("tls.acme", raw, list(specs))
        if "directory" not in table:
            raise self.error("tls.acme.directory", "missing: the CA's ACME directory URL")
        values = {key: self.value(f"tls.acme.{key}", spec, table.get(key, spec.default))
                  for key, spec in specs.items() if key in table or spec.default is not None}
        values.setdefault("names", (hostname,))
        if values.get("ca_bundle") is not None:
            values["ca_bundle"] = self.data_dir / values["ca_bundle"]
        return AcmeConfig(**values)

    def routes(self, raw: object) -> dict[str, Route]:
        """[routes]: "DOMAIN" = "HOST[:PORT]", or a smarthost table."""
        if not isinstance(raw, dict):
            raise self.error("routes", f"expected a table [routes], got {type_name(raw)}")
        routes: dict[str, Route] = {}
        for domain, target in raw.items():
            key = f"routes.{show(domain)}"
            try:
                name = canonical_domain(domain)
            except ValueError:
                raise self.error(key, f"{show(domain)} is not a domain name") from None
            if isinstance(target, str):  # short for { host = "HOST[:PORT]" }
                route = self.smarthost(key, {"host": target}, host_key=key)
            elif isinstance(target, dict):
                route = self.smarthost(key, target, host_key=f"{key}.host")
            else:
                raise self.error(
                    key, 'expected a string "HOST[:PORT]" or a table { host = ..., tls = ..., '
                    f"user = ..., password_file = ... }}, got {type_name(target)}"
                )
            if name in routes:
                raise self.error(key, f"{name} has a route already")
            routes[name] = route
        return routes

    def smarthost(self, key: str, table: dict[str, Any], host_key: str) -> Route:
        """`"corp.example" = { host = "relay.example:587", tls = "required", user = "u",
        password_file = "secrets/relay" }`: the password is read from a file (relative to
        the data folder) so the config can be shared without it."""
        self.table(key, table, SMARTHOST_KEYS)
        host = table.get("host")
        if not isinstance(host, str):
            raise self.error(host_key, 'expected a string "HOST[:PORT]"')
        try:
            endpoint = parse_endpoint(host, default_port=25)
        except ValueError as e:
            raise self.error(host_key, str(e)) from None
        tls = table.get("tls", "opportunistic")
        if tls not in ROUTE_TLS:
            raise self.error(f"{key}.tls",
                             f'{show(tls)} is not "opportunistic", "required" or "none"')
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
    path = Path(config_file).expanduser() if config_file is not None else given_dir / CONFIG_NAME
    shown = str(path)
    if config_file is None and not path.exists():
        return default_config(given_dir)
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
    return replace(_Loader(given_dir.absolute(), shown).load(doc), config_path=path.absolute())


def default_config(data_dir: Path | str = DEFAULT_DATA_DIR) -> Config:
    """The embedded default Config for a data directory (what no file means)."""
    return _Loader(Path(data_dir).expanduser().absolute(), DEFAULT_SOURCE).load({})


HEADER = [
    "# postroom configuration (written by `postroom init`).",
    "#",
    '# Durations are seconds or "30s", "5m", "1h", "5d"; sizes are octets or "10K", "50M",',
    '# "1G" (K = 1024). Addresses are "HOST:PORT" or "[IPv6]:PORT". Relative paths are',
    "# relative to the data folder that holds this file.",
    "",
]


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
    given = {"hostname": hostname, "domains": None if domains is None else list(domains),
             "postmaster": postmaster}
    # Checked as the loader checks them, so init never writes a file that will not load.
    top = _Loader(Path(), CONFIG_NAME).top({k: v for k, v in given.items() if v is not None})
    lines = list(HEADER)
    for key, spec in keys(Config).items():
        lines += [*_comment(spec.doc), f"{key} = {show(top[key])}", ""]
    for name, cls in SECTIONS.items():
        lines.append(f"[{name}]")
        if cls is None:  # [routes]: no fixed keys, so an example
            lines += [*_comment(ROUTES_DOC), '# "isp.example" = "127.0.0.1:3525"', ""]
            continue
        if name == "listen":
            lines += _comment("Remove or comment out a line to turn that listener off.")
        for key, spec in keys(cls).items():
            # A key whose default is "unset" (None) is written commented out.
            unset = "# " if spec.default is None else ""
            lines += [*_comment(spec.doc),
                      f"{unset}{key} = {show([] if unset else spec.default)}"]
        if name == "tls":  # ACME is off unless written: an example, then what each key means
            lines += [*_comment("Certificates from an ACME CA (RFC 8555) with the HTTP-01 "
                                "challenge, stored at cert and key above and renewed before "
                                "they expire; uncomment and edit (keys below):"),
                      f"# {ACME_EXAMPLE}"]
            for key, spec in keys(AcmeConfig).items():
                lines += _comment(f"{key}: {spec.doc}")
        lines.append("")
    return "\n".join(lines)
