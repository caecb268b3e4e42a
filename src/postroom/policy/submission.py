"""Who may send what on the submission ports (RFC 6409): authenticated users, as themselves.

An authenticated user may send to any domain, but only in her own name: the
envelope sender must be an address whose mail reaches her own mailbox (her
address, a subaddress of it, or an alias that leads to her), and so must the
addresses in the From header when that check is on (RFC 6409 8.1 lets the
submission server enforce this; Postfix calls it reject_sender_login_mismatch).
"""

from __future__ import annotations

from email.utils import getaddresses

from postroom.policy.relay import (
    RecipientDecision,
    RecipientPolicy,
    normalise_domain,
    split_address,
)
from postroom.protocol.replies import Reply
from postroom.store.api import Directory, user_key


class SubmissionPolicy:
    """Sender, recipient and From checks for an authenticated session."""

    def __init__(
        self, local: RecipientPolicy, directory: Directory, check_from_header: bool = True
    ) -> None:
        self._local = local
        self._directory = directory
        self.check_from_header = check_from_header

    async def owns(self, user: str, address: str) -> bool:
        """True when mail to `address` is filed in `user`'s mailbox."""
        canonical = user_key(address)
        if canonical is None:
            return False
        if canonical == user:
            return True
        expansion = await self._directory.expand(canonical)
        return expansion is not None and user in expansion.mailboxes

    async def check_sender(self, user: str, sender: str) -> Reply | None:
        """None when `user` may use `sender` as the envelope sender, else the refusal."""
        if sender == "":
            return None  # the null sender (RFC 5321 4.5.5): auto-replies, bounces
        if await self.owns(user, sender):
            return None
        return Reply(553, "5.7.1", f"<{sender}>: Sender address rejected: not owned by "
                                   f"user {user}")

    async def check_recipient(self, address: str) -> RecipientDecision:
        """Local recipients must exist; any other domain is relayed (the user is known)."""
        if address.lower() == "postmaster":  # RFC 5321 4.1.1.3: <Postmaster>, no domain
            return await self._local.check_recipient(address)
        _local, domain = split_address(address)
        canonical = normalise_domain(domain)
        if canonical and self._directory.is_local_domain(canonical):
            return await self._local.check_recipient(address)
        if not canonical or address.startswith("@"):
            return RecipientDecision(Reply(501, "5.1.3", f"<{address}>: bad recipient address"))
        return RecipientDecision(Reply(250, "2.1.5", "Ok"), remote=address)

    async def check_from(
        self, user: str, from_values: list[str], smtputf8: bool = False
    ) -> Reply | None:
        """RFC 6409 8.1: every From address must be the user's own (when the check is on).

        A non-ASCII address in From needs an SMTPUTF8 transaction (RFC 6532 3,
        RFC 6531 3.4): without it no host after this one may carry the message.
        """
        if not self.check_from_header:
            return None
        addresses = [addr for _name, addr in getaddresses(from_values) if addr]
        if not addresses:
            return None  # no From at all: RFC 6409 8 lets the server add one; we don't guess
        for address in addresses:
            if not smtputf8 and not address.isascii():
                return Reply(550, "5.6.7", "From: holds a non-ASCII address; send the "
                                           "message with MAIL FROM ... SMTPUTF8 (RFC 6531)")
            if not await self.owns(user, address):
                return Reply(550, "5.7.1", f"From: <{address}> is not an address of user {user}")
        return None
