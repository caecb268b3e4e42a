"""The DKIM keys of the local domains: made, listed, retired and loaded from DATA/dkim.

One file per key, DATA/dkim/DOMAIN/SELECTOR.ALGORITHM.pem (mode 0600). A key is
active (mail is signed with it) until retired: retiring renames the file to
`.retired`, so its public record can stay published while signatures made with
it may still be checked (RFC 6376 3.6.1: revoke with an empty p= later), and the
command line can still print it. Rotation without a gap: add a key with a new
selector, publish its record, then retire the old one; while both are active,
mail carries a signature of each (either passing is enough, RFC 6376 4.2).

The server reads the folder through `KeyRing`, which looks again whenever the
folder's mtime changed (every change below goes through `KeyStore`, which
touches it), so a running server picks up a new or retired key without a
restart.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from postroom.canonical import canonical_domain
from postroom.store.atomic import atomic_write

KEY_FOLDER = "dkim"  # under the data folder
ALGORITHMS = ("rsa", "ed25519")  # RFC 6376 3.3, RFC 8463 3
# RFC 8301 3.2: signers MUST use at least 1024 bits and SHOULD use 2048; larger
# keys no longer fit one 255-octet TXT string pair comfortably at some hosts.
RSA_BITS = 2048
RSA_PUBLIC_EXPONENT = 65537
ACTIVE_SUFFIX = ".pem"
RETIRED_SUFFIX = ".pem.retired"
# RFC 6376 3.1: a selector is one or more DNS labels (sub-domain syntax).
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
SIGNING_ALGORITHM = {"rsa": b"rsa-sha256", "ed25519": b"ed25519-sha256"}
RELOAD_CHECK_EVERY = 1.0  # seconds between looks at the key folder's mtime

log = logging.getLogger("postroom.dkim")

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


class KeyProblem(ValueError):
    """A key operation the command line refuses; str() says why."""


@dataclass(frozen=True)
class DKIMKey:
    """One key on disk."""

    domain: str
    selector: str
    algorithm: str  # "rsa" or "ed25519"
    path: Path
    retired: bool
    created: float  # the file's modification time (kept by a rename)

    @property
    def signing_algorithm(self) -> bytes:
        """The a= tag (RFC 6376 3.5, RFC 8463 3)."""
        return SIGNING_ALGORITHM[self.algorithm]

    @property
    def record_name(self) -> str:
        """Where its public key is published (RFC 6376 3.6.2.1)."""
        return f"{self.selector}._domainkey.{self.domain}"

    def private_key(self) -> PrivateKey:
        key = serialization.load_pem_private_key(self.path.read_bytes(), password=None)
        if not isinstance(key, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError(f"{self.path}: not an RSA or Ed25519 key")
        return key

    def public_value(self) -> str:
        """The p= value: base64 of the DER SubjectPublicKeyInfo for RSA (RFC 6376 3.6.1),
        of the raw 32-octet key for Ed25519 (RFC 8463 4)."""
        return public_value(self.private_key())

    def txt(self) -> str:
        """The TXT record's text (RFC 6376 3.6.1)."""
        return txt_record(self.algorithm, self.public_value())


