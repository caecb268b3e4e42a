"""What postroom's relay client hands a real Postfix: lines over 998 octets, and SMTPUTF8.

A private Postfix files what it receives in a Maildir (virtual(8)); the tests
read the octets it kept. Postfix cuts lines at its line_length_limit (2048)
on input and joins them again on delivery, so a line sent whole would be
stored whole: the Maildir shows what went over the wire (with LF line ends,
Postfix's local convention).

Long lines: the client folds long header lines at blanks and breaks long body
lines with CRLF SP, as Postfix's own smtp_line_length_limit does, with BDAT
(RFC 3030) and with DATA alike (RFC 5321 4.5.3.1.6).

SMTPUTF8: a message submitted with the SMTPUTF8 flag whose addresses and
header fields are ASCII needs no SMTPUTF8 (RFC 6531 3.4): it reaches a Postfix
with smtputf8_enable = no; one with a UTF-8 Subject bounces with 5.6.7.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mailcheck import new_token
from mailharness import LOOPBACK, Postroom, PrivatePostfix, submission_client

from postroom.delivery.smtp_out import ClientSession, Hop, OutRecipient, TransactionResult

pytestmark = pytest.mark.interop

PF_USER = "user"
PF_RCPT = f"{PF_USER}@pf.example"
SMITH = "smith@isp.example"
SMITH_PASSWORD = "smith-secret"


def wait_for_files(folder: Path, count: int = 1, timeout: float = 30.0) -> list[Path]:
    """Poll a Maildir's new/ until it holds `count` files."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(folder.glob("new/*")) if (folder / "new").is_dir() else []
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def mailbox_postfix(
    make: Callable[..., PrivatePostfix], **settings: str
) -> PrivatePostfix:
    return make(myhostname="mx.pf.example", mailbox_domain="pf.example",
                mailbox_users=[PF_USER], extra_main_cf=settings)


async def relay_once(hop: Hop, message: Path, size: int) -> TransactionResult:
    """Send the message file `message` once, with the relay's SMTP client session."""
    # This Postfix offers no STARTTLS: the context is never used.
    session = await ClientSession.connect(hop, helo="mail.isp.example",
                                          tls_context=ssl.create_default_context(),
                                          command_timeout=30)
    async with session:
        with message.open("rb") as stream:
            return await session.send(sender=SMITH, recipients=[OutRecipient(PF_RCPT)],
                                      message=stream, size=size)


@pytest.mark.parametrize("chunking", [True, False], ids=["bdat", "data"])
def test_long_lines_reach_postfix_folded_within_998_octets(
    private_postfix: Callable[..., PrivatePostfix], tmp_path: Path, chunking: bool
) -> None:
    # Postfix's per-peer debug log shows which command carried the message.
    settings = {"debug_peer_list": LOOPBACK, "debug_peer_level": "1"}
    if not chunking:
        settings["smtpd_discard_ehlo_keywords"] = "chunking"
    postfix = mailbox_postfix(private_postfix, **settings)
    token = new_token()
    subject = f"Subject: {token} ".encode() + b" ".join(b"word%d" % i for i in range(400))
    references = b"References: " + b"<" + b"r" * 1500 + b"@x.example>"  # no blank in reach
    body_line = bytes(range(65, 91)) * 120  # 3,120 octets without a blank
    message = (
        subject + b"\r\n" + references + b"\r\n\r\n"
        + b"short line\r\n" + body_line + b"\r\n" + b"." + b"d" * 1200 + b"\r\nend\r\n"
    )
    path = tmp_path / "long.eml"
    path.write_bytes(message)

    result = asyncio.run(relay_once(Hop(LOOPBACK, postfix.port, "mx.pf.example"), path,
                                    len(message)))
    assert result.data_reply is not None and result.data_reply.code == 250, result

    (stored,) = wait_for_files(postfix.mailbox_path(PF_USER))
    data = stored.read_bytes()
    log = postfix.log_path.read_text(errors="replace")
    assert (re.search(r"< \S+\[127\.0\.0\.1\]: BDAT \d+ LAST", log) is not None) is chunking
    # Postfix put its Received header on top; everything after it is what we sent.
    sent = data[data.index(b"Subject: "):].replace(b"\n", b"\r\n")
    assert max(len(line) for line in sent.split(b"\r\n")) <= 998
    head, _, body = sent.partition(b"\r\n\r\n")
    fields = email.message_from_bytes(head + b"\r\n\r\n", policy=email.policy.compat32)
    # Folded at blanks: RFC 5322 unfolding gives the Subject back exactly.
    unfolded = re.sub(rb"\r\n(?=[ \t])", b"", head).split(b"\r\n")
    assert unfolded[0] == subject
    # Folded at its one blank; the line after it has no blank within 998 octets,
    # so CRLF SP went in, as Postfix itself does (unfolding shows the space).
    at = len(b"References:") + 998
    assert unfolded[1] == references[:at] + b" " + references[at:]
    assert fields["References"] is not None
    assert body.split(b"\r\n") == [
        b"short line",
        body_line[:998], b" " + body_line[998:1995], b" " + body_line[1995:2992],
        b" " + body_line[2992:],
        # A line starting with a period keeps its DATA form (dot doubled) within 998.
        b"." + b"d" * 996, b" " + b"d" * 204,
        b"end", b"",
    ]


