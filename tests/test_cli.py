"""The command line: main([...]) in a temporary folder; output, files and exit codes."""

from __future__ import annotations

import getpass
import io
import sys
import types
from pathlib import Path

import pytest

from postroom import cli
from postroom.config import Config, default_config, load_config
from postroom.store.users import SQLiteUserDirectory


@pytest.fixture(autouse=True)
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DATA_ENV, raising=False)
    return tmp_path


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: str = ""
) -> tuple[int, str, str]:
    sys.stdin = io.StringIO(stdin)
    try:
        code = cli.main(list(argv))
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("postroom: error: ")
    assert "Traceback" not in err
    return lines[0]


def test_no_subcommand_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys)
    assert code == 0
    assert "usage: postroom" in out
    for name in ("init", "serve", "domain", "user", "alias"):
        assert name in out


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["init", "--help"], ["serve", "--help"], ["domain", "--help"],
     ["domain", "add", "--help"], ["user", "add", "--help"], ["user", "passwd", "--help"],
     ["alias", "add", "--help"], ["alias", "del", "--help"]],
)
def test_help_everywhere(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, _ = run(capsys, *argv)
    assert code == 0
    assert "usage:" in out


def test_group_without_action_prints_its_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "user")
    assert code == 0
    assert "passwd" in out


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "domain", "frobnicate")
    assert code == 2
    assert "invalid choice" in err