def public_value(key: PrivateKey) -> str:
    public = key.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        raw = public.public_bytes(serialization.Encoding.DER,
                                  serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(raw).decode("ascii")


def txt_record(algorithm: str, p: str) -> str:
    return f"v=DKIM1; k={algorithm}; p={p}"


def check_selector(selector: str) -> str:
    selector = selector.lower()
    if not SELECTOR.match(selector) or len(selector) > 200:
        raise KeyProblem(f"not a usable selector (DNS labels of letters, digits and '-'): "
                        f"{selector!r}")
    return selector


def default_selector(algorithm: str, now: float | None = None) -> str:
    """A selector naming the month and the kind: "202612r" / "202612e"."""
    return time.strftime("%Y%m", time.gmtime(now)) + algorithm[0]


def new_private_key(algorithm: str) -> tuple[PrivateKey, bytes]:
    """A fresh key and its PEM: PKCS#1 for RSA (OpenDKIM and Mail::DKIM read it too),
    PKCS#8 for Ed25519."""
    key: PrivateKey
    if algorithm == "rsa":
        key = rsa.generate_private_key(public_exponent=RSA_PUBLIC_EXPONENT, key_size=RSA_BITS)
        fmt = serialization.PrivateFormat.TraditionalOpenSSL
    elif algorithm == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
        fmt = serialization.PrivateFormat.PKCS8
    else:
        raise KeyProblem(f"unknown algorithm {algorithm!r}: use one of {', '.join(ALGORITHMS)}")
    pem = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return key, pem


def _parse_name(path: Path, domain: str) -> DKIMKey | None:
    name = path.name
    retired = name.endswith(RETIRED_SUFFIX)
    if not retired and not name.endswith(ACTIVE_SUFFIX):
        return None
    stem = name[: -len(RETIRED_SUFFIX if retired else ACTIVE_SUFFIX)]
    selector, _, algorithm = stem.rpartition(".")
    if algorithm not in ALGORITHMS or not selector:
        return None
    try:
        created = path.stat().st_mtime
    except FileNotFoundError:
        return None
    return DKIMKey(domain, selector, algorithm, path, retired, created)


class KeyStore:
    """The key folder as the command line changes it."""

    def __init__(self, data_dir: Path) -> None:
        self.root = Path(data_dir) / KEY_FOLDER

    def all(self, domain: str | None = None) -> list[DKIMKey]:
        """Every key (of `domain`), by domain, then active before retired, then selector."""
        found: list[DKIMKey] = []
        domains = [canonical_domain(domain)] if domain else self._domains()
        for d in domains:
            try:
                entries = sorted((self.root / d).iterdir())
            except (FileNotFoundError, NotADirectoryError):
                continue
            found += [k for k in (_parse_name(p, d) for p in entries) if k is not None]
        return sorted(found, key=lambda k: (k.domain, k.retired, k.selector, k.algorithm))

    def _domains(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir()
                          if p.is_dir() and not p.name.startswith("."))
        except FileNotFoundError:
            return []

    def active(self, domain: str) -> list[DKIMKey]:
        return [k for k in self.all(domain) if not k.retired]

    def find(self, domain: str, selector: str) -> list[DKIMKey]:
        selector = selector.lower()
        return [k for k in self.all(domain) if k.selector == selector]

    def add(self, domain: str, selector: str | None = None, algorithm: str = "rsa",
            *, now: float | None = None) -> DKIMKey:
        """Make and store a new key; refused when the selector is taken in that domain
        (by any key, retired ones too: a selector's record means one key)."""
        domain = canonical_domain(domain)
        if algorithm not in ALGORITHMS:
            raise KeyProblem(f"unknown algorithm {algorithm!r}: use one of "
                            f"{', '.join(ALGORITHMS)}")
        selector = check_selector(selector or default_selector(algorithm, now))
        if self.find(domain, selector):
            raise KeyProblem(f"{domain} already has a key with selector {selector!r}; "
                            "choose another with --selector")
        _key, pem = new_private_key(algorithm)
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # keys are secrets
        folder = self.root / domain
        folder.mkdir(exist_ok=True, mode=0o700)
        path = folder / f"{selector}.{algorithm}{ACTIVE_SUFFIX}"
        atomic_write(path, pem, mode=0o600)
        self._changed()
        found = _parse_name(path, domain)
        assert found is not None
        return found

    def retire(self, domain: str, selector: str) -> list[DKIMKey]:
        """Stop signing with the active key(s) of `selector`; the files stay."""
        keys = [k for k in self.find(domain, selector) if not k.retired]
        if not keys:
            raise KeyProblem(f"no active key with selector {selector!r} in "
                            f"{canonical_domain(domain)} (see `postroom dkim list`)")
        done = []
        for key in keys:
            target = key.path.with_name(
                key.path.name[: -len(ACTIVE_SUFFIX)] + RETIRED_SUFFIX)
            os.rename(key.path, target)
            done.append(DKIMKey(key.domain, key.selector, key.algorithm, target, True,
                                key.created))
        self._changed()
        return done

    def delete(self, domain: str, selector: str) -> list[DKIMKey]:
        """Remove retired key(s) of `selector` for good (retire first)."""
        keys = self.find(domain, selector)
        if not keys:
            raise KeyProblem(f"no key with selector {selector!r} in {canonical_domain(domain)}")
        if any(not k.retired for k in keys):
            raise KeyProblem(f"the key {selector!r} still signs: retire it first, and delete "
                            "it once mail signed with it is no longer checked (days later)")
        for key in keys:
            key.path.unlink()
        self._changed()
        return keys

    def _changed(self) -> None:
        """Tell running servers (KeyRing) to look again: the top folder's mtime."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.utime(self.root)


@dataclass(frozen=True)
class SigningKey:
    """An active key, loaded: what the signer uses."""

    key: DKIMKey
    private: PrivateKey


@dataclass
class KeyRing:
    """The active keys by domain, for the server: re-read when the key folder's mtime
    changes (checked at most every RELOAD_CHECK_EVERY seconds)."""

    data_dir: Path
    clock: Callable[[], float] = time.monotonic
    _by_domain: dict[str, list[SigningKey]] = field(default_factory=dict)
    _stamp: int | None = None
    _checked: float = float("-inf")
    errors: list[str] = field(default_factory=list)  # keys that could not be read

    @property
    def root(self) -> Path:
        return Path(self.data_dir) / KEY_FOLDER

    def _refresh(self) -> None:
        now = self.clock()
        if now - self._checked < RELOAD_CHECK_EVERY:
            return
        self._checked = now
        try:
            stamp = self.root.stat().st_mtime_ns
        except FileNotFoundError:
            stamp = 0
        except OSError as e:
            stamp = -1
            if self._stamp != stamp:
                log.warning("DKIM keys not readable, mail goes unsigned: %s", e)
        if stamp == self._stamp:
            return
        self._stamp = stamp
        by_domain: dict[str, list[SigningKey]] = {}
        errors = []
        try:
            keys = KeyStore(self.data_dir).all() if stamp != -1 else []
        except OSError as e:  # a folder this process may not read: sign nothing
            log.warning("DKIM keys not readable, mail goes unsigned: %s", e)
            keys = []
        for key in keys:
            if key.retired:
                continue
            try:
                private = key.private_key()
            except (OSError, ValueError) as e:
                errors.append(f"{key.path}: {e}")
                log.warning("DKIM key %s not used: %s", key.path, e)
                continue
            by_domain.setdefault(key.domain, []).append(SigningKey(key, private))
        self._by_domain, self.errors = by_domain, errors

    def keys_for(self, domain: str) -> list[SigningKey]:
        """The keys that sign mail from `domain`: its own, else those of the nearest
        parent domain with keys (relaxed DMARC alignment, RFC 7489 3.1.1)."""
        self._refresh()
        domain = domain.lower().rstrip(".")
        while domain:
            found = self._by_domain.get(domain)
            if found:
                return found
            _, _, domain = domain.partition(".")
            if "." not in domain:
                return []  # never sign with a key of a public suffix alone
        return []

    def domains(self) -> list[str]:
        self._refresh()
        return sorted(self._by_domain)
