"""`postroom trace`: Received headers from postroom, Postfix and others read hop by hop;
a queue ID found in the queue and in the Maildirs of a data folder."""

from __future__ import annotations

import email
import io
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from postroom import cli
from postroom.client.trace import (
    delays,
    format_hops,
    hops_of,
    parse_received,
    protocol_flags,
)
from postroom.config import load_config
from postroom.queue.envelope import Envelope, Recipient
from postroom.queue.store import QueueStore
from postroom.server.received import TraceInfo, received_header

POSTROOM_SUBMISSION = (
    "from laptop.isp.example ([127.0.0.1])\r\n"
    "\tby mail.isp.example (postroom) with ESMTPSA id 1KX9T3E0M4QZ\r\n"
    "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384)\r\n"
    "\tfor <boss@corp.example>; Mon, 01 Jan 2024 10:00:02 -0000"
)
POSTFIX_RELAY = (
    "from mail.isp.example (mail.isp.example [192.0.2.5])\r\n"
    "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)\r\n"
    "\t key-exchange X25519 server-signature RSA-PSS (2048 bits) server-digest SHA256)\r\n"
    "\t(No client certificate requested)\r\n"
    "\tby mx.corp.example (Postfix) with ESMTPS id 4TzYk52QbBz9sRk\r\n"
    "\tfor <boss@corp.example>; Mon,  1 Jan 2024 11:00:07 +0100 (CET)"
)

HEADERS_AND_BODY = (
    "From: Smith <smith@isp.example>\r\nTo: boss@corp.example\r\n"
    "Subject: quarterly report\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
    "Message-ID: <r1@isp.example>\r\n\r\nNumbers are up.\r\n"
)
MESSAGE = (
    f"Received: {POSTFIX_RELAY}\r\nReceived: {POSTROOM_SUBMISSION}\r\n{HEADERS_AND_BODY}"
).encode()