def test_domains(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    code, out, _ = run(capsys, "domain", "add", "Corp.Example")
    assert (code, out.splitlines()[0]) == (0, "added domain corp.example")
    assert (in_tmp / "var" / "users.sqlite3").exists()
    code, out, _ = run(capsys, "domain", "list")
    assert (code, out) == (0, "corp.example\nlocalhost\n")  # localhost: the default config's
    code, _, err = run(capsys, "domain", "add", "corp.example")
    assert code == 2
    assert "already exists" in one_error_line(err)
    assert run(capsys, "domain", "del", "corp.example")[0] == 0
    assert run(capsys, "domain", "list")[1] == "localhost\n"
    code, _, err = run(capsys, "domain", "add", "not a domain")
    assert code == 2
    one_error_line(err)


def test_users(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    run(capsys, "domain", "add", "corp.example")
    code, out, _ = run(capsys, "user", "add", "Boss@Corp.Example", "--password-stdin",
                       stdin="pass word\n")
    assert (code, out) == (0, "added user boss@corp.example\n")
    directory = SQLiteUserDirectory(in_tmp / "var" / "users.sqlite3")
    assert directory.verify_password("boss@corp.example", "pass word")  # newline stripped
    assert run(capsys, "user", "list")[1] == "boss@corp.example\n"
    assert run(capsys, "user", "list", "corp.example")[1] == "boss@corp.example\n"
    code, _, _ = run(capsys, "user", "passwd", "boss@corp.example", "--password-stdin",
                     stdin="new\r\n")
    assert code == 0
    assert directory.verify_password("boss@corp.example", "new")
    code, _, err = run(capsys, "user", "add", "boss@corp.example", "--password-stdin",
                       stdin="x\n")
    assert code == 2 and "already exists" in one_error_line(err)
    assert run(capsys, "user", "del", "boss@corp.example")[0] == 0
    assert run(capsys, "user", "list")[1] == ""
    code, _, err = run(capsys, "user", "del", "boss@corp.example")
    assert code == 2 and "no such user" in one_error_line(err)
    code, _, err = run(capsys, "user", "passwd", "boss@corp.example", "--password-stdin",
                       stdin="x\n")
    assert code == 2 and "no such user" in one_error_line(err)


def test_user_in_unknown_domain(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "user", "add", "boss@corp.example", "--password-stdin",
                       stdin="pw\n")
    assert code == 2
    line = one_error_line(err)
    assert "add the domain first: postroom domain add corp.example" in line


def test_empty_stdin_password(capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "domain", "add", "corp.example")
    code, _, err = run(capsys, "user", "add", "a@corp.example", "--password-stdin", stdin="")
    assert code == 2 and "no password" in one_error_line(err)
    code, _, err = run(capsys, "user", "add", "a@corp.example", "--password-stdin", stdin="\n")
    assert code == 2 and "empty" in one_error_line(err)


def test_password_prompt(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                         in_tmp: Path) -> None:
    run(capsys, "domain", "add", "corp.example")
    answers = iter(["one", "two"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt: next(answers))
    code, _, err = run(capsys, "user", "add", "a@corp.example")
    assert code == 2 and "do not match" in one_error_line(err)
    answers = iter(["same", "same"])
    assert run(capsys, "user", "add", "a@corp.example")[0] == 0
    directory = SQLiteUserDirectory(in_tmp / "var" / "users.sqlite3")
    assert directory.verify_password("a@corp.example", "same")


def test_aliases(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    run(capsys, "domain", "add", "corp.example")
    run(capsys, "user", "add", "boss@corp.example", "--password-stdin", stdin="pw\n")
    run(capsys, "user", "add", "deputy@corp.example", "--password-stdin", stdin="pw\n")
    code, out, _ = run(capsys, "alias", "add", "Info@corp.example", "boss@corp.example",
                       "Deputy@corp.example")
    assert (code, out) == (0, "info@corp.example -> boss@corp.example, deputy@corp.example\n")
    assert run(capsys, "alias", "list")[1] == (
        "info@corp.example -> boss@corp.example, deputy@corp.example\n"
    )
    directory = SQLiteUserDirectory(in_tmp / "var" / "users.sqlite3")
    expansion = directory.expand("info@corp.example")
    assert expansion is not None
    assert expansion.mailboxes == ("boss@corp.example", "deputy@corp.example")
    assert run(capsys, "alias", "del", "info@corp.example", "deputy@corp.example")[0] == 0
    assert run(capsys, "alias", "list")[1] == "info@corp.example -> boss@corp.example\n"
    assert run(capsys, "alias", "del", "info@corp.example")[0] == 0
    assert run(capsys, "alias", "list")[1] == ""
    code, _, err = run(capsys, "alias", "add", "x@nowhere.example", "boss@corp.example")
    assert code == 2 and "postroom domain add nowhere.example" in one_error_line(err)
    code, _, err = run(capsys, "alias", "del", "x@corp.example")
    assert code == 2 and "no such alias" in one_error_line(err)


def test_data_option_before_and_after_and_env(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, in_tmp: Path
) -> None:
    assert run(capsys, "--data", "d1", "domain", "add", "one.example")[0] == 0
    assert run(capsys, "domain", "add", "two.example", "--data", "d2")[0] == 0
    assert run(capsys, "domain", "add", "--data", "d3", "three.example")[0] == 0
    monkeypatch.setenv(cli.DATA_ENV, str(in_tmp / "d4"))
    assert run(capsys, "domain", "add", "four.example")[0] == 0
    assert run(capsys, "domain", "list", "--data", "d1")[1] == "localhost\none.example\n"
    assert "two.example" in run(capsys, "--data", "d2", "domain", "list")[1]
    assert "three.example" in run(capsys, "domain", "list", "--data", "d3")[1]
    assert "four.example" in run(capsys, "domain", "list")[1]
    assert not (in_tmp / "var").exists()


def test_config_option_and_config_errors(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    (in_tmp / "alt.toml").write_text('domains = ["static.example"]\n')
    assert run(capsys, "--config", "alt.toml", "domain", "list")[1] == "static.example\n"
    assert run(capsys, "domain", "list", "--config", "alt.toml")[1] == "static.example\n"
    # The config file's domains are changed there, and the refusal names the file.
    alt = in_tmp / "alt.toml"
    code, _, err = run(capsys, "--config", "alt.toml", "domain", "add", "Static.Example")
    assert (code, one_error_line(err)) == (2, "postroom: error: domain static.example is a "
                                              f"local domain already: `domains` in {alt} "
                                              "lists it")
    code, _, err = run(capsys, "--config", "alt.toml", "domain", "del", "static.example")
    assert (code, one_error_line(err)) == (2, "postroom: error: domain static.example is "
                                              f"listed in `domains` in {alt}; remove it there")
    (in_tmp / "bad.toml").write_text('[listen]\nsmtp = "127.0.0.1:99999"\n')
    code, _, err = run(capsys, "domain", "list", "--config", "bad.toml")
    assert code == 2
    assert one_error_line(err) == (
        'postroom: error: bad.toml: listen.smtp: "127.0.0.1:99999" is not HOST:PORT '
        "(port must be 0-65535)"
    )
    code, _, err = run(capsys, "domain", "list", "--config", "missing.toml")
    assert code == 2 and "no such file" in one_error_line(err)


def test_init(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    code, out, _ = run(capsys, "init")
    assert code == 0 and "wrote var/postroom.toml" in out
    data = in_tmp / "var"
    for folder in ("mail", "spool", "queue", "tls"):
        assert (data / folder).is_dir()
    assert load_config(data) == default_config(data)
    code, _, err = run(capsys, "init")
    assert code == 2 and "--force" in one_error_line(err)
    code, _, _ = run(capsys, "init", "--force", "--hostname", "mx.corp.example",
                     "--domain", "corp.example", "--domain", "corp2.example")
    assert code == 0
    config = load_config(data)
    assert config.hostname == "mx.corp.example"
    assert config.domains == ("corp.example", "corp2.example")
    code, _, err = run(capsys, "init", "--force", "--hostname", "bad host")
    assert code == 2
    one_error_line(err)


def test_serve_makes_the_certificate_and_runs_the_server(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, in_tmp: Path
) -> None:
    seen: list[Config] = []

    def fake_run(config: Config) -> int:
        seen.append(config)
        return 7

    fake = types.ModuleType("postroom.server.main")
    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "postroom.server.main", fake)
    code, _, err = run(capsys, "serve", "--data", "srv")
    assert code == 7
    (config,) = seen
    assert config.data_dir == in_tmp / "srv"
    assert config.tls.cert.exists() and config.tls.key.exists()
    assert "self-signed" in err
    for folder in (config.mail_dir, config.spool_dir, config.queue_dir):
        assert folder.is_dir()
    # The second start reuses the certificate.
    before = config.tls.cert.read_bytes()
    assert run(capsys, "serve", "--data", "srv")[0] == 7
    assert config.tls.cert.read_bytes() == before


def test_serve_reports_config_errors(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, in_tmp: Path
) -> None:
    from postroom.config import ConfigError

    def failing_run(config: Config) -> int:
        raise ConfigError(f"{config.source}: listen.smtp: 127.0.0.1:2525 is in use")

    fake = types.ModuleType("postroom.server.main")
    fake.run = failing_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "postroom.server.main", fake)
    code, _, err = run(capsys, "serve")
    assert code == 2
    made, failed = err.splitlines()
    assert "self-signed" in made
    assert failed == "postroom: error: <default config>: listen.smtp: 127.0.0.1:2525 is in use"


def test_os_errors_are_one_line(capsys: pytest.CaptureFixture[str], in_tmp: Path) -> None:
    (in_tmp / "file").write_text("not a folder")
    code, _, err = run(capsys, "--data", "file/sub", "domain", "add", "x.example")
    assert code == 2
    one_error_line(err)
