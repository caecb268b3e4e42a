"""Who may send to whom on a receiving host: local recipients only, never an open relay.

An unauthenticated client (the `smtp` listener, MX traffic) may only hand us mail
for our own domains and for addresses that exist there. Every answer is a
`Reply` value; the server layer only writes it.

The address tricks that made old MTAs open relays are refused outright rather
than interpreted (RFC 5321 3.6.1 lets a host refuse source routes; RFC 5321
2.3.11 leaves the local part to the receiving host, which may refuse
"interesting" ones):

- `user%other.example@local`   the "percent hack" (pre-RFC 1123 relaying)
- `other!user@local`           UUCP bang paths
- `"user@other.example"@local` a quoted local part that hides an address
- `@local:user@other.example`  source routes (the core strips the route; what is
                               left is then judged on its own domain)
Trailing dots and letter case in the domain are normalised before the check. A
quoted local part is otherwise the local part it spells (RFC 5321 4.1.2:
`"boss"@local` is `boss@local`): `postroom.canonical` makes it one spelling.

Every local domain has a postmaster (RFC 5321 4.5.1); the user directory's
expansion files its mail with the administrator, so it is accepted here like
any other mailbox.
"""

from __future__ import annotations

from dataclasses import dataclass

from postroom.canonical import canonical, canonical_domain, is_quoted, split, unquoted
from postroom.mailauth.srs import SRS, SRSError, is_srs
from postroom.protocol.replies import Reply
from postroom.store.api import Directory

# Characters that, in a local part, ask a host to route the mail onwards.
ROUTING_CHARACTERS = frozenset("%!@")


@dataclass(frozen=True, slots=True)
class RecipientDecision:
    """The outcome of one RCPT: the reply, and the local mailboxes it reaches."""

    reply: Reply
    mailboxes: tuple[str, ...] = ()
    remote: str | None = None  # an address to relay to (authenticated submission only)
    # Addresses on other hosts an alias (or an SRS bounce address) forwards to: relayed
    # with an SRS sender (postroom.mailauth.srs) and an ARC seal.
    forward: tuple[str, ...] = ()
    forward_domain: str = ""  # the local domain (canonical) that forwards them

    @property
    def accepted(self) -> bool:
        return self.reply.is_positive


def split_address(address: str) -> tuple[str, str]:
    """Split at the last "@" (a quoted local part may hold one); no "@" -> ("x", "")."""
    local, sep, domain = address.rpartition("@")
    if not sep:
        return address, ""
    return local, domain


def normalise_domain(domain: str) -> str:
    """The canonical spelling (lower-case A-labels, one trailing root dot removed),
    or "" for something that is no domain at all."""
    try:
        return canonical_domain(domain)
    except ValueError:
        return ""


class RecipientPolicy:
    """RCPT checks for mail arriving from the outside world (no AUTH), against the
    user directory's domains and addresses (aliases and subaddresses followed)."""

    def __init__(self, directory: Directory, primary_domain: str = "localhost",
                 srs: SRS | None = None) -> None:
        """`srs`: forwarding is on (aliases to other hosts, bounces to SRS addresses)."""
        self._directory = directory
        self._primary_domain = primary_domain
        self._srs = srs

    async def check_recipient(self, address: str) -> RecipientDecision:
        if not address:
            # RCPT TO:<> is a syntax error the core catches; keep a defence here.
            return RecipientDecision(Reply(501, "5.1.3", "Empty recipient address"))
        if address.lower() == "postmaster":
            # RFC 5321 4.5.1: <Postmaster> without a domain must be accepted.
            address = "postmaster@" + self._primary_domain
        local, domain = split_address(address)
        domain = normalise_domain(domain)
        shown = f"<{address}>"
        if not domain or not self._directory.is_local_domain(domain) or any(
            ch in ROUTING_CHARACTERS for ch in unquoted(local)
        ):
            # Not our domain, or ours but asking us to route the mail further:
            # a host that does not relay says so with 554 5.7.1 (RFC 5321 3.6.2).
            return RecipientDecision(Reply(554, "5.7.1", f"{shown}: Relay access denied"))
        if not unquoted(local):
            return RecipientDecision(Reply(501, "5.1.3", f"{shown}: empty local part"))
        try:
            key = canonical(f"{local}@{domain}")
        except ValueError:  # a local part longer than any mailbox name here
            key = None
        if self._srs is not None and is_srs(unquoted(local)):
            return self._srs_recipient(address, shown, domain)
        # A local part that stays quoted (a space, say) names no mailbox here:
        # user and alias names are dot-atoms.
        expansion = (await self._directory.expand(key)
                     if key is not None and not is_quoted(split(key)[0]) else None)
        if expansion is None:  # RFC 3463 X.1.1: the mailbox does not exist
            return RecipientDecision(
                Reply(550, "5.1.1", f"{shown}: Recipient address rejected: no such user here"))
        if expansion.broken:
            # The alias exists but its targets are gone or loop: the fault is
            # this host's set-up, which its administrator can mend, so the
            # sender is asked to try again (RFC 3463 X.3.5).
            return RecipientDecision(
                Reply(451, "4.3.5", f"{shown}: Recipient address unavailable: an alias "
                                    "that leads to no mailbox (a configuration error here)")
            )
        if expansion.remote and self._srs is None:
            # An alias that forwards off this host needs the relay queue; taking the
            # mail and filing only the local copies would silently lose the rest.
            return RecipientDecision(
                Reply(550, "5.7.1", f"{shown}: alias forwards to remote addresses and "
                                    "this host is not configured to relay")
            )
        return RecipientDecision(Reply(250, "2.1.5", "Ok"), expansion.mailboxes,
                                 forward=expansion.remote, forward_domain=domain)

    def _srs_recipient(self, address: str, shown: str, domain: str) -> RecipientDecision:
        """An SRS address of ours (a bounce of mail we forwarded): on to the original
        sender, if we made it and it is not too old."""
        assert self._srs is not None
        try:
            original = self._srs.reverse(address)
        except SRSError as e:
            return RecipientDecision(Reply(550, "5.1.1", f"{shown}: invalid SRS address: {e}"))
        return RecipientDecision(Reply(250, "2.1.5", "Ok"), forward=(original,),
                                 forward_domain=domain)

