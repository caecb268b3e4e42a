"""What postroom's relay client hands a real Postfix: lines over 998 octets.

A private Postfix files what it receives in a Maildir (virtual(8)); the tests
read the octets it kept. Postfix cuts lines at its line_length_limit (2048)
on input and joins them again on delivery, so a line sent whole would be
stored whole: the Maildir shows what went over the wire (with LF line ends,
Postfix's local convention).

Long lines: the client folds long header lines at blanks and breaks long body
lines with CRLF SP, as Postfix's own smtp_line_length_limit does, with BDAT
(RFC 3030) and with DATA alike (RFC 5321 4.5.3.1.6).
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
from mailharness import LOOPBACK, PrivatePostfix

from postroom.delivery.smtp_out import ClientSession, Hop, OutRecipient, TransactionResult

pytestmark = pytest.mark.interop

PF_USER = "user"
PF_RCPT = f"{PF_USER}@pf.example"
SMITH = "smith@isp.example"


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
    # This Postfix offers no STARTTLS: the context is never used.
    session = await ClientSession.connect(hop, helo="mail.isp.example",
                                          tls_context=ssl.create_default_context(),
                                          command_timeout=30)
    async with session:
        return await session.send(sender=SMITH, recipients=[OutRecipient(PF_RCPT)],
                                  message=message, size=size)


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
