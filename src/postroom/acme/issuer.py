"""Obtain a certificate from an ACME CA (RFC 8555 7) with the HTTP-01 challenge; blocking.

The `acme` package speaks the protocol: the account (7.3), the order (7.4),
the authorizations and their challenges (7.5, 8.3), finalization with a CSR
and the download of the chain. This module supplies what is postroom's: the
account key kept in the data folder, a new certificate key per order, and
the key authorizations handed to the challenge listener through `answers`.
It blocks (the `acme` package uses `requests`): run it in a thread.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import MutableMapping
from dataclasses import dataclass
from pathlib import Path

import josepy
import requests
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from josepy.jwa import ES256
from josepy.jwk import JWKEC

from postroom import __version__
from postroom.store.atomic import atomic_write

log = logging.getLogger("postroom.acme")

# How long the CA gets to check the challenges and issue, per order: the `acme`
# package's own default for poll_and_finalize.
ORDER_SECONDS = 90.0
# Each HTTPS request to the CA (the `acme` package's DEFAULT_NETWORK_TIMEOUT is 45).
REQUEST_SECONDS = 45


class AcmeTrouble(Exception):
    """The CA could not be reached, refused, or did not validate; str() says which."""


@dataclass(frozen=True)
class Request:
    """What to ask which CA for."""

    directory: str  # the directory URL (RFC 8555 7.1.1)
    names: tuple[str, ...]
    contact: tuple[str, ...] = ()  # mailto: URLs
    ca_bundle: Path | None = None  # trust for the CA's own HTTPS; None: the system's
    account_key: Path = Path("acme/account-key.pem")


def _private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The EC P-256 key at `path`, made (mode 0600) when missing."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(path, _pem(key), mode=0o600)
        return key
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise AcmeTrouble(f"{path}: not an EC account key")
    return key


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def obtain(request: Request, answers: MutableMapping[str, str]) -> tuple[bytes, bytes]:
    """A new certificate for `request.names`: (full chain PEM, its private key PEM).

    While it runs, `answers` maps each HTTP-01 token to its key authorization
    (RFC 8555 8.3), for the challenge listener to serve. AcmeTrouble when the
    CA cannot be reached, refuses, or finds a challenge unanswered.
    """
    try:
        return _obtain(request, answers)
    except (requests.RequestException, errors.Error, messages.Error, josepy.errors.Error,
            ValueError) as exc:
        raise AcmeTrouble(f"{type(exc).__name__}: {exc}") from exc


def _obtain(request: Request, answers: MutableMapping[str, str]) -> tuple[bytes, bytes]:
    account_key = JWKEC(key=_private_key(request.account_key))
    net = client.ClientNetwork(account_key, alg=ES256, user_agent=f"postroom/{__version__}",
                               timeout=REQUEST_SECONDS)
    if request.ca_bundle is not None:
        # Handed to requests as its `verify`, which takes a CA bundle's path too.
        net.verify_ssl = str(request.ca_bundle)  # type: ignore[assignment]
    acme = client.ClientV2(client.ClientV2.get_directory(request.directory, net), net)
    registration = messages.NewRegistration.from_data(contact=request.contact,
                                                      terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as known:  # this key has an account already (RFC 8555 7.3.1)
        net.account = messages.RegistrationResource(uri=known.location,
                                                    body=messages.Registration())
    key = ec.generate_private_key(ec.SECP256R1())
    csr = crypto_util.make_csr(_pem(key), list(request.names))
    order = acme.new_order(csr)
    tokens = []
    try:
        for authorization in order.authorizations:
            if authorization.body.status == messages.STATUS_VALID:
                continue  # validated for an earlier order, and the CA reuses it
            challenge = next((c for c in authorization.body.challenges
                              if isinstance(c.chall, challenges.HTTP01)), None)
            if challenge is None:
                raise AcmeTrouble(f"the CA offers no http-01 challenge for "
                                  f"{authorization.body.identifier.value}")
            response, validation = challenge.response_and_validation(account_key)
            token = challenge.chall.encode("token")
            answers[token] = validation
            tokens.append(token)
            acme.answer_challenge(challenge, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_SECONDS)
        done = acme.poll_and_finalize(order, deadline)
    finally:
        for token in tokens:
            answers.pop(token, None)
    return done.fullchain_pem.encode("ascii"), _pem(key)