def test_ascii_message_flagged_smtputf8_reaches_a_postfix_without_it(
    postroom_factory: Callable[..., Postroom],
    private_postfix: Callable[..., PrivatePostfix],
) -> None:
    postfix = mailbox_postfix(private_postfix, smtputf8_enable="no")
    isp = postroom_factory(
        hostname="mail.isp.example", domains=["isp.example"],
        users={SMITH: SMITH_PASSWORD}, aliases={}, listeners=("smtp", "submission"),
        extra_toml=(f'[routes]\n"pf.example" = "{LOOPBACK}:{postfix.port}"\n\n'
                    '[queue]\nretry_after = ["1s"]\ngive_up_after = "1h"\n'),
    )
    token = new_token()
    plain = (f"From: <{SMITH}>\r\nTo: <{PF_RCPT}>\r\nSubject: plain {token}\r\n"
             f"Message-ID: <{token}@isp.example>\r\n\r\nÜber 8-bit body\r\n").encode()
    utf8 = (f"From: <{SMITH}>\r\nTo: <{PF_RCPT}>\r\nSubject: Grüße {token}\r\n"
            f"Message-ID: <u{token}@isp.example>\r\n\r\nbody\r\n").encode()
    with submission_client(isp.ports["submission"], SMITH, SMITH_PASSWORD) as client:
        for message in (plain, utf8):
            refused = client.sendmail(SMITH, [PF_RCPT], message,
                                      mail_options=["SMTPUTF8", "BODY=8BITMIME"])
            assert refused == {}

    (stored,) = wait_for_files(postfix.mailbox_path(PF_USER))
    data = stored.read_bytes()
    assert f"Subject: plain {token}".encode() in data
    assert data.endswith("Über 8-bit body\n".encode())
    # The UTF-8 Subject does need SMTPUTF8: it comes back to the sender (RFC 6531 3.2).
    bounce = isp.wait_for_message(SMITH, f"u{token}".encode(), timeout=30)
    assert len(bounce) == 1, isp.output()
    report = email.message_from_bytes(bounce[0], policy=email.policy.default)
    status = next(p for p in report.walk()
                  if p.get_content_type() in ("message/delivery-status",
                                              "message/global-delivery-status"))
    assert b"Status: 5.6.7" in status.as_bytes()
    assert "Unsupported option" not in postfix.log()  # no SMTPUTF8 was ever sent to it
    assert len(wait_for_files(postfix.mailbox_path(PF_USER), count=2, timeout=0)) == 1
