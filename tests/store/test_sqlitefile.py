"""Processes that open a new SQLite file at the same moment all get a WAL connection."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from postroom.store import sqlitefile

ROUNDS = 40  # before the retry, about one open in four failed "database is locked"


def _open(path: Path) -> None:
    conn = sqlitefile.connect(path, 5.0)
    conn.execute("CREATE TABLE IF NOT EXISTS t (x)")
    conn.close()


def test_two_processes_opening_a_new_file_at_once(tmp_path: Path) -> None:
    fork = multiprocessing.get_context("fork")
    for round_ in range(ROUNDS):
        path = tmp_path / f"{round_}.db"
        barrier = fork.Barrier(2)
        procs = [fork.Process(target=_after, args=(barrier, path)) for _ in range(2)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        assert [p.exitcode for p in procs] == [0, 0], f"round {round_}"
        conn = sqlitefile.connect(path, 5.0)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        conn.close()


def _after(barrier: multiprocessing.synchronize.Barrier, path: Path) -> None:
    barrier.wait()
    _open(path)
