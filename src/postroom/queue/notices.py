"""Queues the delivery status notifications a message owes (postroom.queue.rules decides which).

Each notice is built and queued durably in a worker thread (postroom.queue.dsn)
and handed to the scheduler like any new message. A notice that cannot be
queued (disk trouble) stays owed: the caller keeps the message and tries
again later, so a crash or a full disk sends a notice twice at worst, never
zero times.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from postroom.queue.dsn import Action, Report, queue_dsn
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.rules import (
    OWED,
    TO_POSTMASTER,
    Rules,
    delay_notice_due,
    owed_notices,
    result_of,
)
from postroom.queue.store import QueueStore

log = logging.getLogger("postroom.queue")


class Notices:
    """Sends the notices of one queue; `adopt` takes each notice queued, to deliver it."""

    def __init__(
        self, store: QueueStore, hostname: str, rules: Rules, adopt: Callable[[Envelope], None],
        *, sign: Callable[[bytes], bytes] | None = None,
    ) -> None:
        """`hostname` names this host in the notices (Reporting-MTA, From); `sign` adds
        the DKIM signatures of its domain to each notice."""
        self._sign = sign
        self._store = store
        self._hostname = hostname
        self._rules = rules
        self._adopt = adopt

    async def warn_if_due(self, envelope: Envelope, now: float) -> None:
        """The delay notice (RFC 3464), once per message, when the rules say it is due."""
        waiting = delay_notice_due(envelope, now, self._rules)
        if waiting and await self._queue(envelope, waiting, "delayed", now):
            envelope.warned = True

    async def send_owed(self, envelope: Envelope, now: float) -> bool:
        """Queue the notices recorded as owed, clearing each once it is queued; False
        if one could not be queued (it stays owed)."""
        owed: dict[str, str] = envelope.extra.get(OWED) or {}
        ok = True
        for kind, recipients in owed_notices(envelope):
            postmaster = kind == TO_POSTMASTER
            action = cast(Action, "failed" if postmaster else kind)
            to = self._rules.postmaster if postmaster else None
            if await self._queue(envelope, recipients, action, now, to=to):
                for recipient in recipients:
                    owed.pop(recipient.address, None)
            else:
                ok = False
        if not owed:
            envelope.extra.pop(OWED, None)
        return ok

    async def _queue(
        self, envelope: Envelope, recipients: list[Recipient], action: Action, now: float,
        *, to: str | None = None,
    ) -> bool:
        """Queue one DSN about `recipients` (to the sender, or `to`); True when it is
        queued (or nobody wants it)."""
        items = [(r, result_of(r)) for r in recipients]
        retry_until = (
            envelope.created + self._rules.give_up_after if action == "delayed" else None
        )
        report = Report(envelope, items, action, self._hostname, now, retry_until, to)
        try:
            notice = await asyncio.to_thread(queue_dsn, self._store, report, sign=self._sign)
        except OSError as e:
            log.error("%s: cannot queue the %s notice: %s", envelope.queue_id, action, e)
            return False
        if notice is not None:
            kind = {"failed": "non-delivery", "delayed": "delay"}.get(action, "success")
            whom = "postmaster" if to is not None else "sender"
            log.info("%s: %s %s notification: %s", envelope.queue_id, whom, kind,
                     notice.queue_id)
            self._adopt(notice)
        return True
