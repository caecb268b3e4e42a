"""The envelope of a queued message and each recipient's delivery state, as stored on disk.

RFC 5321 2.3.1 separates the envelope (who sent it, who gets it) from the
content. The queue keeps each Envelope as JSON: first as the first line of the
message's queue file, then, once it changes, in a small file beside it that
every change of a recipient's state rewrites atomically, so after a crash
each recipient is in the last state written (postroom.queue.store).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, Literal

# What happened to one recipient so far (Postfix's queue has the same four).
RecipientState = Literal["pending", "deferred", "delivered", "bounced"]
FINAL_STATES = frozenset({"delivered", "bounced"})


@dataclass
class Recipient:
    """One envelope recipient (RFC 5321 RCPT) and where its delivery stands."""

    address: str
    # RFC 3461 4.1, 4.2: NOTIFY (None = not given: failures and delays by default)
    # and ORCPT ("rfc822;user@example" form, decoded), kept for DSNs.
    notify: tuple[str, ...] | None = None
    orcpt: str | None = None
    state: RecipientState = "pending"
    attempts: int = 0
    last_error: str | None = None  # the reply or failure that deferred/bounced it
    dsn_status: str | None = None  # RFC 3463 code of the last outcome, e.g. "4.4.1"
    remote_mta: str | None = None  # the host that gave the last answer
    done_at: float | None = None  # when it reached a final state

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


@dataclass
class Envelope:
    """Everything the queue knows about one message, except its bytes."""

    queue_id: str
    sender: str  # "" is the null reverse-path <> (bounces): never bounced itself
    recipients: list[Recipient]
    created: float  # when the message was accepted (its 250)
    size: int = 0
    next_attempt: float = 0.0  # 0: as soon as possible
    held: bool = False  # `postroom queue hold`: not tried until released
    # RFC 3461 4.3, 4.4: RET (FULL|HDRS) and ENVID of the MAIL command, for DSNs.
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False  # RFC 6531: needs a next hop that offers SMTPUTF8
    body: str | None = None  # "7BIT" | "8BITMIME" (RFC 6152) as declared
    auth_user: str | None = None  # who submitted it (submission AUTH), for logs
    client: str | None = None  # "[ip]" of the client, for logs and DSNs
    warned: bool = False  # a delay notice was sent already
    extra: dict[str, Any] = field(default_factory=dict)  # room for later fields

    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    @property
    def done(self) -> bool:
        return all(r.final for r in self.recipients)

    def to_json(self) -> bytes:
        # What dataclasses.asdict gives, built directly, without asdict's deep copy
        # of every value: an envelope is written at least once per message.
        data = {name: getattr(self, name) for name in _ENVELOPE_FIELDS}
        data["recipients"] = [
            {name: getattr(r, name) for name in _RECIPIENT_FIELDS} for r in self.recipients
        ]
        return json.dumps(data, ensure_ascii=False, sort_keys=True).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes) -> Envelope:
        raw = json.loads(data)
        recipients = []
        for r in raw.pop("recipients"):
            if r.get("notify") is not None:
                r["notify"] = tuple(r["notify"])
            recipients.append(Recipient(**r))
        return cls(recipients=recipients, **raw)


_RECIPIENT_FIELDS = tuple(f.name for f in fields(Recipient))
_ENVELOPE_FIELDS = tuple(f.name for f in fields(Envelope))
