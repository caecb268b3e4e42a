"""Couriers' input in tests: a message file opened as the queue hands a message over."""

from __future__ import annotations

import os
from pathlib import Path

from postroom.queue.content import Content


def content_of(path: Path) -> Content:
    """The whole file as a Content (the queue's own start past its envelope line is
    the queue's business, tested with QueueStore.open_content); the caller closes it."""
    fd = os.open(path, os.O_RDONLY)
    return Content(fd, 0, os.fstat(fd).st_size)
