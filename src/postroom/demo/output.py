"""What the demo prints, and the servers' log lines and the clients' traces it prints from."""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import textwrap
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

WIDTH = 100  # of the output when it is not a terminal
# A log line that starts with one of these names is shown as that listener's.
SERVICES = ("smtp", "submission", "submissions", "pop3", "pop3s")
# The commands whose +OK ends the AUTHORIZATION state (RFC 1939 4, RFC 5034 4);
# USER's +OK only asks for PASS.
POP3_LOGIN_COMMANDS = ("PASS", "APOP", "AUTH")


@dataclass(frozen=True)
class LogLine:
    logger: str
    created: float
    text: str


class Printer:
    """Step headers with their time right-aligned, indented exchange lines, plain text
    unless the output is a terminal (then bold headers and a coloured verdict)."""

    def __init__(self, out: TextIO, color: bool | None = None) -> None:
        self.out = out
        tty = hasattr(out, "isatty") and out.isatty()
        self.color = tty if color is None else color
        self.width = shutil.get_terminal_size((WIDTH, 24)).columns if tty else WIDTH
        self.width = max(60, min(self.width, 120))

    def _paint(self, code: str, text: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text

    def line(self, text: str = "", indent: int = 0) -> None:
        """`text` wrapped to the width, its continuation lines 4 deeper; "": an empty line."""
        wrapped = textwrap.wrap(text, self.width - indent, subsequent_indent="    ",
                                break_on_hyphens=False, break_long_words=False)
        for part in wrapped or [""]:
            print(" " * indent + part if part else "", file=self.out)

    def note(self, text: str) -> None:
        """A line that says what the exchange below it shows."""
        self.line(text, indent=3)

    def lines(self, texts: Iterable[str]) -> None:
        """Exchange lines, as the client traced them or the server logged them."""
        for text in texts:
            self.line(text, indent=5)

    def log(self, host: str, lines: Iterable[LogLine]) -> None:
        """Log lines as "host program: text", the listener's name standing for the program."""
        for line in lines:
            program, sep, rest = line.text.partition(": ")
            if not (sep and program in SERVICES):
                program, rest = line.logger.removeprefix("postroom.").split(".")[0], line.text
            self.line(f"{host} {program}: {rest}", indent=5)

    def header(self, text: str, seconds: float | None = None) -> None:
        took = f"[{duration(seconds)}]" if seconds is not None else ""
        room = self.width - len(took) - 1
        if len(text) > room:
            print(self._paint("1", text), file=self.out)
            text = ""
        print(self._paint("1", text.ljust(room)) + " " + took if took else
              self._paint("1", text), file=self.out)

    def verdict(self, ok: bool, text: str) -> None:
        word = "OK" if ok else "FAILED"
        lines = textwrap.wrap(f"{word}: {text}", self.width, subsequent_indent="    ")
        painted = self._paint("1;32", word) if ok else self._paint("1;31", word)
        lines[0] = painted + lines[0][len(word):]
        for line in lines:
            print(line, file=self.out)


def duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def span(first: list[LogLine], last: list[LogLine]) -> float | None:
    """From the first line of `first` to the last of `last`; None when either is missing."""
    if not first or not last:
        return None
    return max(0.0, last[-1].created - first[0].created)


class LogTap(logging.Handler):
    """Keeps the "postroom" loggers' records while the demo runs (they are the servers'
    side of the story: queue IDs, relay results, deliveries)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[LogLine] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string must not stop the demo
            text = str(record.msg)
        self.lines.append(LogLine(record.name, record.created, text))

    def find(self, pattern: str) -> list[LogLine]:
        regex = re.compile(pattern)
        return [line for line in list(self.lines) if regex.search(line.text)]

    @contextlib.contextmanager
    def attached(self) -> Iterator[LogTap]:
        root = logging.getLogger("postroom")
        saved = (root.level, root.propagate)
        root.addHandler(self)
        root.setLevel(logging.INFO)
        root.propagate = False  # the demo prints what matters; nothing else on stderr
        try:
            yield self
        finally:
            root.removeHandler(self)
            root.setLevel(saved[0])
            root.propagate = saved[1]

    def write(self, path: Path) -> None:
        """Every log line the servers wrote, for a look after a --keep-data run."""
        with contextlib.suppress(OSError), path.open("w", encoding="utf-8") as f:
            for line in self.lines:
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(line.created))
                f.write(f"{stamp}.{int(line.created % 1 * 1000):03d} {line.logger}: {line.text}\n")


class Exchange(list[tuple[float, str]]):
    """A client tool's trace: its lines with the time each arrived."""

    def __call__(self, line: str) -> None:
        self.append((time.time(), line))


def pop3_states(lines: list[str]) -> tuple[list[str], list[str], list[str]]:
    """The trace split by RFC 1939 state: before login, after it, from QUIT on."""
    auth: list[str] = []
    transaction: list[str] = []
    update: list[str] = []
    state = auth
    login_sent = False
    for line in lines:
        command = line[3:].split(" ", 1)[0].upper() if line.startswith("C: ") else ""
        if command == "QUIT" and state is transaction:
            state = update
        state.append(line)
        if command in POP3_LOGIN_COMMANDS:
            login_sent = True
        elif state is auth and login_sent and line.startswith("S: +OK"):
            state = transaction
    return auth, transaction, update
