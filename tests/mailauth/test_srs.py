"""SRS (postroom.mailauth.srs): the rewritten sender, and a bounce's way back."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from postroom.mailauth.srs import MAX_AGE_DAYS, SRS, SRSError, load_secret

DAY = 24 * 3600.0


def srs(now: float = 1_800_000_000.0) -> SRS:
    return SRS(b"secret", clock=lambda: now)


def test_srs0_round_trip() -> None:
    rewritten = srs().forward("alice@sender.example", "corp.example")
    local, _, domain = rewritten.rpartition("@")
    assert domain == "corp.example"
    tag, hash_, stamp, orig_domain, orig_local = local.split("=")
    assert (tag, orig_domain, orig_local) == ("SRS0", "sender.example", "alice")
    assert len(hash_) == 4 and len(stamp) == 2
    assert srs().reverse(rewritten) == "alice@sender.example"
    # A host may fold the case of the local part.
    assert srs().reverse(rewritten.upper()).lower() == "alice@sender.example"


def test_srs1_keeps_the_first_forwarder() -> None:
    first = SRS(b"theirs", clock=lambda: 1_800_000_000.0).forward("alice@sender.example",
                                                                  "hop1.example")
    second = srs().forward(first, "corp.example")
    assert second.startswith("SRS1=") and "=hop1.example==" in second
    assert srs().reverse(second) == first
    # Forwarded once more: still back to the first hop.
    third = srs().forward(second, "other.example")
    assert third.startswith("SRS1=") and "=hop1.example==" in third
    assert srs().reverse(third) == first


@pytest.mark.parametrize("sender", ["", "bob@corp.example"])
def test_null_and_own_senders_stay(sender: str) -> None:
    assert srs().forward(sender, "corp.example") == sender


def test_forged_or_old_addresses_are_refused() -> None:
    good = srs().forward("alice@sender.example", "corp.example")
    with pytest.raises(SRSError, match="hash"):
        SRS(b"other").reverse(good)
    with pytest.raises(SRSError, match="hash"):
        srs().reverse(good.replace("alice", "mallory"))
    with pytest.raises(SRSError, match="days old"):
        srs(1_800_000_000.0 + (MAX_AGE_DAYS + 1) * DAY).reverse(good)
    assert srs(1_800_000_000.0 + MAX_AGE_DAYS * DAY).reverse(good) == "alice@sender.example"
    for bad in ("SRS0=x@corp.example", "SRS1=abcd=@corp.example", "bob@corp.example"):
        with pytest.raises(SRSError):
            srs().reverse(bad)


def test_the_secret_is_made_once_and_kept_private(tmp_path: Path) -> None:
    first = load_secret(tmp_path)
    assert len(first) >= 40
    assert load_secret(tmp_path) == first
    assert stat.S_IMODE((tmp_path / "srs.secret").stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["srs.secret"]
