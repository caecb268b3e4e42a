"""What a courier reports for each recipient: delivered, try again later, or never.

Couriers never sleep or retry (the queue owns time); they report one of three
outcomes per recipient and the queue decides what follows (chasquid's split).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Outcome = Literal["delivered", "temporary", "permanent"]


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One recipient's result of one delivery attempt."""

    recipient: str
    outcome: Outcome
    dsn_status: str  # RFC 3463, e.g. "2.0.0", "4.4.1", "5.1.1"
    text: str  # the remote reply ("550 5.1.1 no such user") or our own explanation
    remote_mta: str | None = None  # "mx.corp.example[192.0.2.1]:25", or None for local
    relayed_without_dsn: bool = False  # RFC 3461 5.2.2: next hop lacked DSN (NOTIFY=SUCCESS)
    expanded: bool = False  # an alias that reached several mailboxes (RFC 3464 2.3.3)
