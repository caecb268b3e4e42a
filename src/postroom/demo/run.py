"""`postroom demo`'s entry point: the story in a temporary folder, everything stopped, a verdict.

Exit status 0 only if the body arrived byte for byte (line ends aside), the
maildrop is empty after QUIT and the receiving host refused to relay for a
stranger. Everything started is stopped before it returns, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from postroom.demo.mailbox import demo_database
from postroom.demo.output import LogTap, Printer, duration
from postroom.demo.story import BOSS, CORP, SMITH, DemoFailed, World, tell
from postroom.store.pgconnect import describe

EXIT_FAILED = 1
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM


class _Terminated(Exception):
    """SIGTERM arrived; everything is stopped already."""


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated


@contextlib.contextmanager
def _signals(handler: Callable[[int, object], None] | int) -> Iterator[None]:
    """SIGTERM (and during clean-up SIGINT) handled by `handler`; restored after."""
    names = (signal.SIGTERM,) if callable(handler) else (signal.SIGTERM, signal.SIGINT)
    saved = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for name in names:
            saved[name] = signal.signal(name, handler)
    try:
        yield
    finally:
        for name, previous in saved.items():
            signal.signal(name, previous)


async def _main(world: World, printer: Printer) -> list[str]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated: list[bool] = []
    if task is not None:
        def on_term() -> None:
            terminated.append(True)
            task.cancel()

        # Only the main thread may handle signals; elsewhere SIGTERM keeps its default.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGTERM, on_term)
    try:
        return await tell(world, printer)
    except asyncio.CancelledError:
        if terminated:
            raise _Terminated from None
        raise
    finally:
        # A second Ctrl-C or SIGTERM while stopping must not leave servers half stopped.
        stopping = asyncio.ensure_future(world.stop())
        while not stopping.done():
            try:
                await asyncio.shield(stopping)
            except asyncio.CancelledError:
                continue


def run_demo(*, keep_data: bool = False, out: TextIO | None = None,
             color: bool | None = None, store: str | None = None) -> int:
    """`postroom demo`: 0 when the message arrived intact and the maildrop is empty.
    `store`: a PostgreSQL server's URL, where the receiving host keeps its users and
    mail (in a database made for the run, dropped at the end unless `keep_data`)."""
    if store is None:
        return _run(keep_data, out, color, None)
    with demo_database(store, keep=keep_data) as url:
        status = _run(keep_data, out, color, url)
        if keep_data:
            print(f"kept the demo's database: {describe(url)}", file=out or sys.stdout)
        return status


def _run(keep_data: bool, out: TextIO | None, color: bool | None, store: str | None) -> int:
    printer = Printer(out if out is not None else sys.stdout, color)
    printer.line(f"postroom demo: one message from {SMITH} to {BOSS}, every hop on loopback")
    printer.line()
    begun = time.monotonic()
    # SIGTERM before and after the event loop runs (the loop has its own handler).
    with _signals(_raise_terminated):
        try:
            root = Path(tempfile.mkdtemp(prefix="postroom-demo-"))
        except _Terminated:
            return EXIT_TERMINATED
        world = World(root, LogTap(), store_url=store)
        try:
            with world.tap.attached():
                problems = asyncio.run(_main(world, printer))
        except DemoFailed as e:
            problems = [str(e)]
        except _Terminated:
            printer.line()
            printer.line("terminated: stopped the servers it started")
            return EXIT_TERMINATED
        except KeyboardInterrupt:
            printer.line()
            printer.line("interrupted: stopped the servers it started")
            return EXIT_INTERRUPTED
        except Exception as e:  # noqa: BLE001 - a demo reports what broke, then cleans up
            problems = [f"{type(e).__name__}: {e}"]
        finally:
            with _signals(signal.SIG_IGN):  # the folder goes, whatever arrives now
                if keep_data:
                    world.tap.write(root / "postroom.log")
                    printer.line(f"kept the demo's folder: {root}")
                else:
                    shutil.rmtree(root, ignore_errors=True)
    printer.line()
    took = time.monotonic() - begun
    if problems:
        for problem in problems:
            printer.verdict(False, problem)
        return EXIT_FAILED
    printer.verdict(True, f"the body arrived byte for byte, the maildrop on {CORP} is empty "
                    f"and relaying for strangers was refused ({duration(took)} in all)")
    return 0
