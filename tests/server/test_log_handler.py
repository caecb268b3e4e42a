"""The server's log handler keeps lines in its buffer until flushed."""

from __future__ import annotations

import io
import logging

from postroom.server.main import BufferedLogHandler


class CountingStream(io.StringIO):
    flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_lines_wait_for_flush() -> None:
    stream = CountingStream()
    handler = BufferedLogHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    logger = logging.getLogger("postroom.test-buffered")
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(logging.INFO)
    try:
        for n in range(3):
            logger.info("line %d", n)
        assert stream.flushes == 0  # no write(2) per line
        handler.flush()
        assert stream.flushes == 1
        assert stream.getvalue().splitlines() == [
            f"postroom.test-buffered: line {n}" for n in range(3)
        ]
    finally:
        logger.removeHandler(handler)
