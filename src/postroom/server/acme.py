"""Keeps the listeners' certificate from the ACME CA: the HTTP-01 challenge listener, and a
task that obtains the certificate when it is due and retries with backoff when it cannot.

It runs in the primary process only. The blocking ACME client runs in a
thread (asyncio.to_thread), so the event loop goes on serving while the CA
checks the challenge on the listener this loop answers. A new pair is written
key first, then certificate, each file renamed in (store.atomic); this
process's listeners take it at once, the workers' at their next handshake
(server.tls.CertificateHolder). Until a certificate is obtained, and whenever
the CA cannot be reached, the certificate in use stays.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
from collections.abc import Callable
from pathlib import Path

from postroom.acme.issuer import AcmeTrouble, Request, obtain
from postroom.acme.renewal import chain_due, renewal_due
from postroom.config import Config
from postroom.server.httpd import Answer, serve_http
from postroom.server.tls import describe
from postroom.store.atomic import atomic_write

log = logging.getLogger("postroom.acme")

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"  # RFC 8555 8.3
# The longest wait between looks at the certificate: a renewal date that comes from
# a file someone replaced by hand is still met within this time.
LONGEST_SLEEP_SECONDS = 12 * 3600.0


def acme_request(config: Config) -> Request:
    acme = config.tls.acme
    assert acme is not None
    return Request(directory=acme.directory, names=acme.names, contact=acme.contact,
                   ca_bundle=acme.ca_bundle,
                   account_key=config.data_dir / "acme" / "account-key.pem")


class CertificateKeeper:
    """Obtains and renews the certificate at `cert`/`key`; calls `installed()` after each."""

    def __init__(self, config: Config, installed: Callable[[], object],
                 now: Callable[[], datetime.datetime] | None = None) -> None:
        acme = config.tls.acme
        assert acme is not None, "only with [tls] acme"
        self.request = acme_request(config)
        self.cert, self.key = config.tls.cert, config.tls.key
        self.renew_before = acme.renew_before
        self.retry_after = acme.retry_after
        self.installed = installed
        self.now = now or (lambda: datetime.datetime.now(datetime.UTC))
        self.answers: dict[str, str] = {}  # HTTP-01 token -> key authorization
        self.attempts = 0  # orders tried
        self.failures = 0  # in a row, since the last certificate
        self.issued = 0
        self.changed = asyncio.Condition()  # notified after every attempt
        self._server: asyncio.base_events.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self, challenge_socket: socket.socket) -> None:
        self._server = await serve_http(challenge_socket, self.answer)
        host, port = challenge_socket.getsockname()[:2]
        log.info("answering ACME http-01 challenges on %s:%d for %s", host, port,
                 ", ".join(self.request.names))
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._server is not None:
            self._server.close()

    async def answer(self, path: str) -> Answer:
        """The key authorization for a token the CA asks about (RFC 8555 8.3)."""
        token = path.removeprefix(CHALLENGE_PREFIX) if path.startswith(CHALLENGE_PREFIX) else None
        validation = self.answers.get(token) if token else None
        if validation is None:
            return Answer(404, b"not found\n")
        log.info("answered the ACME http-01 challenge for token %s", token)
        return Answer(200, validation.encode("ascii"), "application/octet-stream")

    async def run(self) -> None:
        while True:
            due, why = renewal_due(self.cert, self.request.names, self.renew_before, self.now())
            wait = (due - self.now()).total_seconds()
            if wait > 0:
                log.info("certificate renewal due %s UTC (%s)", f"{due:%Y-%m-%d %H:%M:%S}", why)
                await asyncio.sleep(min(wait, LONGEST_SLEEP_SECONDS))
                continue
            log.info("asking %s for a certificate for %s: %s", self.request.directory,
                     ", ".join(self.request.names), why)
            await self.attempt()

    async def attempt(self) -> bool:
        """One order; on failure, wait out the backoff. True when a certificate came."""
        self.attempts += 1
        try:
            chain, key = await asyncio.to_thread(obtain, self.request, self.answers)
            self._check(chain)
        except AcmeTrouble as exc:
            self.failures += 1
            pause = self.retry_after[min(self.failures, len(self.retry_after)) - 1]
            log.warning("could not get a certificate from %s (attempt %d): %s; keeping the "
                        "certificate in use, trying again in %s", self.request.directory,
                        self.failures, exc, _span(pause))
            await self._notify()
            await asyncio.sleep(pause)
            return False
        self._store(chain, key)
        self.failures = 0
        self.issued += 1
        log.info("new certificate stored in %s (%s)", self.cert, describe(self.cert))
        self.installed()
        await self._notify()
        return True

    def _check(self, chain: bytes) -> None:
        """AcmeTrouble unless `chain` would end the renewal: issued for every name and
        not due again at once (else each pass would order another)."""
        due, why = chain_due(chain, self.request.names, self.renew_before, self.now())
        if due <= self.now():
            raise AcmeTrouble(f"the CA's certificate will not do: {why}")

    def _store(self, chain: bytes, key: bytes) -> None:
        """Key first, then its certificate: a reader that sees the new certificate finds
        its key already there (server.tls tries a pair that does not match again)."""
        for path in (self.key, self.cert):
            Path(path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.key, key, mode=0o600)
        atomic_write(self.cert, chain, mode=0o644)

    async def _notify(self) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        """Until `condition()` holds after an attempt (tests and the health check wait here)."""
        async with self.changed:
            await self.changed.wait_for(condition)


def _span(seconds: float) -> str:
    return f"{seconds / 60:g}m" if seconds >= 60 else f"{seconds:g}s"
