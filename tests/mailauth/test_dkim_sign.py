"""DKIM signing (postroom.mailauth.sign): the streamed body hash, the signature fields, and
what is left unsigned; checked with dkimpy."""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path

import pytest
from dkim.canonicalization import Relaxed
from dkimcheck import dkimpy_verify

from postroom.mailauth.keys import KeyRing, KeyStore
from postroom.mailauth.sign import (
    MAX_HEADER_SECTION,
    RelaxedBodyHash,
    Signer,
    signed_stream,
)

MESSAGE = (
    b"From: Boss <boss@corp.example>\r\nTo: a@b.example\r\nCc: c@d.example\r\n"
    b"Subject:  quarterly\r\n   numbers\r\nDate: Thu, 3 Dec 2026 02:00:00 +0000\r\n"
    b"Message-ID: <1@corp.example>\r\nReceived: from x by y\r\n\r\n"
    b"Numbers  are up. \r\n\r\n.dot line\r\n\r\n\r\n"
)


@pytest.fixture(name="store")
def store_fixture(tmp_path: Path) -> KeyStore:
    return KeyStore(tmp_path)


def test_streamed_body_hash_equals_dkimpy_whole_body_in_any_pieces() -> None:
    rnd = random.Random(7)
    atoms = [b"a", b" ", b"\t", b"\r\n", b"b  c", b"\r", b"\n", b" \r\n", b"\r\n\r\n"]
    for _ in range(500):
        # SMTP content always ends in CRLF (RFC 5321 4.1.1.4).
        body = b"".join(rnd.choice(atoms) for _ in range(rnd.randint(0, 40))) + b"\r\n"
        digest = RelaxedBodyHash()
        i = 0
        while i < len(body):
            n = rnd.randint(1, 6)
            digest.update(body[i : i + n])
            i += n
        assert digest.digest() == hashlib.sha256(Relaxed.canonicalize_body(body)).digest(), body


def test_empty_body_hashes_as_empty() -> None:
    for body in (b"", b"\r\n", b"\r\n\r\n \r\n"):
        digest = RelaxedBodyHash()
        digest.update(body)
        assert digest.digest() == hashlib.sha256(b"").digest()


def test_signature_verifies_and_covers_the_headers_that_matter(store: KeyStore,
                                                               tmp_path: Path) -> None:
    key = store.add("corp.example", "s1", "rsa")
    signed = Signer(KeyRing(tmp_path)).sign(MESSAGE)
    assert signed.endswith(MESSAGE)
    header = signed[: len(signed) - len(MESSAGE)].decode()
    assert header.startswith("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; "
                             "d=corp.example; s=s1;")
    h = re.search(r"h=([^;]*);", header)
    assert h is not None
    names = "".join(h.group(1).split()).split(":")
    assert names.count("from") == 2  # oversigned (RFC 6376 8.15)
    assert {"to", "cc", "subject", "date", "message-id"} <= set(names)
    assert "received" not in names
    assert dkimpy_verify(signed, key)


@pytest.mark.parametrize("change", [
    (b"Numbers  are up.", b"Numbers are down."),  # the body
    (b"Subject:  quarterly", b"Subject: yearly"),  # a signed field
    (b"\r\nTo: a@b.example", b"\r\nFrom: ceo@corp.example\r\nTo: a@b.example"),  # a 2nd From
])
def test_a_change_breaks_the_signature(store: KeyStore, tmp_path: Path,
                                       change: tuple[bytes, bytes]) -> None:
    key = store.add("corp.example", "s1", "rsa")
    signed = Signer(KeyRing(tmp_path)).sign(MESSAGE)
    assert not dkimpy_verify(signed.replace(*change), key)


def test_refolding_and_added_unsigned_fields_keep_it_valid(store: KeyStore,
                                                           tmp_path: Path) -> None:
    key = store.add("corp.example", "s1", "rsa")
    signed = Signer(KeyRing(tmp_path)).sign(MESSAGE)
    changed = b"Received: from relay\r\n" + signed.replace(b"quarterly\r\n   numbers",
                                                          b"quarterly numbers")
    assert dkimpy_verify(changed, key)


def test_dual_signing_with_rsa_and_ed25519(store: KeyStore, tmp_path: Path) -> None:
    rsa = store.add("corp.example", "r1", "rsa")
    store.add("corp.example", "e1", "ed25519")
    signed = Signer(KeyRing(tmp_path)).sign(MESSAGE)
    fields = signed.split(b"\r\nFrom:")[0]
    assert fields.count(b"DKIM-Signature:") == 2
    assert b"a=ed25519-sha256" in fields and b"a=rsa-sha256" in fields
    index = 0 if fields.index(b"a=rsa-sha256") < fields.index(b"a=ed25519-sha256") else 1
    assert dkimpy_verify(signed, rsa, index=index)


