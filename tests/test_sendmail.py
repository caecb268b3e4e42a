"""`postroom sendmail`: arguments, -t/-f/-i, Bcc removal, completed headers, exit codes."""

from __future__ import annotations

import email
import email.utils
import io
import os
import subprocess
import sys
from email.message import Message
from pathlib import Path

import pytest

from postroom import cli
from postroom.client import sendmail
from postroom.client.sendmail import UsageError, parse_args
from postroom.config import load_config
from postroom.queue.envelope import Envelope
from postroom.queue.queuefile import open_content
from postroom.queue.store import QueueStore
from postroom.store.factory import open_store

HOST = "mx.corp.example"


def queued_message(store: QueueStore, queue_id: str) -> bytes:
    """The message in a queue file, past its envelope line."""
    f, _ = open_content(store.message_path(queue_id))
    with f:
        return f.read()


@pytest.fixture(autouse=True)
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(cli.DATA_ENV, raising=False)
    folder = tmp_path / "var"
    folder.mkdir()
    (folder / "postroom.toml").write_text(f'hostname = "{HOST}"\ndomains = ["corp.example"]\n')
    return folder


def run(
    capsys: pytest.CaptureFixture[str], *argv: str, stdin: bytes = b""
) -> tuple[int, str, str]:
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        code = cli.main(["sendmail", *argv])
    finally:
        sys.stdin = sys.__stdin__
    out, err = capsys.readouterr()
    return code, out, err


def queued(data: Path) -> list[tuple[Envelope, bytes]]:
    store = QueueStore(data / "queue")
    return [(e, queued_message(store, e.queue_id)) for e in store.list()]


def only(data: Path) -> tuple[Envelope, bytes, Message]:
    items = queued(data)
    assert len(items) == 1
    envelope, raw = items[0]
    return envelope, raw, email.message_from_bytes(raw)


