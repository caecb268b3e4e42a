"""Login passwords: the rules a new one must meet, and its argon2id hash (RFC 9106).

Every backend keeps the same encoded hashes ($argon2id$v=19$...), so users
move between backends with their passwords.
"""

from __future__ import annotations

import contextlib
import secrets
import unicodedata

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from postroom.store.api import DirectoryError

MAX_PASSWORD = 1024  # octets; argon2 takes more, but nothing sane needs more


def normalize_password(password: str) -> str:
    """RFC 8265 4.2 OpaqueString: non-ASCII spaces become U+0020, then NFC.

    So the same password typed on two systems that compose characters
    differently still matches.
    """
    mapped = "".join(" " if unicodedata.category(ch) == "Zs" else ch for ch in password)
    return unicodedata.normalize("NFC", mapped)


def check_password(password: str) -> str:
    """The password as it is hashed, or DirectoryError saying why it cannot be one."""
    if not password:
        raise DirectoryError("the password is empty")
    if any(ch in "\0\r\n" for ch in password):
        # SASL PLAIN (RFC 4616) separates fields with NUL; POP3 PASS ends at CRLF.
        raise DirectoryError("the password must not contain NUL, CR or LF")
    password = normalize_password(password)
    if len(password.encode("utf-8")) > MAX_PASSWORD:
        raise DirectoryError(f"the password is longer than {MAX_PASSWORD} octets")
    return password


class Hashes:
    """argon2id hashes of passwords. `hasher` lets tests use cheaper parameters."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.hasher = hasher or PasswordHasher()  # argon2id, RFC 9106 parameters
        self._dummy: str | None = None

    def hash(self, password: str) -> str:
        """The hash to store for a new password (DirectoryError if it breaks a rule)."""
        return self.hasher.hash(check_password(password))

    def verify(self, stored: str | None, password: str) -> tuple[bool, str | None]:
        """Whether `password` matches the `stored` hash (None: no such user), and a new
        hash to store in its place when it used older parameters.

        Costs one argon2 hash also without a stored one: a dummy hash is checked
        instead, so that the answer takes about as long (no user enumeration).
        """
        password = normalize_password(password)
        if stored is None:
            if self._dummy is None:
                self._dummy = self.hasher.hash(secrets.token_urlsafe(16))
            with contextlib.suppress(VerificationError, InvalidHashError):
                self.hasher.verify(self._dummy, password)
            return False, None
        try:
            self.hasher.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False, None
        return True, self.hasher.hash(password) if self.hasher.check_needs_rehash(stored) else None
