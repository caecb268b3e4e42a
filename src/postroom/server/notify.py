"""Readiness for the service manager: sd_notify(3)'s datagrams to $NOTIFY_SOCKET, done here.

systemd's Type=notify waits for "READY=1" before it counts the service as
started (and starts what is ordered after it); "RELOADING=1" ... "READY=1"
brackets a reload, "STOPPING=1" announces the drain, "STATUS=" is the line
`systemctl status` shows. The protocol is one datagram of newline-separated
assignments on the Unix socket named by NOTIFY_SOCKET (a path, or "@name" in
the abstract namespace); without that variable each call does nothing. Only
the primary process sends (the unit's NotifyAccess=main).
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("postroom.master")

NOTIFY_ENV = "NOTIFY_SOCKET"


def notify(*assignments: str) -> bool:
    """Send "KEY=VALUE" lines to the service manager; False when there is none (or the
    send failed, which is logged: readiness is never a reason to stop serving)."""
    target = os.environ.get(NOTIFY_ENV, "")
    if not target or target[0] not in "/@":
        return False
    address = "\0" + target[1:] if target[0] == "@" else target
    message = "\n".join(assignments).encode("utf-8", "replace")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, address)
    except OSError as exc:
        log.warning("cannot tell the service manager %s: %s", assignments[0], exc)
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")


def reloading() -> bool:
    # systemd 253's Type=notify-reload wants the time the reload began with it.
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={now}", "STATUS=reloading the configuration")


def stopping() -> bool:
    return notify("STOPPING=1", "STATUS=stopping: finishing sessions in progress")
