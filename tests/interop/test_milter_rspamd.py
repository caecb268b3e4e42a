"""rspamd's proxy worker as a milter on postroom's MX listener: its verdicts reach the client.

GTUBE is refused with rspamd's own 554 5.7.1 (SMFIR_REPLYCODE), a soft reject
is a 451, "add header" and "rewrite subject" change the stored message, and a
clean message gets rspamd's X-Spamd-Result header. The proxy negotiates no
replies before the end of the headers (SMFIP_NR_*): these pass only if the
client core does not wait for answers it was told it will not get.
"""

from __future__ import annotations

import email.utils
import smtplib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mailharness import Dnsmasq, HarnessError, Postroom
from milterpeers import ADD_HEADER, GTUBE, REWRITE_SUBJECT, SOFT_REJECT, Rspamd

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def rspamd(tmp_path_factory: pytest.TempPathFactory,
           require_peer: Callable[..., str]) -> Iterator[Rspamd]:
    require_peer("rspamd")
    require_peer("dnsmasq")
    root = tmp_path_factory.mktemp("rspamd")
    dns = Dnsmasq(root / "dns", "--local=/test/", "--local=/example/")
    dns.start()
    server = Rspamd(root, dns.port)
    try:
        server.start()
    except HarnessError as exc:
        dns.stop()
        pytest.fail(str(exc), pytrace=False)
    yield server
    server.stop()
    dns.stop()


@pytest.fixture(scope="module")
def mx(rspamd: Rspamd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postroom]:
    server = Postroom(tmp_path_factory.mktemp("mx"), users={"boss@corp.example": "secret"},
                      extra_toml=f'[milters]\nsmtp = ["{rspamd.socket}"]\n', workers=1)
    server.start()
    yield server
    server.stop()


def message(subject: str, body: str = "Hello, a plain message.") -> bytes:
    return (f"From: Alice <alice@isp.example>\r\nTo: boss@corp.example\r\n"
            f"Subject: {subject}\r\nDate: {email.utils.formatdate()}\r\n"
            f"Message-ID: {email.utils.make_msgid(domain='isp.example')}\r\n\r\n"
            f"{body}\r\n").encode()


def send(server: Postroom, data: bytes) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=60) as client:
        client.ehlo("client.example")
        client.mail("alice@isp.example")
        assert client.rcpt("boss@corp.example")[0] == 250
        try:
            return client.data(data)
        except smtplib.SMTPDataError as exc:
            return exc.smtp_code, exc.smtp_error


def stored(server: Postroom, token: str) -> bytes:
    return server.wait_for_message("boss@corp.example", token.encode())[-1]


def test_gtube_is_refused_with_rspamds_reply(mx: Postroom) -> None:
    code, text = send(mx, message("gtube", GTUBE))
    assert (code, text) == (554, b"5.7.1 Gtube pattern")
    assert not any(GTUBE.encode() in m for m in mx.messages("boss@corp.example"))


def test_a_soft_reject_is_a_451(mx: Postroom) -> None:
    code, text = send(mx, message(SOFT_REJECT))
    assert code == 451 and text.startswith(b"4.7.1"), text
    assert not any(SOFT_REJECT.encode() in m for m in mx.messages("boss@corp.example"))


def test_a_clean_message_carries_rspamds_result(mx: Postroom, tmp_path: Path) -> None:
    code, text = send(mx, message("clean-one"))
    assert code == 250, text
    head = stored(mx, "clean-one").partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Spamd-Result: default: False" in head
    assert b"X-Spam: Yes" not in head


def test_add_header_and_rewrite_subject(mx: Postroom) -> None:
    assert send(mx, message(ADD_HEADER))[0] == 250
    head = stored(mx, ADD_HEADER).partition(b"\r\n\r\n")[0]
    assert b"\r\nX-Spam: Yes" in head
    assert send(mx, message(REWRITE_SUBJECT))[0] == 250
    head = stored(mx, REWRITE_SUBJECT).partition(b"\r\n\r\n")[0]
    subjects = [line for line in head.split(b"\r\n") if line.startswith(b"Subject:")]
    assert subjects == [b"Subject: *** SPAM *** " + REWRITE_SUBJECT.encode()]
