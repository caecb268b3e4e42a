"""`postroom dovecot-config` and `postroom checkpassword` (Dovecot's checkpassword interface)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from postroom.cli import main
from postroom.cli.dovecot import EXIT_REFUSED, render_dovecot_config
from postroom.store.factory import open_store

SRC = Path(__file__).resolve().parents[1] / "src"


def checkpassword(data: Path, request: bytes, *program: str) -> subprocess.CompletedProcess[bytes]:
    """Run `postroom checkpassword PROGRAM` with `request` on descriptor 3, as Dovecot does."""
    read, write = os.pipe()
    os.write(write, request)
    os.close(write)
    try:
        return subprocess.run(
            [sys.executable, "-c", "import os, sys; os.dup2(int(sys.argv[1]), 3); "
             "from postroom.cli.dovecot import checkpassword_main; "
             "sys.argv = sys.argv[1:]; sys.exit(checkpassword_main())", str(read), *program],
            pass_fds=(read,), capture_output=True, timeout=60, check=False,
            env={**os.environ, "POSTROOM_DATA": str(data), "PYTHONPATH": str(SRC)})
    finally:
        os.close(read)


@pytest.fixture(name="data")
def data_fixture(tmp_path: Path) -> Path:
    (tmp_path / "postroom.toml").write_text('hostname = "mx.corp.example"\n'
                                            'domains = ["corp.example"]\n')
    return tmp_path


def add_user(data: Path, address: str, password: str) -> None:
    from postroom.config import load_config

    open_store(load_config(data).store).users.add_user(address, password)


def test_a_good_password_runs_the_program_with_the_users_address(data: Path) -> None:
    add_user(data, "boss@corp.example", "boss secret")
    done = checkpassword(data, b"BOSS@corp.example\0boss secret\0" + b"12345\0",
                         "/bin/sh", "-c", 'echo "user=$USER"')
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"user=boss@corp.example\n"


@pytest.mark.parametrize("request_bytes", [
    b"boss@corp.example\0wrong\0\0", b"nobody@corp.example\0boss secret\0\0",
    b"not an address\0boss secret\0\0", b"boss@corp.example", b"",
])
def test_anything_else_is_refused_without_running_the_program(data: Path,
                                                              request_bytes: bytes) -> None:
    add_user(data, "boss@corp.example", "boss secret")
    done = checkpassword(data, request_bytes, "/bin/sh", "-c", "echo ran")
    assert done.returncode == EXIT_REFUSED and done.stdout == b""


def test_the_printed_settings_name_this_data_folder(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                    ) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    code = main(["--data", str(data), "dovecot-config", "--mail-user", "nobody",
                 "--checkpassword", "/usr/bin/postroom-checkpassword"])
    assert code == 0
    text = out.getvalue()
    assert f"mail_location = maildir:{data.absolute()}/mail/%d/%n" in text
    assert f"POSTROOM_DATA={data.absolute()}" in text
    assert "args = /usr/bin/postroom-checkpassword" in text
    assert "special_use = \\Junk" in text
    assert text == render_dovecot_config(data.absolute(), "nobody",
                                         "/usr/bin/postroom-checkpassword")


def test_root_never_reads_the_mail(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data", str(data), "dovecot-config", "--mail-user", "root",
                 "--checkpassword", "/x"]) == 2
    assert "never reads mail as root" in capsys.readouterr().err
