"""The SMTP session's side of the milters (postroom.milter): the steps server.smtp calls.

server.smtp.SMTPSession mixes in `MilterSteps` and calls the chain at HELO, MAIL,
RCPT and the end of the message; what the filters decide at the end is applied
here: the message they rewrote, the sender and recipients they changed, the
folder (Junk) a quarantined message goes to.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import TYPE_CHECKING

from postroom.mailauth.sign import StreamSigner
from postroom.milter.chain import MessageOutcome, MilterChain, SessionInfo
from postroom.protocol import smtp_server as core
from postroom.protocol.replies import Reply
from postroom.queue.envelope import Recipient
from postroom.server.stream import Stream
from postroom.store.api import Incoming
from postroom.store.returnpath import return_path

if TYPE_CHECKING:
    from postroom.server.smtp import SMTPService, Transaction

log = logging.getLogger("postroom.smtpd")

LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try later")  # RFC 3463 X.3.0


def mail_parameters(event: core.MailFrom) -> list[str]:
    """MAIL FROM's ESMTP parameters as a filter gets them (SMFIC_MAIL)."""
    params = [f"SIZE={event.size}"] if event.size is not None else []
    params += [f"BODY={event.body}"] if event.body else []
    params += ["SMTPUTF8"] if event.smtputf8 else []
    params += [f"RET={event.ret}"] if event.ret else []
    params += [f"ENVID={event.envid}"] if event.envid else []
    params += [f"AUTH={event.auth}"] if event.auth else []
    return params


def rcpt_parameters(event: core.RcptTo) -> list[str]:
    params = [f"NOTIFY={','.join(event.notify)}"] if event.notify else []
    return params + ([f"ORCPT={event.orcpt}"] if event.orcpt else [])


class MilterSteps:
    """The SMTP session's milter hooks, mixed into server.smtp.SMTPSession."""

    service: SMTPService
    stream: Stream
    client_ip: str
    tls: tuple[str, str] | None
    milters: MilterChain | None
    user: str | None

    def _milter_chain(self) -> MilterChain:
        svc = self.service
        peer = self.stream.get_extra_info("peername") or ("", 0)
        local = self.stream.get_extra_info("sockname") or ("", 0)
        info = SessionInfo(service=svc.name, hostname=svc.hostname, client_ip=self.client_ip,
                           client_port=int(peer[1]) if len(peer) > 1 else 0,
                           daemon_addr=str(local[0]),
                           daemon_port=int(local[1]) if len(local) > 1 else 0)
        return MilterChain(svc.milters, info, svc.mailboxes.receive)

    async def _milter_helo(self, name: str) -> Reply | None:
        assert self.milters is not None
        if self.tls is not None:
            self.milters.tls = {"{tls_version}": self.tls[0], "{cipher}": self.tls[1]}
        return await self.milters.helo(name)

    async def _milter_end(self, txn: Transaction, message: Incoming,
                          ) -> Reply | tuple[Incoming, str | None]:
        """The filters' verdict on the whole message: a reply that ends it (nothing
        kept), or the message to store (changed or not) and the folder to file it in."""
        assert self.milters is not None
        svc = self.service
        outcome = await self.milters.message(
            message, lambda sender: return_path(txn.mail.address if sender is None else sender))
        if outcome.refusal is not None or outcome.discard:
            message.abort()
            if outcome.discard:
                log.info("%s: %s: discarded by milter: from=<%s>, nrcpt=%d", svc.name,
                         txn.queue_id, txn.mail.address, len(txn.recipients) + len(txn.remote))
                return Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")
            return outcome.refusal or LOCAL_ERROR
        if outcome.message is not None:
            message.abort()
            message = outcome.message
            if txn.signer is not None and svc.dkim is not None:
                # The filters changed what was being signed: sign what they made.
                txn.signer = svc.dkim.start()
                await asyncio.to_thread(_feed_all, txn.signer, message)
        await self._milter_envelope(txn, outcome)
        if outcome.quarantine is not None:
            log.info("%s: %s: quarantine: %s; filed in %s", svc.name, txn.queue_id,
                     outcome.quarantine, svc.junk_folder)
        if not txn.recipients and not txn.remote:
            message.abort()
            log.info("%s: %s: milters removed every recipient; message dropped", svc.name,
                     txn.queue_id)
            return Reply(250, "2.0.0", f"Ok: queued as {txn.queue_id}")
        return message, (svc.junk_folder if outcome.quarantine is not None else None)

    async def _milter_envelope(self, txn: Transaction, outcome: MessageOutcome) -> None:
        """Sender and recipient changes: a filter is trusted as Postfix trusts it (an
        added recipient in another domain is relayed, even from the MX listener)."""
        svc = self.service
        if outcome.sender is not None:
            log.info("%s: %s: milter changed sender <%s> to <%s>", svc.name, txn.queue_id,
                     txn.mail.address, outcome.sender)
            txn.mail = replace(txn.mail, address=outcome.sender)
        for gone in outcome.deleted:
            key = gone.lower()
            txn.recipients = [r for r in txn.recipients if r[0].lower() != key]
            txn.remote = [r for r in txn.remote if r.address.lower() != key]
            txn.notify = [n for n in txn.notify if n[0].address.lower() != key]
        for address, _params in outcome.added:
            decision = await (svc.submission or svc.policy).check_recipient(address)
            if decision.accepted and decision.remote is None:
                txn.recipients.append((address, decision.mailboxes))
            elif decision.accepted and decision.remote is not None:
                txn.remote.append(Recipient(decision.remote))
            elif not svc.directory.is_local_domain(address.rpartition("@")[2].lower()):
                txn.remote.append(Recipient(address))
            else:
                log.warning("%s: %s: milter added unknown local recipient <%s>: %s",
                            svc.name, txn.queue_id, address, decision.reply)


def _feed_all(signer: StreamSigner, message: Incoming) -> None:
    """BLOCKING: the whole message, as it will be queued, to a DKIM signer."""
    for chunk in message.chunks():
        signer.feed(chunk)