def test_recipients_from_arguments_and_headers_added(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    code, out, err = run(capsys, "-f", "boss@Corp.Example", "bob@ISP.example, carol@isp.example",
                         "root", stdin=b"Subject: hi\n\nline one\nline two\n")
    assert (code, out, err) == (0, "", "")
    envelope, raw, msg = only(data)
    assert envelope.sender == "boss@corp.example"
    assert [r.address for r in envelope.recipients] == [
        "bob@isp.example", "carol@isp.example", f"root@{HOST}"
    ]
    assert envelope.size == len(raw)
    assert envelope.body == "7BIT"
    assert envelope.extra == {"submitted_by": "sendmail"}
    # LF became CRLF everywhere, and the body is intact
    assert b"\n" not in raw.replace(b"\r\n", b"")
    assert raw.endswith(b"\r\n\r\nline one\r\nline two\r\n")
    # RFC 6409 8: the missing Date, Message-ID and From were added; a Received trace too
    assert msg["Subject"] == "hi"
    assert email.utils.parsedate_to_datetime(msg["Date"]) is not None
    assert msg["Message-ID"].endswith(f"@{HOST}>")
    assert msg["From"] == "boss@corp.example"
    assert msg["Received"].startswith(f"by {HOST} (postroom sendmail, uid {os.getuid()})")
    assert envelope.queue_id in msg["Received"]


def test_default_sender_is_the_invoking_user_when_mail_to_them_is_delivered(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    user = sendmail.invoking_user()
    directory = open_store(load_config(data).store).users
    directory.add_user(f"{user}@corp.example", "a-long-enough-secret")
    directory.close()
    assert run(capsys, "-F", "The Boss", "bob@isp.example", stdin=b"\nbody\n")[0] == 0
    envelope, raw, msg = only(data)
    # The host name is not a local domain here: the first local domain is.
    assert envelope.sender == f"{user}@corp.example"
    assert email.utils.parseaddr(msg["From"]) == ("The Boss", f"{user}@corp.example")
    assert envelope.auth_user == user
    assert raw.endswith(b"\r\n\r\nbody\r\n")


@pytest.mark.parametrize("users_db", [False, True], ids=["no-directory", "not-a-user"])
def test_default_sender_is_the_postmaster_when_the_user_has_no_mailbox(
    capsys: pytest.CaptureFixture[str], data: Path, users_db: bool
) -> None:
    # Its bounces must reach someone: root@localhost dropped them (RFC 5321 4.5.1).
    if users_db:
        directory = open_store(load_config(data).store).users
        directory.add_user("someone-else@corp.example", "a-long-enough-secret")
        directory.close()
    assert run(capsys, "bob@isp.example", stdin=b"\nbody\n")[0] == 0
    envelope, _raw, msg = only(data)
    assert envelope.sender == "postmaster@corp.example"
    assert msg["From"] == "postmaster@corp.example"
    assert envelope.auth_user == sendmail.invoking_user()


def test_existing_headers_are_kept_not_doubled(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    message = (b"From: Someone <someone@corp.example>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
               b"Message-ID: <own@corp.example>\r\nSubject: s\r\n\r\nbody\r\n")
    assert run(capsys, "bob@isp.example", stdin=message)[0] == 0
    _envelope, raw, msg = only(data)
    assert msg.get_all("From") == ["Someone <someone@corp.example>"]
    assert msg.get_all("Date") == ["Mon, 1 Jan 2024 00:00:00 +0000"]
    assert msg.get_all("Message-ID") == ["<own@corp.example>"]
    assert raw.endswith(message[message.index(b"From:"):])


def test_t_reads_to_cc_bcc_and_strips_bcc(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    message = (
        b"To: Bob <bob@isp.example>, carol@isp.example\n"
        b"Cc: dave@other.example\n"
        b"Bcc: secret@hidden.example,\n"
        b"  also-secret@hidden.example\n"
        b"Subject: team\n"
        b"\n"
        b"Bcc: this body line stays\n"
    )
    assert run(capsys, "-t", "-f", "boss@corp.example", "extra@isp.example", stdin=message)[0] == 0
    envelope, raw, msg = only(data)
    assert [r.address for r in envelope.recipients] == [
        "extra@isp.example", "bob@isp.example", "carol@isp.example", "dave@other.example",
        "secret@hidden.example", "also-secret@hidden.example",
    ]
    assert msg["Bcc"] is None
    assert b"secret@hidden" not in raw.split(b"\r\n\r\n", 1)[0]
    assert raw.endswith(b"\r\n\r\nBcc: this body line stays\r\n")
    assert msg["To"] == "Bob <bob@isp.example>, carol@isp.example"


def test_t_prefers_resent_headers(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    message = (b"To: old@isp.example\nResent-To: new@isp.example\nResent-Bcc: hid@isp.example\n"
               b"\nbody\n")
    assert run(capsys, "-t", stdin=message)[0] == 0
    envelope, raw, _msg = only(data)
    assert [r.address for r in envelope.recipients] == ["new@isp.example", "hid@isp.example"]
    assert b"Resent-Bcc" not in raw


def test_a_lone_dot_ends_input_unless_i(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    message = b"Subject: dots\n\nbefore\n.\nafter\n"
    assert run(capsys, "bob@isp.example", stdin=message)[0] == 0
    _env, raw, _msg = only(data)
    assert raw.endswith(b"\r\n\r\nbefore\r\n")
    QueueStore(data / "queue").remove(_env.queue_id)
    for flag in ("-i", "-oi"):
        assert run(capsys, flag, "bob@isp.example", stdin=message)[0] == 0
        env, raw, _msg = only(data)
        assert raw.endswith(b"\r\n\r\nbefore\r\n.\r\nafter\r\n")
        QueueStore(data / "queue").remove(env.queue_id)


def test_a_dot_in_the_header_section_ends_input(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    assert run(capsys, "bob@isp.example", stdin=b"Subject: x\n.\nignored\n")[0] == 0
    _env, raw, msg = only(data)
    assert msg["Subject"] == "x" and b"ignored" not in raw


def test_message_without_headers(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    assert run(capsys, "bob@isp.example", stdin=b"just a line of text\nand more")[0] == 0
    _env, raw, msg = only(data)
    assert msg["From"] and msg["Date"]
    assert raw.endswith(b"\r\n\r\njust a line of text\r\nand more\r\n")


def test_crlf_input_is_kept(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    assert run(capsys, "bob@isp.example", stdin=b"Subject: x\r\n\r\na\r\nb\r\n")[0] == 0
    _env, raw, _msg = only(data)
    assert b"Subject: x\r\n" in raw and raw.endswith(b"\r\n\r\na\r\nb\r\n")
    assert b"\r\r" not in raw


def test_null_sender_and_dsn_options(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    code, _, _ = run(capsys, "-f", "<>", "-N", "success,delay", "-R", "hdrs", "-V", "ENV42",
                     "-B", "8bitmime", "-odi", "-oem", "-oQ/tmp", "-L", "x", "bob@isp.example",
                     stdin="Subject: Grüße\n\nÄ\n".encode())
    assert code == 0
    env, _raw, msg = only(data)
    assert env.sender == ""
    assert env.recipients[0].notify == ("SUCCESS", "DELAY")
    assert (env.ret, env.envid, env.body) == ("HDRS", "ENV42", "8BITMIME")
    # The invoking user has no mailbox here: From names the default sender, the postmaster.
    assert msg["From"] == "postmaster@corp.example"


def test_8bit_body_is_noted(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    assert run(capsys, "bob@isp.example", stdin="Subject: x\n\nÄpfel\n".encode())[0] == 0
    assert only(data)[0].body == "8BITMIME"


def test_verbose_names_the_queue_id(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    code, _, err = run(capsys, "-v", "bob@isp.example", stdin=b"\nx\n")
    assert code == 0
    env = only(data)[0]
    assert err == f"postroom sendmail: queued as {env.queue_id}; the server is not running\n"


@pytest.mark.parametrize(
    ("argv", "stdin", "code", "message"),
    [
        ([], b"Subject: x\n\n", 64, "no recipients"),
        (["-t"], b"Subject: no one\n\n", 64, "no recipients"),
        (["not an address@@"], b"\n", 64, "invalid recipient address"),
        (["-f", "bad@@sender", "bob@isp.example"], b"\n", 64, "invalid sender address"),
        (["-q", "bob@isp.example"], b"\n", 64, "option -q not recognized"),
        (["-bs"], b"", 64, "-bs is not supported"),
        (["-N", "sometimes", "bob@isp.example"], b"\n", 64, "-N must be never"),
        (["-R", "most", "bob@isp.example"], b"\n", 64, "-R must be full or hdrs"),
        (["-f"], b"", 64, "option -f requires argument"),
    ],
)
def test_usage_errors(
    capsys: pytest.CaptureFixture[str], data: Path, argv: list[str], stdin: bytes, code: int,
    message: str,
) -> None:
    got, out, err = run(capsys, *argv, stdin=stdin)
    assert got == code
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("postroom sendmail: error: ")
    assert message in err
    assert queued(data) == []


def test_too_large_is_a_data_error(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    (data / "postroom.toml").write_text(
        f'hostname = "{HOST}"\n[smtp]\nmax_message_size = "1K"\n'
    )
    code, _, err = run(capsys, "bob@isp.example", stdin=b"Subject: big\n\n" + b"x" * 2000 + b"\n")
    assert code == 65
    assert "larger than the limit of 1024 octets" in err
    assert queued(data) == []
    assert list((data / "queue" / "messages").iterdir()) == []  # no temp file left


def test_config_error_is_temporary(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    (data / "postroom.toml").write_text("hostname = [\n")
    code, _, err = run(capsys, "bob@isp.example", stdin=b"\n")
    assert code == 75
    assert err.startswith("postroom sendmail: error: ") and "invalid TOML" in err


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_queue_is_temporary(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    (data / "queue").mkdir(mode=0o500)
    try:
        code, _, err = run(capsys, "bob@isp.example", stdin=b"\n")
    finally:
        (data / "queue").chmod(0o700)
    assert code == 75 and "cannot queue the message" in err


def test_unwritable_queue_is_temporary_any_user(
    capsys: pytest.CaptureFixture[str], data: Path
) -> None:
    (data / "queue").write_text("a file where the folder should be")
    code, _, err = run(capsys, "bob@isp.example", stdin=b"\n")
    assert code == 75
    assert err.startswith("postroom sendmail: error: cannot queue the message")


def test_help_and_newaliases(capsys: pytest.CaptureFixture[str], data: Path) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "-t" in out and "usage: postroom sendmail" in out
    assert run(capsys, "-bi")[0] == 0
    assert run(capsys, "-I")[0] == 0
    assert queued(data) == []


def test_data_option_inside_sendmail_arguments(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    other = tmp_path / "other"
    assert run(capsys, "--data", str(other), "bob@isp.example", stdin=b"\nx\n")[0] == 0
    assert len(QueueStore(other / "queue").list()) == 1


def test_parse_args_forms() -> None:
    opts = parse_args(["-fboss@corp.example", "-oi", "-t", "-F", "Boss", "a@b.example",
                       "-odb", "c@d.example"])
    assert opts.sender == "boss@corp.example"
    assert opts.ignore_dots and opts.extract
    assert opts.full_name == "Boss"
    assert opts.recipients == ["a@b.example", "c@d.example"]
    assert parse_args(["-r", "x@y.example"]).sender == "x@y.example"
    assert parse_args(["-N", "NEVER"]).notify == ("NEVER",)
    assert parse_args(["--", "-odd@corp.example"]).recipients == ["-odd@corp.example"]
    with pytest.raises(UsageError):
        parse_args(["-N", "never,success"])


def test_real_stdin_through_the_console_script(data: Path) -> None:
    message = b"To: bob@isp.example\nBcc: hidden@isp.example\nSubject: pipe\n\nhello\n"
    result = subprocess.run(
        [sys.executable, "-m", "postroom", "--data", str(data), "sendmail", "-t", "-oi"],
        input=message, capture_output=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    envelope, raw, msg = only(data)
    assert [r.address for r in envelope.recipients] == ["bob@isp.example", "hidden@isp.example"]
    assert msg["Bcc"] is None and raw.endswith(b"\r\n\r\nhello\r\n")
