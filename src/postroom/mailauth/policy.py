"""What happens to mail whose checks failed: refuse, file in Junk, mark, or deliver.

DMARC decides (RFC 7489 6.6): a failed SPF alone (even -all) refuses nothing
when DKIM aligned. A failed p=reject is refused with 550 5.7.1 at the end of
DATA, p=quarantine is filed in the recipient's Junk folder, or in the inbox
with a marker header for the domains whose users read by POP3 (which sees no
folders). A DNS failure that leaves the verdict open defers (451, the sender
retries) or is recorded as temperror and delivered, as configured. Nothing is
ever dropped silently.

One reply answers every recipient of a message, so when their domains are set
differently the gentlest action any of them asks for applies to all: mail is
refused only when every recipient's domain refuses it, and filed in Junk only
when every one files it there (the others' marker header goes on the copy).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from postroom.mailauth.dkimverify import ARCResult
from postroom.mailauth.dmarc import DMARCResult
from postroom.protocol.replies import Reply

# The header a quarantined message carries when it stays in the inbox: SpamAssassin's,
# which mail clients and filters already act on.
MARKER = b"X-Spam-Flag: YES\r\n"


@dataclass(frozen=True)
class CheckPolicy:
    """The operator's settings ([dmarc] in the config)."""

    enforce: bool = True
    junk_folder: str = "Junk"
    inbox_quarantine_domains: tuple[str, ...] = ()  # POP3-only users: marker, not Junk
    no_reject_domains: tuple[str, ...] = ()  # p=reject quarantined instead of refused
    dns_errors: str = "defer"  # "defer" (451) or "accept" (temperror recorded)
    trusted_arc_sealers: tuple[str, ...] = ()  # their passing ARC chain overrides DMARC


@dataclass(frozen=True)
class Action:
    """What to do with the message: refuse it, or file it (where, with what marker)."""

    refusal: Reply | None = None
    folder: str | None = None
    marker: bytes = b""
    summary: str = "deliver"


DELIVER = Action()


def decide(policy: CheckPolicy, verdicts: Sequence[DMARCResult], arc: ARCResult,
           recipient_domains: Sequence[str]) -> Action:
    """The action for a message with these DMARC verdicts (one per From domain)."""
    worst = _worst(verdicts)
    if worst is None:
        return DELIVER
    if worst.uncertain and policy.dns_errors == "defer" and (
            worst.result == "temperror" or worst.policy != "none"):
        return Action(Reply(451, "4.7.0", f"DNS lookups for the DMARC check of "
                                          f"{worst.from_domain} failed, try again later"),
                      summary="defer (DNS failure)")
    if not worst.failed or worst.policy == "none" or not policy.enforce:
        return DELIVER
    if arc.result == "pass" and arc.sealers and arc.sealers[-1] in policy.trusted_arc_sealers:
        return Action(summary=f"deliver (ARC sealed by trusted {arc.sealers[-1]})")
    domains = list(dict.fromkeys(recipient_domains)) or [""]
    if worst.policy == "reject" and not any(d in policy.no_reject_domains for d in domains):
        return Action(Reply(550, "5.7.1", f"Message refused: it fails the DMARC policy of "
                                          f"{worst.from_domain} (p=reject): {worst.reason}"),
                      summary="reject (DMARC)")
    if all(d not in policy.inbox_quarantine_domains for d in domains):
        return Action(folder=policy.junk_folder, summary=f"quarantine to {policy.junk_folder}")
    return Action(marker=MARKER, summary="quarantine to inbox, marked")


def _worst(verdicts: Sequence[DMARCResult]) -> DMARCResult | None:
    """The verdict that asks the most: a failed reject over quarantine over the rest."""
    rank = {"reject": 3, "quarantine": 2, "none": 1}

    def weight(v: DMARCResult) -> tuple[int, int]:
        return (rank.get(v.policy, 0) if v.failed else 0,
                1 if v.uncertain and v.result in ("temperror", "fail") else 0)
    return max(verdicts, key=weight, default=None)