def test_postroom_header_gives_every_part() -> None:
    hop = parse_received(POSTROOM_SUBMISSION)
    assert (hop.helo, hop.client_ip, hop.client_name) == ("laptop.isp.example", "127.0.0.1", None)
    assert (hop.by, hop.software, hop.protocol) == ("mail.isp.example", "postroom", "ESMTPSA")
    assert hop.tls and hop.authenticated
    assert (hop.tls_version, hop.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert hop.queue_id == "1KX9T3E0M4QZ"
    assert hop.recipient == "boss@corp.example"
    assert hop.when == datetime(2024, 1, 1, 10, 0, 2, tzinfo=UTC)


def test_header_written_by_postroom_reads_back() -> None:
    info = TraceInfo(helo="client.example", client_ip="2001:db8::7", client_name="c.example",
                     hostname="mx.corp.example", queue_id="ABCDEFGH1234", esmtp=True,
                     tls_version=None, tls_cipher=None, authenticated=False, smtputf8=True,
                     recipient=None)
    raw = received_header(info, when=1_700_000_000).decode()
    hop = parse_received(raw.partition(":")[2])
    assert (hop.client_ip, hop.client_name, hop.protocol) == ("2001:db8::7", "c.example",
                                                             "UTF8SMTP")
    assert not hop.tls and not hop.authenticated and hop.recipient is None
    assert hop.queue_id == "ABCDEFGH1234"
    assert hop.when == datetime.fromtimestamp(1_700_000_000, UTC)


def test_postfix_header_with_tls_comment_before_by() -> None:
    hop = parse_received(POSTFIX_RELAY)
    assert (hop.helo, hop.client_name, hop.client_ip) == (
        "mail.isp.example", "mail.isp.example", "192.0.2.5")
    assert (hop.by, hop.software, hop.protocol) == ("mx.corp.example", "Postfix", "ESMTPS")
    assert (hop.tls_version, hop.tls_cipher) == ("TLSv1.3", "TLS_AES_256_GCM_SHA384")
    assert hop.tls and not hop.authenticated
    assert hop.queue_id == "4TzYk52QbBz9sRk"
    assert hop.when == datetime(2024, 1, 1, 10, 0, 7, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expect"),
    [
        # Postfix's local pickup: no from, no with.
        ("by host.example (Postfix, from userid 0) id 3F2A1; Tue, 2 Jan 2024 08:00:00 +0100",
         {"by": "host.example", "software": "Postfix", "queue_id": "3F2A1", "protocol": None}),
        # Postfix, plain SMTP from an unresolved client, authenticated-sender comment.
        ("from client (unknown [198.51.100.2]) (Authenticated sender: smith) by mx.example "
         "(Postfix) with ESMTPA id 77; Tue, 2 Jan 2024 08:00:00 +0000",
         {"helo": "client", "client_name": None, "client_ip": "198.51.100.2",
          "authenticated": True, "tls": False}),
        # Exim: the address first, helo= in the comment, TLS after the protocol.
        ("from [198.51.100.7] (helo=client.example) by mx.example with esmtpsa (TLS1.3) "
         "tls TLS_AES_256_GCM_SHA384 (Exim 4.96) (envelope-from <a@b>) id 1abcde-0001-AB "
         "for b@c; Mon, 1 Jan 2024 10:00:00 +0000",
         {"helo": "client.example", "client_ip": "198.51.100.7", "protocol": "ESMTPSA",
          "tls_version": "TLSv1.3", "tls_cipher": "TLS_AES_256_GCM_SHA384",
          "queue_id": "1abcde-0001-AB", "recipient": "b@c"}),
        # Sendmail/Gmail style TLS comment.
        ("from a.example (a.example [192.0.2.1]) by b.example with ESMTPS id x1 "
         "(version=TLS1_2 cipher=ECDHE-RSA-AES128-GCM-SHA256 bits=128/128); "
         "Mon, 1 Jan 2024 10:00:00 -0800 (PST)",
         {"tls_version": "TLSv1.2", "tls_cipher": "ECDHE-RSA-AES128-GCM-SHA256"}),
        # Nonsense never raises.
        ("garbage ((( ;;", {"by": None, "when": None, "protocol": None}),
        ("", {"by": None, "when": None}),
    ],
)
def test_other_writers_parse_leniently(value: str, expect: dict[str, object]) -> None:
    hop = parse_received(value)
    for name, wanted in expect.items():
        assert getattr(hop, name) == wanted, (name, hop)


@pytest.mark.parametrize(
    ("word", "flags"),
    [("SMTP", (False, False)), ("ESMTP", (False, False)), ("ESMTPA", (False, True)),
     ("ESMTPS", (True, False)), ("ESMTPSA", (True, True)), ("esmtpsa", (True, True)),
     ("UTF8SMTPS", (True, False)), ("UTF8SMTPSA", (True, True)), ("LMTPSA", (True, True)),
     ("HTTP", (False, False)), (None, (False, False))],
)
def test_protocol_words_of_rfc_3848_and_6531(
    word: str | None, flags: tuple[bool, bool]
) -> None:
    assert protocol_flags(word) == flags


def test_hops_are_oldest_first_with_delays_from_date() -> None:
    message = email.message_from_bytes(MESSAGE)
    hops = hops_of(message)
    assert [h.by for h in hops] == ["mail.isp.example", "mx.corp.example"]
    date = datetime(2024, 1, 1, 10, 0, tzinfo=UTC)
    assert delays(hops, date) == ["2s after Date", "5s after the previous hop"]
    lines = format_hops(hops, date)
    assert lines[0].startswith("hop 1  from ")
    assert any("ESMTPSA (TLS, AUTH)" in line for line in lines)
    assert any("id    4TzYk52QbBz9sRk" in line for line in lines)


def test_delays_say_when_clocks_disagree() -> None:
    later = parse_received("by a with SMTP id 1; Mon, 1 Jan 2024 10:05:00 +0000")
    earlier = parse_received("by b with SMTP id 2; Mon, 1 Jan 2024 10:00:00 +0000")
    date = datetime(2024, 1, 1, 10, 0, tzinfo=UTC) - timedelta(hours=2)
    assert delays([later, earlier], date) == [
        "2h 5m after Date", "-5m 0s after the previous hop (clocks differ)"]


# -- the command ----------------------------------------------------------------------


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()

    class Ctx(cli.Context):
        pass

    parser = cli.build_parser()
    args = parser.parse_args(list(argv))
    ctx = Ctx(args)
    ctx.stdout = out
    return args.func(args, ctx), out.getvalue()


def test_trace_file(tmp_path: Path) -> None:
    path = tmp_path / "report.eml"
    path.write_bytes(MESSAGE)
    code, out = run("trace", str(path))
    assert code == 0
    assert "2 hops, oldest first" in out
    assert "Subject:    quarterly report" in out
    assert out.index("mail.isp.example (postroom)") < out.index("mx.corp.example (Postfix)")
    assert "tls   TLSv1.3 TLS_AES_256_GCM_SHA384" in out
    assert "in transit 7s from its Date to the last hop" in out


def test_trace_message_without_received_headers(tmp_path: Path) -> None:
    path = tmp_path / "draft.eml"
    path.write_bytes(b"Subject: draft\r\n\r\nbody\r\n")
    code, out = run("trace", str(path))
    assert code == 0 and "no Received headers" in out


def data_folder(tmp_path: Path) -> Path:
    data = tmp_path / "var"
    data.mkdir()
    (data / "postroom.toml").write_text('hostname = "mx.corp.example"\n')
    return data


def test_trace_queue_id_in_the_queue(tmp_path: Path) -> None:
    data = data_folder(tmp_path)
    store = QueueStore(load_config(data).queue_dir)
    envelope = Envelope(queue_id="1KX9T3E0M4QZ", sender="smith@isp.example",
                        recipients=[Recipient("boss@corp.example")], created=1.0)
    queued = f"Received: {POSTROOM_SUBMISSION}\r\n{HEADERS_AND_BODY}".encode()
    store.add(envelope, [queued])
    code, out = run("trace", "--data", str(data), "1KX9T3E0M4QZ")
    assert code == 0
    assert str(store.message_path("1KX9T3E0M4QZ")) in out
    assert "1 hop, oldest first" in out and "id    1KX9T3E0M4QZ" in out


def test_trace_queue_id_of_an_earlier_hop_in_a_maildir(tmp_path: Path) -> None:
    data = data_folder(tmp_path)
    new = data / "mail" / "corp.example" / "boss" / "new"
    new.mkdir(parents=True)
    (new / "1704103207.M1P1.mx.corp.example").write_bytes(MESSAGE)
    (new / "1704103208.M2P1.mx.corp.example").write_bytes(b"Subject: other\r\n\r\nx\r\n")
    for queue_id in ("1KX9T3E0M4QZ", "4TzYk52QbBz9sRk"):  # either hop's ID finds it
        code, out = run("trace", "--data", str(data), queue_id)
        assert code == 0
        assert out.splitlines()[0].endswith("1704103207.M1P1.mx.corp.example")
        assert "2 hops" in out


def test_trace_unknown_queue_id_says_where_it_looked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = data_folder(tmp_path)
    code, out = run("trace", "--data", str(data), "0000000000AA")
    assert code == 1 and out == ""
    err = capsys.readouterr().err
    assert "no message with queue ID 0000000000AA" in err and str(data / "queue") in err


def test_trace_argument_neither_file_nor_id(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["trace", "--data", str(data_folder(tmp_path)), str(tmp_path / "no/such")])
    assert code == cli.EXIT_USAGE
    assert "no such file, and not a queue ID" in capsys.readouterr().err
