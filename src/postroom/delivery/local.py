"""The local courier: copies a queued message into the mailboxes of local recipients.

Mail that reaches local mailboxes through the queue rather than straight from
the SMTP server (bounces to local senders, mail from `postroom sendmail`)
ends here. Each recipient is expanded through the user directory (aliases,
subaddresses) to mailboxes; the message is copied once and filed into every
mailbox by the same group commit as the SMTP server's (store.api.Incoming),
all or nothing, so a failed attempt never leaves a copy behind to be
duplicated by the retry.

This is final delivery (RFC 5321 4.4): the envelope sender goes on top of the
filed copy as its Return-Path, and any Return-Path the message already had is
removed (store.returnpath). Otherwise the message is stored as queued: the
Received header was added when it was accepted.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Awaitable, Callable
from typing import BinaryIO

from postroom.queue.content import Content
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.result import DeliveryResult
from postroom.store.api import Expansion, Incoming, Mailboxes
from postroom.store.returnpath import ReturnPathRemover, return_path

COPY_CHUNK = 1024 * 1024  # octets of the message read at a time


def _write_failure(error: OSError) -> tuple[str, str]:
    """RFC 3463 code and text for a store that could not take the message (always temporary)."""
    if error.errno == errno.EDQUOT:
        return "4.2.2", "mailbox over quota"  # X.2.2 mailbox full
    if error.errno == errno.ENOSPC:
        return "4.3.1", "mail system full (no space left on device)"  # X.3.1
    return "4.3.0", f"cannot write to the mailbox: {error.strerror or error}"


class LocalCourier:
    """Delivers queued messages to local mailboxes (see the module docstring)."""

    def __init__(
        self, store: Mailboxes, expand: Callable[[str], Awaitable[Expansion | None]]
    ) -> None:
        self._store = store
        self._expand = expand

    async def deliver(
        self, envelope: Envelope, recipients: list[Recipient], content: Content,
        folder: str | None = None,
    ) -> list[DeliveryResult]:
        """Deliver the message to local `recipients`; one result each, in order.
        `folder`: into that folder of each mailbox (Incoming.deliver), not the inbox."""
        results: dict[int, DeliveryResult] = {}
        targets: dict[int, tuple[str, ...]] = {}
        for i, recipient in enumerate(recipients):
            decided = await self._plan(recipient.address)
            if isinstance(decided, DeliveryResult):
                results[i] = decided
            else:
                targets[i] = decided
        if targets:
            # A mailbox named by several recipients (an alias and its member) gets one copy.
            mailboxes = list(dict.fromkeys(box for boxes in targets.values() for box in boxes))
            message = self._store.receive(return_path(envelope.sender))
            try:
                source = content.reader()  # here, not in the thread: see Content
                await asyncio.to_thread(self._copy, source, message)
                await message.deliver(mailboxes, folder)
            except OSError as e:
                status, text = _write_failure(e)
                for i in targets:
                    results[i] = DeliveryResult(recipients[i].address, "temporary", status, text)
            except ValueError as e:
                # A directory entry no mailbox can have (written past the directory's
                # checks): this host's set-up to mend (RFC 3463 X.3.5), nothing filed.
                for i in targets:
                    results[i] = DeliveryResult(recipients[i].address, "temporary", "4.3.5",
                                                f"<{recipients[i].address}>: {e}")
            else:
                where = "maildir" if folder is None else f"maildir folder {folder}"
                for i, boxes in targets.items():
                    text = f"delivered to {where}" + ("" if len(boxes) == 1 else f" ({len(boxes)})")
                    results[i] = DeliveryResult(recipients[i].address, "delivered", "2.0.0", text,
                                                expanded=len(boxes) > 1)
            finally:
                message.abort()
        return [results[i] for i in range(len(recipients))]

    async def _plan(self, address: str) -> tuple[str, ...] | DeliveryResult:
        """The mailboxes of one recipient, or the failure that it has none."""
        expansion = await self._expand(address)
        if expansion is None:
            # No such user or alias, or a domain that is no longer local.
            return DeliveryResult(address, "permanent", "5.1.1", f"<{address}>: no such user here")
        if expansion.broken:
            # Same rule as at RCPT time (policy.relay): an alias whose targets are gone
            # or loop is this host's set-up to mend (RFC 3463 X.3.5); retried meanwhile.
            return DeliveryResult(
                address, "temporary", "4.3.5",
                f"<{address}>: an alias that leads to no mailbox (a configuration error here)",
            )
        if expansion.remote:
            # Same rule as at RCPT time (policy.relay): filing the local copies alone
            # would silently lose the forwarded ones.
            return DeliveryResult(
                address, "permanent", "5.7.1",
                f"<{address}>: alias forwards to remote addresses, which local "
                "delivery cannot do",
            )
        return expansion.mailboxes

    @staticmethod
    def _copy(source: BinaryIO, message: Incoming) -> None:
        """BLOCKING: copy `source` into `message`, behind its Return-Path; closes `source`."""
        earlier = ReturnPathRemover()
        with source:
            while chunk := source.read(COPY_CHUNK):
                message.write(earlier.feed(chunk))
            message.write(earlier.end())
