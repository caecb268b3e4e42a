"""DNS list sites, HELO names and the greylist's triplets (defense.dnsbl, .helo, .greylist)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postroom.defense.dnsbl import parse_site, query_name
from postroom.defense.greylist import Greylist, client_network
from postroom.defense.helo import claims_to_be_us, valid_helo


def test_sites_are_read_as_postscreen_writes_them() -> None:
    site = parse_site("zen.example=127.0.0.[2..11]*3")
    assert (site.zone, site.weight) == ("zen.example", 3)
    assert site.counts("127.0.0.2") and site.counts("127.0.0.11")
    assert not site.counts("127.0.0.1") and not site.counts("127.0.0.12")
    allow = parse_site("list.dnswl.example=127.0.[0..255].[1;3]*-2")
    assert allow.weight == -2 and allow.counts("127.0.9.3") and not allow.counts("127.0.9.2")
    plain = parse_site("bl.example")
    assert plain.weight == 1 and plain.filter is None and plain.counts("127.0.0.4")
    for bad in ("bl.example=127.0.0", "bl.example*0", "bl.example=127.0.0.[9..2]", "=1.2.3.4"):
        with pytest.raises(ValueError):
            parse_site(bad)


def test_addresses_are_asked_for_as_rfc_5782_says() -> None:
    assert query_name("192.0.2.99", "bl.example") == "99.2.0.192.bl.example."
    assert query_name("::ffff:192.0.2.99", "bl.example") == "99.2.0.192.bl.example."
    assert query_name("2001:db8:1:2:3:4:567:89ab", "bl.example") == (
        "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.bl.example.")


def test_helo_names() -> None:
    for good in ("mail.example.org", "localhost", "[192.0.2.1]", "[IPv6:2001:db8::1]",
                 "mx-1.example.", "xn--bcher-kva.example"):
        assert valid_helo(good), good
    for bad in ("mail_host.example", "-bad.example", "[300.1.1.1]", "[2001:db8::1]",
                "example..org", "192.0.2.1", "a" * 64 + ".example", "bad!name"):
        assert not valid_helo(bad), bad
    ours = frozenset({"mx.corp.example", "corp.example"})
    assert claims_to_be_us("MX.corp.example", ours, "192.0.2.25", "198.51.100.7")
    assert claims_to_be_us("corp.example.", ours, "192.0.2.25", "198.51.100.7")
    assert claims_to_be_us("[192.0.2.25]", ours, "192.0.2.25", "198.51.100.7")
    assert not claims_to_be_us("[192.0.2.25]", ours, "192.0.2.25", "192.0.2.25")
    assert not claims_to_be_us("mail.other.example", ours, "192.0.2.25", "198.51.100.7")


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_greylisting_a_triplet(tmp_path: Path) -> None:
    clock = Clock()
    grey = Greylist(tmp_path / "g.sqlite3", delay=300, retry_window=2 * 86400,
                    lifetime=35 * 86400, auto_allow_after=2, clock=clock)
    args = ("192.0.2.10", "a@sender.example", "boss@corp.example")
    assert grey.check_now(*args) == 300
    clock.now += 100
    assert grey.check_now(*args) == 200  # too soon
    clock.now += 200
    assert grey.check_now("192.0.2.77", *args[1:]) == 0  # its /24 retried: passes
    assert grey.check_now(*args) == 0
    # Another triplet of the same network waits; a second pass allows the network.
    other = ("192.0.2.10", "b@sender.example", "boss@corp.example")
    assert grey.check_now(*other) == 300
    clock.now += 300
    assert grey.check_now(*other) == 0
    assert grey.check_now("192.0.2.10", "new@sender.example", "alice@corp.example") == 0
    assert grey.check_now("198.51.100.1", "new@sender.example", "alice@corp.example") == 300


def test_a_late_retry_starts_over_and_the_store_outlives_the_object(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "g.sqlite3"
    grey = Greylist(path, delay=60, retry_window=3600, lifetime=86400, auto_allow_after=0,
                    clock=clock)
    args = ("2001:db8:5:6::1", "a@sender.example", "boss@corp.example")
    assert grey.check_now(*args) == 60
    clock.now += 7200  # past the retry window
    assert grey.check_now(*args) == 60
    clock.now += 60
    again = Greylist(path, delay=60, retry_window=3600, lifetime=86400, auto_allow_after=0,
                     clock=clock)
    assert again.check_now("2001:db8:5:6::99", *args[1:]) == 0  # same /64, same triplet
    clock.now += 86400
    assert again.expire() == 1
    assert again.check_now(*args) == 60
    assert client_network("192.0.2.77") == "192.0.2.0/24"


def test_the_config_names_a_bad_site_or_network(tmp_path: Path) -> None:
    from postroom.config import ConfigError, load_config

    for table, fault in (('[dnsbl]\nsites = ["bl.example=127.0.0"]', "dnsbl.sites"),
                         ('[limits]\nexceptions = ["not-a-net"]', "limits.exceptions"),
                         ('[screen]\nhelo_ours = "maybe"', "screen.helo_ours")):
        (tmp_path / "postroom.toml").write_text(table + "\n")
        with pytest.raises(ConfigError, match=fault):
            load_config(tmp_path)
    (tmp_path / "postroom.toml").write_text(
        '[dnsbl]\nsites = ["zen.example=127.0.0.[2..11]*3", "wl.example*-2"]\n'
        '[greylist]\nenabled = true\ndelay = "1m"\n')
    config = load_config(tmp_path)
    assert config.dnsbl.sites[0] == "zen.example=127.0.0.[2..11]*3"
    assert config.greylist.enabled and config.greylist.delay == 60
