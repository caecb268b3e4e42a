"""The PostgreSQL schema: versioned migrations, `postroom store check`, a server that is down."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg
import pytest

from postroom.cli import main
from postroom.store.pgconnect import StoreUnavailable, connect
from postroom.store.pgschema import LATEST, SchemaTooNew, migrate, state
from postroom.store.pgstore import prepare


def run_cli(tmp_path: Path, *args: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    status = main(["--data", str(tmp_path / "var"), *args])
    out, err = capsys.readouterr()
    return status, out + err


def test_a_new_database_is_migrated_once(pg_url: str) -> None:
    with connect(pg_url) as conn:
        assert state(conn).current == 0
        assert migrate(conn).up_to_date
        assert migrate(conn).current == LATEST  # again: nothing to do
        rows = conn.execute("SELECT version FROM postroom_schema").fetchall()
    assert rows == [(v,) for v in range(1, LATEST + 1)]


def test_nodes_starting_together_migrate_each_step_once(pg_url: str) -> None:
    errors: list[BaseException] = []

    def start() -> None:
        try:
            prepare(pg_url)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM postroom_schema").fetchone() == (LATEST,)


def test_a_newer_schema_is_refused(pg_url: str) -> None:
    prepare(pg_url)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO postroom_schema (version) VALUES (%s)", (LATEST + 1,))
    with connect(pg_url) as conn, pytest.raises(SchemaTooNew, match="newer postroom"):
        migrate(conn)
    with pytest.raises(StoreUnavailable, match="newer postroom"):
        prepare(pg_url)


def test_store_check_says_whether_the_schema_is_current(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out = run_cli(tmp_path, "store", "check", "--url", pg_url, capsys=capsys)
    assert status == 1 and "no postroom schema yet" in out
    status, out = run_cli(tmp_path, "store", "migrate", "--url", pg_url, capsys=capsys)
    assert status == 0 and f"schema is current (version {LATEST})" in out
    status, out = run_cli(tmp_path, "store", "check", "--url", pg_url, capsys=capsys)
    assert status == 0 and f"schema is current (version {LATEST})" in out
    assert "postgres@" not in out  # the user (and any password) is left out


def test_store_check_reads_the_config(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "postroom.toml").write_text(f'[store]\nurl = "{pg_url}"\n')
    prepare(pg_url)
    status, out = run_cli(tmp_path, "store", "check", capsys=capsys)
    assert status == 0 and "schema is current" in out


def test_a_server_that_is_down_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://postgres@127.0.0.1:{port}/postroom"
    status, out = run_cli(tmp_path, "store", "check", "--url", url, capsys=capsys)
    assert status == 2
    assert out.count("\n") == 1 and out.startswith("postroom: error: PostgreSQL at 127.0.0.1")
    assert "Traceback" not in out
    (tmp_path / "var" / "postroom.toml").parent.mkdir(exist_ok=True)
    (tmp_path / "var" / "postroom.toml").write_text(f'[store]\nurl = "{url}"\n')
    status, out = run_cli(tmp_path, "user", "list", capsys=capsys)
    assert status == 2 and out.count("\n") == 1 and "PostgreSQL at 127.0.0.1" in out


def test_a_store_url_must_be_postgresql(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                        ) -> None:
    (tmp_path / "var").mkdir()
    (tmp_path / "var" / "postroom.toml").write_text('[store]\nurl = "mysql://x/y"\n')
    status, out = run_cli(tmp_path, "user", "list", capsys=capsys)
    assert status == 2 and "store.url" in out and "postgresql://" in out