def test_subdomain_mail_is_signed_by_the_parent_domain_key(store: KeyStore,
                                                           tmp_path: Path) -> None:
    key = store.add("corp.example", "s1", "rsa")
    message = MESSAGE.replace(b"boss@corp.example", b"boss@sales.corp.example")
    signed = Signer(KeyRing(tmp_path)).sign(message)
    assert b"d=corp.example" in signed and dkimpy_verify(signed, key)


@pytest.mark.parametrize("message", [
    MESSAGE.replace(b"boss@corp.example", b"boss@other.example"),  # no key for it
    MESSAGE.replace(b"From: Boss <boss@corp.example>\r\n", b""),  # no From
    MESSAGE.replace(b"<boss@corp.example>", b"<boss@corp.example>, x@corp.example"),
    b"From: boss@corp.example\r\nnot a header line\r\n\r\nbody\r\n",  # malformed
    b"From: boss@corp.example\r\nX-Big: " + b"x" * MAX_HEADER_SECTION + b"\r\n\r\nbody\r\n",
], ids=["no key", "no From", "two authors", "malformed", "huge header"])
def test_what_is_not_signed_goes_unchanged(store: KeyStore, tmp_path: Path,
                                           message: bytes) -> None:
    store.add("corp.example", "s1", "rsa")
    assert Signer(KeyRing(tmp_path)).sign(message) == message


def test_signed_stream_spools_a_large_message_and_signs_it(store: KeyStore,
                                                           tmp_path: Path) -> None:
    key = store.add("corp.example", "s1", "rsa")
    body = b"".join(b"line %d  of the report \r\n" % i for i in range(100_000))
    pieces = [MESSAGE.split(b"\r\n\r\n")[0] + b"\r\n\r\n"]
    pieces += [body[i : i + 65536] for i in range(0, len(body), 65536)]
    out = b"".join(signed_stream(pieces, Signer(KeyRing(tmp_path)).start(), spill_at=4096))
    assert out.endswith(b"".join(pieces))
    assert dkimpy_verify(out, key)


def test_a_key_added_or_retired_is_seen_without_restart(store: KeyStore, tmp_path: Path) -> None:
    now = [0.0]
    ring = KeyRing(tmp_path, clock=lambda: now[0])
    assert ring.keys_for("corp.example") == []
    store.add("corp.example", "s1", "rsa")
    now[0] += 2
    assert [k.key.selector for k in ring.keys_for("corp.example")] == ["s1"]
    store.add("corp.example", "s2", "ed25519")
    store.retire("corp.example", "s1")
    now[0] += 2
    assert [k.key.selector for k in ring.keys_for("corp.example")] == ["s2"]


def test_unreadable_keys_sign_nothing_and_raise_nothing(store: KeyStore, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    store.add("corp.example", "s1", "rsa")

    def refuse(self: KeyStore, domain: str | None = None) -> list[object]:
        raise PermissionError(13, "Permission denied", str(self.root))

    monkeypatch.setattr(KeyStore, "all", refuse)
    assert Signer(KeyRing(tmp_path)).sign(MESSAGE) == MESSAGE


def test_an_international_from_domain_finds_its_key(store: KeyStore, tmp_path: Path) -> None:
    key = store.add("bücher.example", "s1", "rsa")
    assert key.domain == "xn--bcher-kva.example"
    message = MESSAGE.replace(b"boss@corp.example", "boss@Bücher.example".encode())
    signed = Signer(KeyRing(tmp_path)).sign(message)
    assert b"d=xn--bcher-kva.example" in signed and dkimpy_verify(signed, key)


def test_a_from_domain_without_a_key_is_not_hashed_nor_signed_later(store: KeyStore,
                                                                    tmp_path: Path) -> None:
    """The body of mail no key signs is not hashed; a key that appears while the body
    streams does not get a signature over a body it never saw."""
    now = [0.0]
    ring = KeyRing(tmp_path, clock=lambda: now[0])
    signer = Signer(ring).start()
    head, body = MESSAGE.split(b"\r\n\r\n", 1)
    signer.feed(head + b"\r\n\r\n")
    store.add("corp.example", "s1", "rsa")
    now[0] += 3600.0  # the ring looks at the key folder again: the key is there now
    assert ring.keys_for("corp.example")
    signer.feed(body)
    assert signer.finish() == b""
