"""ARC sealing (postroom.mailauth.arcseal): what is sealed, a second hop, and what is not."""

from __future__ import annotations

from pathlib import Path

import dkim

from postroom.mailauth.arcseal import seal
from postroom.mailauth.keys import DKIMKey, KeyRing, KeyStore

BODY = (b"From: alice@sender.example\r\nTo: list@corp.example\r\nSubject: hi\r\n"
        b"Date: Thu, 3 Dec 2026 02:00:00 +0000\r\n\r\nbody\r\n")
OUR_RESULTS = (b"Authentication-Results: mx.corp.example; spf=pass "
               b"smtp.mailfrom=alice@sender.example; dkim=none\r\n")


def verify(message: bytes, *keys: DKIMKey) -> tuple[bytes, str]:
    txt = {f"{k.record_name}.".encode(): k.txt().encode() for k in keys}
    result, _sets, reason = dkim.arc_verify(message, dnsfunc=lambda n, timeout=5: txt.get(n))
    return result, reason


def test_our_results_are_sealed_and_verify(tmp_path: Path) -> None:
    key = KeyStore(tmp_path).add("corp.example", "a1", "rsa")
    message = OUR_RESULTS + BODY
    arc = seal(message, KeyRing(tmp_path).keys_for("corp.example"), "mx.corp.example")
    assert arc.startswith(b"ARC-Seal: i=1; cv=none; a=rsa-sha256; d=corp.example; s=a1;")
    assert b"ARC-Authentication-Results: i=1; mx.corp.example;" in arc
    assert verify(arc + message, key)[0] == b"pass"
    assert verify(arc + message.replace(b"body", b"changed"), key)[0] == b"fail"


def test_a_second_forwarder_extends_the_chain(tmp_path: Path) -> None:
    first = KeyStore(tmp_path / "a").add("corp.example", "a1", "rsa")
    second = KeyStore(tmp_path / "b").add("relay.example", "b1", "rsa")
    message = OUR_RESULTS + BODY
    message = seal(message, KeyRing(tmp_path / "a").keys_for("corp.example"),
                   "mx.corp.example") + message
    # The next hop checked the chain and says so in its own results (arc=pass).
    theirs = b"Authentication-Results: mx.relay.example; arc=pass; spf=pass\r\n"
    message = theirs + message
    arc = seal(message, KeyRing(tmp_path / "b").keys_for("relay.example"), "mx.relay.example")
    assert arc.startswith(b"ARC-Seal: i=2; cv=pass;")
    assert verify(arc + message, first, second)[0] == b"pass"


def test_nothing_to_seal_leaves_the_message_as_it_is(tmp_path: Path) -> None:
    KeyStore(tmp_path).add("corp.example", "a1", "rsa")
    KeyStore(tmp_path).add("ed.example", "e1", "ed25519")
    ring = KeyRing(tmp_path)
    # No results of ours (another host's do not count).
    other = b"Authentication-Results: mx.elsewhere.example; spf=pass\r\n" + BODY
    assert seal(other, ring.keys_for("corp.example"), "mx.corp.example") == b""
    # RFC 8617 seals with RSA only.
    assert seal(OUR_RESULTS + BODY, ring.keys_for("ed.example"), "mx.corp.example") == b""
    # A malformed header section.
    assert seal(OUR_RESULTS + b"not a field\r\n\r\nx\r\n", ring.keys_for("corp.example"),
                "mx.corp.example") == b""
