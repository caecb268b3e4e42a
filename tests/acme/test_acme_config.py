"""[tls] acme = { ... } and [metrics] in the config file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from postroom.config import ConfigError, load_config, render_default_config
from postroom.config.values import Endpoint


def load(tmp_path: Path, text: str):  # type: ignore[no-untyped-def]
    (tmp_path / "postroom.toml").write_text('hostname = "mx.corp.example"\n' + text)
    return load_config(tmp_path)


def test_acme_table_with_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, '[tls]\nacme = { directory = "https://ca.example/dir" }\n')
    acme = config.tls.acme
    assert acme is not None
    assert acme.names == ("mx.corp.example",) and acme.contact == ()
    assert acme.challenge_listen == Endpoint("0.0.0.0", 80)
    assert acme.renew_before == 30 * 86400 and acme.ca_bundle is None
    assert config.tls.generate  # a stand-in until the first certificate comes


def test_acme_as_its_own_table_with_every_key(tmp_path: Path) -> None:
    config = load(tmp_path, '[tls]\ncert = "le/cert.pem"\nkey = "le/key.pem"\n[tls.acme]\n'
                  'directory = "https://ca.example/dir"\ncontact = ["a@corp.example"]\n'
                  'names = ["MX.corp.example", "smtp.corp.example"]\n'
                  'challenge_listen = "127.0.0.1:8080"\nca_bundle = "ca.pem"\n'
                  'renew_before = "10d"\nretry_after = ["1m"]\n')
    acme = config.tls.acme
    assert acme is not None
    assert acme.names == ("mx.corp.example", "smtp.corp.example")
    assert acme.contact == ("mailto:a@corp.example",)
    assert acme.ca_bundle == tmp_path.absolute() / "ca.pem"
    assert config.tls.cert == tmp_path.absolute() / "le/cert.pem"  # written by ACME later


@pytest.mark.parametrize(("text", "message"), [
    ('acme = { contact = "a@corp.example" }', "tls.acme.directory: missing"),
    ('acme = { directory = "http://ca.example/dir" }', "tls.acme.directory:"),
    ('acme = { directory = "https://ca.example/dir", name = ["x.example"] }',
     "tls.acme.name: unknown key (did you mean names?)"),
    ('acme = { directory = "https://ca.example/dir", names = [] }', "tls.acme.names:"),
    ('acme = "https://ca.example/dir"', "tls.acme: expected a table"),
])
def test_acme_mistakes_are_one_line_naming_the_key(tmp_path: Path, text: str,
                                                   message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load(tmp_path, f"[tls]\n{text}\n")


def test_metrics_is_off_by_default_and_takes_an_address(tmp_path: Path) -> None:
    assert load(tmp_path, "").metrics.listen is None
    config = load(tmp_path, '[metrics]\nlisten = "127.0.0.1:9325"\n')
    assert config.metrics.listen == Endpoint("127.0.0.1", 9325)


def test_the_rendered_default_shows_acme_commented_and_loads(tmp_path: Path) -> None:
    text = render_default_config()
    assert "\n# [tls.acme]\n" in text and "[metrics]" in text
    (tmp_path / "postroom.toml").write_text(text)
    assert load_config(tmp_path).tls.acme is None
    # Uncommented as it says, the example turns ACME on.
    lines = text.splitlines()
    start = lines.index("# [tls.acme]")
    lines[start:start + 4] = [line[2:] for line in lines[start:start + 4]]
    (tmp_path / "postroom.toml").write_text("\n".join(lines))
    acme = load_config(tmp_path).tls.acme
    assert acme is not None and acme.names == ("mx.corp.example",)
