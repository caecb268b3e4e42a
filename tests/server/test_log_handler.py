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


def test_line_formatter_writes_what_logging_would() -> None:
    """The once-a-second time stamp changes nothing in the lines, exceptions included."""
    from postroom.server.main import LOG_TIME, LineFormatter

    ours = LineFormatter()
    theirs = logging.Formatter("%(asctime)s %(name)s[%(process)d]: %(message)s", LOG_TIME)
    logger = logging.getLogger("postroom.test-format")
    for created, message, args in [
        (1_700_000_000.1, "one %s", ("arg",)),
        (1_700_000_000.9, "same second", ()),
        (1_700_000_001.0, "next second %d%%", (5,)),
    ]:
        record = logger.makeRecord(logger.name, logging.INFO, __file__, 1, message, args, None)
        record.created = created
        assert ours.format(record) == theirs.format(record)
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 1, "failed", (),
                                   sys.exc_info())
    assert ours.format(record) == theirs.format(record)
    assert "ValueError: boom" in ours.format(record)
