"""The primary's metrics endpoint: /metrics, the Prometheus text format added up across
every server process, plus the queue as the primary's scheduler holds it; /health, whether
the listeners, the queue and the store are working (200, or 503 naming what is not).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.queue.schedule import PARKED, WAITING
from postroom.server.httpd import Answer, serve_http

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from postroom.server.main import Running

# Queue age bands (upper bounds in seconds, the last open): new, delayed, old, stale.
QUEUE_AGES = ((300.0, "under_5m"), (3600.0, "under_1h"), (86400.0, "under_1d"),
              (float("inf"), "over_1d"))
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # the text exposition format


class QueueCollector:
    """postroom_queue_messages{state, age}: what waits in the relay queue, read from the
    primary scheduler's schedule at each scrape (no files read: queue.schedule keeps
    the next attempt, arrival and hold of every message)."""

    def __init__(self, running: Running) -> None:
        self.running = running

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        now = time.time()
        counts = {(state, age): 0 for state in ("active", "deferred", "held")
                  for _limit, age in QUEUE_AGES}
        oldest: dict[str, float] = {}
        for entry in list(self.running.relay.scheduler.schedule.entries.values()):
            if entry.held:
                state = "held"
            elif entry.where == PARKED or (entry.where == WAITING and entry.next_attempt > now):
                state = "deferred"  # waiting for its next attempt, or its dead destination
            else:
                state = "active"  # due or being delivered
            age = now - entry.created
            band = next(name for limit, name in QUEUE_AGES if age < limit)
            counts[state, band] += 1
            oldest[state] = max(oldest.get(state, 0.0), age)
        messages = GaugeMetricFamily("postroom_queue_messages",
                                     "Messages in the relay queue, by state and age",
                                     labels=["state", "age"])
        for (state, band), count in counts.items():
            messages.add_metric([state, band], count)
        yield messages
        ages = GaugeMetricFamily("postroom_queue_oldest_seconds",
                                 "Age of the oldest message in the relay queue, by state",
                                 labels=["state"])
        for state in ("active", "deferred", "held"):
            ages.add_metric([state], oldest.get(state, 0.0))
        yield ages


def _exposition(running: Running) -> bytes:
    """Every process's metrics added up, and the queue's (blocking: reads the files)."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(QueueCollector(running))
    return generate_latest(registry)


def _writable(folder: Path) -> bool:
    """Files can be made in `folder`, or it can be made (deliveries make it when due)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return os.access(folder, os.W_OK)


def _listening(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False


async def health(running: Running) -> tuple[bool, list[str]]:
    """Whether the listeners, the queue and the store work, with one line each."""
    lines: list[str] = []
    down = [name for name, server in running.servers.items()  # closed: no sockets left
            if not server.sockets or not all(_listening(s) for s in server.sockets)]
    lines.append(f"listeners: {'down: ' + ', '.join(down) if down else 'ok'} "
                 f"({', '.join(running.servers)})")
    queue_dir = running.config.queue_dir
    task = running.relay._task
    if task is not None and task.done():
        queue = "down: the scheduler stopped"
    elif not _writable(queue_dir):
        queue = f"down: cannot write to {queue_dir}"
    else:
        queue = f"ok ({len(running.relay.scheduler.schedule)} messages)"
    lines.append(f"queue: {queue}")
    try:
        await asyncio.to_thread(running.store.users.list_domains)
        mail_dir = running.config.mail_dir
        store = "ok" if _writable(mail_dir) else f"down: cannot write to {mail_dir}"
    except Exception as exc:  # noqa: BLE001 - whatever the store raises means "not working"
        store = f"down: the user directory does not answer: {exc}"
    lines.append(f"store: {store}")
    return all(": ok" in line for line in lines), lines


async def serve_endpoint(sock: socket.socket, running: Running) -> asyncio.base_events.Server:
    async def answer(path: str) -> Answer:
        current = running.newest()  # the config in force, after any reload
        if path == "/metrics":
            body = await asyncio.to_thread(_exposition, current)
            return Answer(200, body, CONTENT_TYPE)
        if path == "/health":
            ok, lines = await health(current)
            return Answer(200 if ok else 503, ("\n".join(lines) + "\n").encode())
        return Answer(404, b"try /metrics or /health\n")

    return await serve_http(sock, answer)
