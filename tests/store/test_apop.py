"""APOP secrets: opt-in per user, separate from the login password, removed with the user."""

from pathlib import Path

import pytest

from postroom.cli import main
from postroom.store.api import DirectoryError
from postroom.store.users import SQLiteUserDirectory


def test_apop_secret_round_trip_and_removal(tmp_path: Path) -> None:
    directory = SQLiteUserDirectory(tmp_path / "users.sqlite3")
    directory.add_domain("corp.example")
    directory.add_user("boss@corp.example", "login-password")
    assert directory.apop_secret("boss@corp.example") is None
    directory.set_apop_secret("Boss@Corp.Example", "apop-secret")
    assert directory.apop_secret("boss@corp.example") == "apop-secret"
    assert directory.verify_password("boss@corp.example", "login-password")
    directory.set_apop_secret("boss@corp.example", None)
    assert directory.apop_secret("boss@corp.example") is None
    directory.set_apop_secret("boss@corp.example", "again")
    directory.remove_user("boss@corp.example")
    directory.add_user("boss@corp.example", "new")
    assert directory.apop_secret("boss@corp.example") is None
    with pytest.raises(DirectoryError):
        directory.set_apop_secret("nobody@corp.example", "x")


def test_cli_user_apop_on_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    data = str(tmp_path)
    assert main(["--data", data, "domain", "add", "corp.example"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("pw\n"))
    assert main(["--data", data, "user", "add", "boss@corp.example", "--password-stdin"]) == 0
    monkeypatch.setattr("sys.stdin", io.StringIO("apop-secret\n"))
    assert main(["--data", data, "user", "apop", "boss@corp.example", "on",
                 "--password-stdin"]) == 0
    directory = SQLiteUserDirectory(tmp_path / "users.sqlite3")
    assert directory.apop_secret("boss@corp.example") == "apop-secret"
    assert main(["--data", data, "user", "apop", "boss@corp.example", "off"]) == 0
    assert directory.apop_secret("boss@corp.example") is None
