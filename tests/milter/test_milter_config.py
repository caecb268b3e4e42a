"""[milters] in the config: socket forms, per-filter settings over the section's, errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.config import ConfigError, load_config
from postroom.milter.connection import MilterSpec, parse_socket


def config(tmp_path: Path, milters: str):  # type: ignore[no-untyped-def]
    (tmp_path / "postroom.toml").write_text(f'domains = ["corp.example"]\n[milters]\n{milters}')
    return load_config(tmp_path)


def test_listeners_get_their_filters_with_the_section_defaults(tmp_path: Path) -> None:
    loaded = config(tmp_path, 'smtp = ["inet:127.0.0.1:11332", { socket = "unix:/run/f.sock", '
                              'default_action = "accept", content_timeout = "10s" }]\n'
                              'submission = ["inet6:[::1]:8891"]\ncommand_timeout = "5s"\n')
    m = loaded.milters
    assert m.for_listener("smtp") == (
        MilterSpec("inet:127.0.0.1:11332", "tempfail", 30.0, 5.0, 300.0),
        MilterSpec("unix:/run/f.sock", "accept", 30.0, 5.0, 10.0))
    assert m.for_listener("submission") == (MilterSpec("inet6:[::1]:8891", command_timeout=5.0),)
    assert m.for_listener("submissions") == m.for_listener("submission")  # left out: the same


def test_no_milters_by_default(tmp_path: Path) -> None:
    loaded = config(tmp_path, "")
    assert [loaded.milters.for_listener(n) for n in ("smtp", "submission", "submissions")] == \
        [(), (), ()]


@pytest.mark.parametrize("bad", [
    'smtp = ["tcp:127.0.0.1:1"]', 'smtp = ["inet:127.0.0.1"]', 'smtp = ["inet:host:99999"]',
    'smtp = ["unix:"]', 'smtp = [{ socket = "inet:h:1", bogus = 1 }]',
    'smtp = [{ socket = "inet:h:1", default_action = "reject" }]', 'default_action = "maybe"',
    'smtp = "inet:h:1"',
])
def test_bad_settings_name_the_key(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError, match=r"milters\."):
        config(tmp_path, bad + "\n")


def test_socket_forms() -> None:
    assert parse_socket("inet:127.0.0.1:11332") == ("inet", "127.0.0.1", 11332)
    assert parse_socket("inet6:[::1]:8891") == ("inet", "::1", 8891)
    assert parse_socket("inet6:::1:8891") == ("inet", "::1", 8891)
    assert parse_socket("unix:/run/x.sock") == ("unix", "/run/x.sock", 0)
