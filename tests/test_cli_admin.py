"""The administrator's commands as a person runs them: `python -m postroom ...` in a subprocess.

Each refusal is one line on standard error (`postroom: error: ...`, exit
status 2, no traceback) that says what is wrong and what to do, and changes
nothing; each success says what it did, including where postmaster's mail goes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from postroom.config import load_config
from postroom.store.users import SQLiteUserDirectory
from postroom.tlscert import ensure_certificate

SRC = Path(__file__).resolve().parents[1] / "src"


def postroom(data: Path, *args: str, stdin: str | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real command with no terminal at all (a new session, as under cron)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(SRC), os.environ.get("PYTHONPATH")]))}
    env.pop("POSTROOM_DATA", None)
    return subprocess.run(
        [sys.executable, "-m", "postroom", "--data", str(data), *args],
        input=stdin, stdin=subprocess.DEVNULL if stdin is None else None,
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
        start_new_session=True,
    )


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one error line of a refused command (exit status 2, no traceback)."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("postroom: error: "), result.stderr
    return lines[0]


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert (result.returncode, result.stderr) == (0, ""), (result.returncode, result.stderr)
    return result.stdout


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data folder whose config lists corp.example; two users there."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
    )
    for user in ("boss", "alice"):
        ok(postroom(data, "user", "add", f"{user}@corp.example", "--password-stdin",
                    stdin="secret\n"))
    return data


def users_and_aliases(data: Path) -> tuple[list[str], dict[str, list[str]]]:
    directory = SQLiteUserDirectory(data / "users.sqlite3")
    return directory.list_users(), directory.list_aliases()


# -- passwords without a terminal -------------------------------------------------


@pytest.mark.parametrize("args", [["user", "add", "new@corp.example"],
                                  ["user", "passwd", "boss@corp.example"],
                                  ["user", "apop", "boss@corp.example", "on"]])
def test_no_terminal_and_no_password_stdin_is_one_line(data: Path, args: list[str]) -> None:
    before = users_and_aliases(data)
    line = refused(postroom(data, *args))
    assert "no terminal to ask for the" in line and "--password-stdin" in line
    assert users_and_aliases(data) == before


# -- user names -----------------------------------------------------------------------


def test_user_without_a_domain_says_so(data: Path) -> None:
    line = refused(postroom(data, "user", "add", "boss@", "--password-stdin", stdin="pw\n"))
    assert "no domain after the @" in line and "'boss@'" in line


def test_user_name_with_the_subaddress_delimiter_is_refused(data: Path) -> None:
    line = refused(postroom(data, "user", "add", "boss+tag@corp.example", "--password-stdin",
                            stdin="pw\n"))
    assert "cannot contain '+'" in line and "reaches boss@corp.example" in line
    assert "boss+tag@corp.example" not in users_and_aliases(data)[0]


# -- domains ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["1.2.3.4", "[1.2.3.4]", "mail.123"])
def test_an_ip_address_is_not_a_mail_domain(data: Path, name: str) -> None:
    line = refused(postroom(data, "domain", "add", name))
    assert "not a mail domain" in line
    assert ok(postroom(data, "domain", "list")) == "corp.example\n"


def test_an_ip_address_in_the_config_domains_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").write_text('domains = ["corp.example", "10.0.0.1"]\n')
    line = refused(postroom(tmp_path, "domain", "list"))
    assert "postroom.toml: domains: 10.0.0.1 is an IP address, not a mail domain" in line


@pytest.mark.parametrize("action", ["add", "del"])
def test_a_domain_of_the_config_file_is_managed_there(data: Path, action: str) -> None:
    line = refused(postroom(data, "domain", action, "Corp.Example"))
    assert f"{data / 'postroom.toml'}" in line and "domains" in line
    assert ok(postroom(data, "domain", "list")) == "corp.example\n"


# -- postmaster -----------------------------------------------------------------------


def test_domain_add_says_where_postmaster_goes(data: Path) -> None:
    config = data / "postroom.toml"
    config.write_text('postmaster = "boss@corp.example"\n' + config.read_text())
    out = ok(postroom(data, "domain", "add", "other.example"))
    assert out.splitlines() == [
        "added domain other.example",
        "mail to postmaster@other.example goes to the administrator's mailbox, "
        f"boss@corp.example (postmaster in {data / 'postroom.toml'})",
    ]


def test_domain_add_says_what_to_do_when_the_administrator_is_no_user(tmp_path: Path) -> None:
    out = ok(postroom(tmp_path, "domain", "add", "corp.example"))
    # No config file: the administrator is postmaster@localhost, the default's domain.
    assert "mail to postmaster@corp.example goes to the administrator's mailbox, " \
           "postmaster@localhost" in out
    assert "to read it with POP3: postroom user add postmaster@localhost" in out
    assert str(tmp_path / "mail" / "localhost" / "postmaster") in out


def test_init_names_the_administrator_and_the_next_steps(tmp_path: Path) -> None:
    out = ok(postroom(tmp_path, "init", "--domain", "corp.example", "--postmaster",
                      "Boss@Corp.Example"))
    assert load_config(tmp_path).postmaster == "boss@corp.example"
    assert "goes to the mailbox of boss@corp.example" in out
    assert "next: postroom user add boss@corp.example;" in out
    out = ok(postroom(tmp_path, "init", "--force", "--domain", "corp.example",
                      "--postmaster", "it@other.example"))
    assert "next: postroom domain add other.example; postroom user add it@other.example;" in out
    # Until other.example is local, the server will not start: its mail would be lost.
    line = refused(postroom(tmp_path, "serve"))
    assert "postmaster: it@other.example is not in a local domain" in line
    assert "postroom domain add other.example" in line


def test_the_administrators_domain_cannot_be_removed(tmp_path: Path) -> None:
    (tmp_path / "postroom.toml").write_text('postmaster = "it@other.example"\n')
    ok(postroom(tmp_path, "domain", "add", "other.example"))
    line = refused(postroom(tmp_path, "domain", "del", "other.example"))
    assert ("holds the administrator's mailbox (postmaster = it@other.example in "
            f"{tmp_path / 'postroom.toml'})") in line


# -- aliases -------------------------------------------------------------------------------


def test_alias_to_another_host_is_added_to_forward(data: Path) -> None:
    out = ok(postroom(data, "alias", "add", "ext@corp.example", "someone@gmail.com"))
    assert "note: mail for someone@gmail.com is forwarded to another host with an SRS" in out
    assert users_and_aliases(data)[1] == {"ext@corp.example": ["someone@gmail.com"]}


def test_alias_to_nobody_or_in_a_loop_is_refused_when_added(data: Path) -> None:
    line = refused(postroom(data, "alias", "add", "a@corp.example", "ghost@corp.example"))
    assert "ghost@corp.example: no such user or alias" in line
    ok(postroom(data, "alias", "add", "a@corp.example", "alice@corp.example"))
    ok(postroom(data, "alias", "add", "b@corp.example", "a@corp.example"))
    line = refused(postroom(data, "alias", "add", "a@corp.example", "b@corp.example"))
    assert "would make a loop" in line
    line = refused(postroom(data, "alias", "add", "c@corp.example", "c@corp.example"))
    assert "would make a loop" in line
    assert users_and_aliases(data)[1] == {"a@corp.example": ["alice@corp.example"],
                                          "b@corp.example": ["a@corp.example"]}


def test_alias_over_a_user_needs_force(data: Path) -> None:
    line = refused(postroom(data, "alias", "add", "Alice@corp.example", "boss@corp.example"))
    assert "alice@corp.example is a user" in line and "--force" in line
    assert users_and_aliases(data)[1] == {}
    out = ok(postroom(data, "alias", "add", "--force", "alice@corp.example",
                      "boss@corp.example"))
    assert "note: alice@corp.example is a user; its mail now goes to" in out
    out = ok(postroom(data, "alias", "add", "--force", "boss@corp.example",
                      "boss@corp.example", "alice@corp.example"))  # keeps a copy: no note
    assert out == "boss@corp.example -> boss@corp.example, alice@corp.example\n"


def test_user_del_says_which_aliases_it_leaves_without_a_mailbox(data: Path) -> None:
    ok(postroom(data, "alias", "add", "sales@corp.example", "alice@corp.example"))
    out = ok(postroom(data, "user", "del", "alice@corp.example"))
    assert "note: alias sales@corp.example now leads to no mailbox" in out
    assert "postroom alias del sales@corp.example alice@corp.example" in out


# -- TLS files -------------------------------------------------------------------------------


@pytest.fixture
def tls_data(tmp_path: Path) -> Path:
    data = tmp_path / "tls-data"
    ensure_certificate(data / "tls" / "cert.pem", data / "tls" / "key.pem", "mx.corp.example")
    ensure_certificate(data / "other" / "cert.pem", data / "other" / "key.pem", "localhost")
    (data / "tls" / "junk.pem").write_text("this is not a certificate\n")
    return data


def write_serving_config(data: Path, cert: str, key: str, workers: int) -> None:
    with socket.socket() as s:  # a port for the listener (bound for real by serve)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (data / "postroom.toml").write_text(
        f'hostname = "mx.corp.example"\ndomains = ["corp.example"]\nworkers = {workers}\n'
        f'[listen]\nsmtp = "127.0.0.1:{port}"\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    )


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("cert", "key", "expected"),
    [
        ("tls/junk.pem", "tls/key.pem",
         "tls.cert: {data}/tls/junk.pem: not a PEM certificate"),
        ("tls/cert.pem", "tls/junk.pem", "tls.key: {data}/tls/junk.pem: not a PEM private key"),
        ("tls/cert.pem", "other/key.pem",
         "tls.key: {data}/other/key.pem: does not match the certificate in "
         "{data}/tls/cert.pem"),
    ],
    ids=["not-a-certificate", "not-a-key", "key-of-another-certificate"],
)
def test_unusable_tls_files_stop_serve_with_one_line(
    tls_data: Path, workers: int, cert: str, key: str, expected: str
) -> None:
    write_serving_config(tls_data, cert, key, workers)
    line = refused(postroom(tls_data, "serve"))
    assert line.startswith(f"postroom: error: {tls_data / 'postroom.toml'}: "
                           + expected.format(data=tls_data)), line


# -- durations where 0 turns a feature off ----------------------------------------------------


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    """`postroom serve` with auth_failure_delay and delay_warning_after at 0, once it greets."""
    data = tmp_path / "zero"
    data.mkdir()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (data / "postroom.toml").write_text(
        f'domains = ["corp.example"]\nworkers = 1\n[listen]\nsmtp = "127.0.0.1:{port}"\n'
        '[queue]\ndelay_warning_after = 0\n[pop3]\nauth_failure_delay = "0s"\n'
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "postroom", "--data", str(data), "serve"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        yield data, port
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)


def banner(port: int) -> bytes:
    """The first line the server sends, waiting (up to 30 s) for it to listen."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                return conn.makefile("rb").readline()
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_zero_turns_the_delays_off_and_the_server_starts(serving: tuple[Path, int]) -> None:
    data, port = serving
    config = load_config(data)
    assert (config.pop3.auth_failure_delay, config.queue.delay_warning_after) == (0, 0)
    assert banner(port).startswith(b"220 ")
