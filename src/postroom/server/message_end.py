"""The end of an SMTP message: the checks' verdict, the milters, then queue, forward and
file it, and only then the 250 (RFC 5321 6.1: once we say 250 we are responsible).

server.smtp.SMTPSession mixes in `MessageEnd`. The order is fixed:
  1. the content's own refusals (a mail loop; a From that is not the submitting
     user's, RFC 6409 8.1);
  2. the mail checks' verdict (postroom.mailauth), and its Authentication-Results
     field put on top of the message;
  3. the content's last line, through the same filters as the rest (Return-Path,
     forged Authentication-Results, the DKIM signer);
  4. the milters (server.milter_steps), which may rewrite the message or choose
     its folder;
  5. the signed copy queued for relaying, then the forwarded copies, then the
     local copies filed, into the folder the checks or the milters chose.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from postroom.protocol import smtp_server as core
from postroom.protocol.replies import Reply
from postroom.queue.envelope import Envelope
from postroom.server import metrics
from postroom.server.milter_steps import LOCAL_ERROR, MilterSteps
from postroom.store.api import Incoming

if TYPE_CHECKING:
    from postroom.server.smtp import SMTPService, Transaction

log = logging.getLogger("postroom.smtpd")


class MessageEnd(MilterSteps):
    """The end-of-DATA steps, mixed into server.smtp.SMTPSession."""

    service: SMTPService
    conn: core.SMTPServer
    txn: Transaction | None
    in_data: bool

    if TYPE_CHECKING:  # SMTPSession's
        def _reply(self, reply: Reply) -> None: ...
        def _finish_transaction(self) -> None: ...

    async def _message_end(self) -> None:
        """The end of the content: refuse the message, or store it and answer 250."""
        txn = self.txn
        self.in_data = False
        ended = time.monotonic()  # end of DATA: the latency to the 250 counts from here
        assert txn is not None, "the core emits MessageEnd only inside a transaction"
        if txn.writer is None:
            self.conn.send(LOCAL_ERROR)
            self._finish_transaction()
            return
        refusal = await self._content_refusal(txn)
        if refusal is None and txn.auth is not None:
            refusal = await self._mail_checks(txn)
            if txn.writer is None:  # the server shut down while the checks ran
                self._reply(LOCAL_ERROR)
                self._finish_transaction()
                return
        if refusal is not None:
            log.info("%s: %s: reject: %s", self.service.name, txn.queue_id, refusal)
            txn.writer.abort()
            self.conn.send(refusal)
            self._finish_transaction()
            return
        # From here the commit owns the message: a shutdown must not abort it.
        message, txn.writer = txn.writer, None
        try:
            self._write_tail(txn, message)
        except OSError as exc:
            self._local_error(txn, message, "write to spool", exc)
            self._reply(LOCAL_ERROR)
            self._finish_transaction()
            return
        folder = txn.auth_verdict.action.folder if txn.auth_verdict else None
        if self.milters is not None:
            filtered = await self._milter_end(txn, message)
            if isinstance(filtered, Reply):
                self._reply(filtered)
                self._finish_transaction()
                return
            message, milter_folder = filtered
            folder = folder or milter_folder
        if await self._store(txn, message, folder):
            self._reply(Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}"))
            metrics.recorder.received(self.service.name, time.monotonic() - ended,
                                      len(txn.mailboxes()))
        else:
            self._reply(LOCAL_ERROR)
        self._finish_transaction()

    @staticmethod
    def _write_tail(txn: Transaction, message: Incoming) -> None:
        """The content's last line, held back until the end: through the same
        filters as the rest (Return-Path, our Authentication-Results, the signer)."""
        tail = txn.return_paths.end()
        if txn.forged_results is not None:
            tail = txn.forged_results.feed(tail) + txn.forged_results.end()
        message.write(tail)
        if txn.signer is not None:
            txn.signer.feed(tail)

    async def _store(self, txn: Transaction, message: Incoming, folder: str | None = None,
                     ) -> bool:
        """Queue what is relayed, file what is local, queue the success reports asked
        for; False when nothing of the message is kept (the client retries)."""
        svc = self.service
        envelope = self._envelope(txn, message.size) if txn.remote else None
        try:
            # Queue first: if filing locally then fails, the client retries and the
            # relayed recipients may get the message twice, which is the safe way
            # round (RFC 5321 6.1: duplicates over losses).
            if envelope is not None:
                chunks: Iterable[bytes] = message.chunks()
                if txn.signer is not None:  # the copy that leaves carries the signatures
                    signatures = txn.signer.finish(f"{svc.name}: {txn.queue_id}: ")
                    if signatures:
                        chunks = itertools.chain((signatures,), chunks)
                        envelope.size += len(signatures)
                await svc.outbound.add(envelope, chunks)
            forwarded = await self._forward(txn, message) if txn.forward else []
            names = await message.deliver(txn.mailboxes(), folder)
        except (OSError, ValueError) as exc:
            return self._local_error(txn, message, "storing the message", exc)
        self._log_stored(txn, message.size, names)
        if envelope is not None:
            svc.outbound.queued(envelope)
        for copy in forwarded:
            svc.outbound.queued(copy)
        if txn.notify and names:
            await svc.outbound.delivered(self._envelope(txn, message.size), txn.notify,
                                        message.original())
        message.abort()
        return True

    async def _forward(self, txn: Transaction, message: Incoming) -> list[Envelope]:
        """Queue the copies for the other hosts that aliases name, one per forwarding
        domain; the envelopes queued. OSError when one cannot be queued: the whole
        message is then refused with 451 (RFC 5321 3.9.1: the forwarder answers for
        the delivery it accepted; duplicates over losses)."""
        svc = self.service
        if txn.dmarc_failed:
            log.info("%s: %s: not forwarded: failed DMARC here", svc.name, txn.queue_id)
            return []
        assert svc.forwarding is not None, "the policy forwards only when forwarding is on"
        original = self._envelope(txn, message.size)
        where = f"{svc.name}: {txn.queue_id}: "
        queued = []
        for domain, targets in txn.forward.items():
            envelope, chunks = await svc.forwarding.prepare(original, domain, targets, message,
                                                            where)
            await svc.outbound.add(envelope, chunks)
            log.info("%s: %s: forwarded as %s: from=<%s>, to=%s", svc.name, txn.queue_id,
                     envelope.queue_id, envelope.sender, ",".join(f"<{t}>" for t in targets))
            queued.append(envelope)
        return queued

    async def _content_refusal(self, txn: Transaction) -> Reply | None:
        """Why the message just received is refused, or None: a mail loop, or a From
        that is not the submitting user's (RFC 6409 8.1)."""
        svc = self.service
        if txn.hops is not None and txn.hops.count > svc.max_received:
            return Reply(554, "5.4.6", f"Too many hops ({txn.hops.count} Received headers): "
                                       "mail loop?")
        if txn.from_header is not None and svc.submission is not None and self.user is not None:
            return await svc.submission.check_from(self.user, txn.from_header,
                                                   txn.mail.smtputf8)
        return None

    async def _mail_checks(self, txn: Transaction) -> Reply | None:
        """The checks' verdict (postroom.mailauth): a refusal (DMARC reject, or 451 for
        DNS failures), or None after putting the Authentication-Results field on top."""
        checks, txn.auth = txn.auth, None  # from here the end of DATA owns them
        assert checks is not None
        domains = [rcpt.rpartition("@")[2].lower() for rcpt, _boxes in txn.recipients]
        verdict = txn.auth_verdict = await checks.finish(domains, txn.queue_id)
        txn.dmarc_failed = verdict.dmarc_failed
        if txn.writer is None:
            return None
        log.info("%s: %s: auth: %s", self.service.name, txn.queue_id, verdict.summary)
        if verdict.action.refusal is not None:
            return verdict.action.refusal
        if not txn.writer.insert_head(verdict.header):  # pragma: no cover - store refused
            log.warning("%s: %s: Authentication-Results could not be added", self.service.name,
                        txn.queue_id)
        return None

    def _log_stored(self, txn: Transaction, size: int, names: list[str]) -> None:
        """The Postfix-style summary: one line for the message, one per recipient."""
        svc = self.service
        delay = time.time() - txn.started
        log.info("%s: %s: from=<%s>, size=%d, nrcpt=%d%s", svc.name, txn.queue_id, txn.mail.address,
                 size, len(txn.recipients) + len(txn.remote),
                 f", sasl_username={self.user}" if self.user else "")
        by_box = dict(zip(txn.mailboxes(), names, strict=True))
        for rcpt, boxes in txn.recipients:
            for box in boxes:
                orig = f", orig_to=<{rcpt}>" if box != rcpt else ""
                log.info("%s: %s: to=<%s>%s, relay=local, delay=%.2f, dsn=2.0.0, "
                         "status=sent (delivered to maildir %s)", svc.name, txn.queue_id, box,
                         orig, delay, by_box[box])
        for r in txn.remote:
            log.info("%s: %s: to=<%s>, status=queued (for relay)", svc.name, txn.queue_id,
                     r.address)

    def _local_error(self, txn: Transaction, message: Incoming, what: str, exc: Exception,
                     ) -> bool:
        """The message could not be stored: nothing of it is kept."""
        log.error("%s: %s: %s failed: %s", self.service.name, txn.queue_id, what, exc)
        message.abort()
        return False

    def _envelope(self, txn: Transaction, size: int) -> Envelope:
        return Envelope(
            queue_id=txn.queue_id,
            sender=txn.mail.address,
            recipients=list(txn.remote),
            created=time.time(),
            size=size,
            ret=txn.mail.ret,
            envid=txn.mail.envid,
            smtputf8=txn.mail.smtputf8,
            body=txn.mail.body,
            auth_user=self.user,
            client=f"[{self.client_ip}]",
        )
