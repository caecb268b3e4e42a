"""Log lines for the systemd journal: no time of our own (the journal stamps them), a priority.

systemd passes a service's standard error to the journal as a stream and says
so in JOURNAL_STREAM ("DEVICE:INODE" of that stream, systemd.exec(5)); only
when standard error is still that very stream does the format change. Each
line then starts with its syslog priority in angle brackets (sd-daemon(3):
"<4>" for a warning), which the journal stores as the entry's PRIORITY
instead of printing it, so `journalctl -p warning` finds the warnings.
"""

from __future__ import annotations

import logging
import os

JOURNAL_ENV = "JOURNAL_STREAM"

# syslog(3) priorities by logging level (sd-daemon(3) SD_ERR, SD_WARNING, ...).
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6), (logging.DEBUG, 7))


def under_journal(fd: int = 2) -> bool:
    """Whether standard error (or `fd`) is the journal's stream named in JOURNAL_STREAM."""
    device, _, inode = os.environ.get(JOURNAL_ENV, "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(fd)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def priority(level: int) -> int:
    for floor, value in PRIORITIES:
        if level >= floor:
            return value
    return 7


class JournalFormatter(logging.Formatter):
    """"<PRIORITY>NAME[PID]: MESSAGE": the Postfix-like line without its time. A traceback's
    lines follow, each with the priority (the journal makes one entry per line)."""

    def __init__(self) -> None:
        super().__init__("%(message)s")

    def format(self, record: logging.LogRecord) -> str:
        mark = f"<{priority(record.levelno)}>"
        first, *rest = super().format(record).split("\n")
        return "\n".join([f"{mark}{record.name}[{record.process}]: {first}",
                          *(mark + line for line in rest)])
