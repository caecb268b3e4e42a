"""Opens the relay queue the config names: the queue folder, or PostgreSQL with the store."""

from __future__ import annotations

import os
import socket

from postroom.config import Config
from postroom.queue.store import QueueStore


def open_queue(config: Config, *, primary_pid: int | None = None) -> QueueStore:
    """The queue of `config`: in the data folder, or, with `[store] url`, the
    PostgreSQL queue shared by every node. `primary_pid`: the server's primary
    process, whose scheduler delivers what this node holds (None: the command line,
    which sees every message and adds ones any node may take)."""
    url = config.store_config.url
    if not url:
        return QueueStore(config.queue_dir)
    from postroom.queue.pgqueue import PGQueueStore

    owner = (None if primary_pid is None
             else f"{config.hostname}/{socket.gethostname()}/{primary_pid}")
    return PGQueueStore(url, owner, config.data_dir / "store-spool")


def primary_pid(worker: bool) -> int:
    """The pid of the server's primary process, from the primary or one of its workers."""
    return os.getppid() if worker else os.getpid()
