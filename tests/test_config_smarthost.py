"""[routes] entries may be tables: a smarthost that requires TLS and takes a login."""

from pathlib import Path

import pytest

from postroom.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> None:
    (tmp_path / "postroom.toml").write_text(text)


def test_smarthost_table_with_tls_and_login(tmp_path: Path) -> None:
    (tmp_path / "relay.secret").write_text("s3cret\n")
    write(tmp_path, '[routes]\n'
          + '"corp.example" = { host = "relay.example:587", tls = "required", '
            'user = "smith", password_file = "relay.secret" }\n'
          + '"other.example" = "10.1.1.1"\n')
    config = load_config(tmp_path)
    route = config.routes["corp.example"]
    assert (route.host, route.port, route.tls, route.auth) == (
        "relay.example", 587, "required", ("smith", "s3cret"))
    assert "s3cret" not in repr(route)
    plain = config.routes["other.example"]
    assert (plain.port, plain.tls, plain.auth) == (25, "opportunistic", None)


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('{ host = "r.example", tls = "maybe" }', 'routes."corp.example".tls'),
        ('{ host = "r.example", user = "u" }', "give both user and password_file"),
        ('{ host = "r.example", user = "u", password_file = "missing" }', "cannot read"),
        ('{ hots = "r.example" }', "did you mean host"),
        ("{ tls = \"required\" }", 'routes."corp.example".host'),
        ("25", "expected a string"),
    ],
)
def test_smarthost_errors_are_one_line(tmp_path: Path, table: str, words: str) -> None:
    write(tmp_path, f'[routes]\n"corp.example" = {table}\n')
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    message = str(info.value)
    assert "\n" not in message and words in message, message
