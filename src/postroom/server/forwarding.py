"""Forwarding a received message to the other hosts an alias names: the envelope to queue
(an SRS sender in the alias's domain) and the content (with our ARC seal on top)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass

from postroom.ids import new_queue_id
from postroom.mailauth.arcseal import ARC_SEAL_LIMIT, seal
from postroom.mailauth.keys import KeyRing
from postroom.mailauth.srs import SRS
from postroom.queue.envelope import Envelope, Recipient
from postroom.store.api import Incoming


@dataclass(frozen=True)
class Forwarding:
    """What forwarding needs: the SRS secret, the keys that seal, our authserv-id."""

    srs: SRS
    keyring: KeyRing | None  # None: [dkim] sign = false, so nothing is sealed either
    authserv_id: str  # the host name, in the Authentication-Results our checks write

    async def prepare(self, original: Envelope, domain: str, targets: list[str],
                      message: Incoming, where: str) -> tuple[Envelope, Iterable[bytes]]:
        """The forwarded copy for `targets`, from an alias of `domain` (ours)."""
        envelope = Envelope(
            queue_id=new_queue_id(),
            sender=self.srs.forward(original.sender, domain),
            recipients=[Recipient(address=t) for t in targets],
            created=time.time(),
            size=message.size,
            body=original.body,
            smtputf8=original.smtputf8,
            client=original.client,
            extra={"forwarded_from": original.queue_id},
        )
        keys = self.keyring.keys_for(domain) if self.keyring is not None else []
        if not keys or message.size > ARC_SEAL_LIMIT:
            return envelope, message.chunks()
        content = await asyncio.to_thread(lambda: b"".join(message.chunks()))
        arc = await asyncio.to_thread(seal, content, keys, self.authserv_id, None, where)
        envelope.size += len(arc)
        return envelope, (arc, content)
