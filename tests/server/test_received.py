"""The Received header we write and the hop counter that finds mail loops."""

import email

import pytest

from postroom.server.received import HopCounter, TraceInfo, received_header, with_protocol


def info(**kw: object) -> TraceInfo:
    base = dict(
        helo="client.example", client_ip="192.0.2.7", client_name=None,
        hostname="mx.corp.example", queue_id="ABCDEF123456", esmtp=True, tls_version=None,
        tls_cipher=None, authenticated=False, smtputf8=False, recipient="boss@corp.example",
    )
    base.update(kw)
    return TraceInfo(**base)  # type: ignore[arg-type]


def test_received_header_parses_and_names_the_hop() -> None:
    raw = received_header(info(), when=0.0) + b"Subject: x\r\n\r\nbody\r\n"
    msg = email.message_from_bytes(raw)
    value = " ".join(msg["Received"].split())
    assert value.startswith("from client.example ([192.0.2.7]) by mx.corp.example (postroom)")
    assert "with ESMTP id ABCDEF123456" in value
    assert "for <boss@corp.example>;" in value
    assert value.endswith("+0000") or value.endswith("-0000")
    assert all(len(line) < 998 for line in raw.split(b"\r\n"))


def test_received_header_with_tls_and_no_single_recipient() -> None:
    raw = received_header(info(tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384",
                               recipient=None, client_ip="2001:db8::1"))
    text = raw.decode()
    assert "[IPv6:2001:db8::1]" in text
    assert "with ESMTPS id" in text and "using TLSv1.3" in text
    assert "for <" not in text


@pytest.mark.parametrize(
    ("kw", "word"),
    [
        ({"esmtp": False}, "SMTP"),
        ({}, "ESMTP"),
        ({"tls_version": "TLSv1.3"}, "ESMTPS"),
        ({"tls_version": "TLSv1.3", "authenticated": True}, "ESMTPSA"),
        ({"authenticated": True}, "ESMTPA"),
        ({"smtputf8": True, "tls_version": "TLSv1.2"}, "UTF8SMTPS"),
    ],
)
def test_with_protocol_keywords(kw: dict[str, object], word: str) -> None:
    assert with_protocol(info(**kw)) == word


def count(message: bytes, piece: int) -> int:
    counter = HopCounter()
    for i in range(0, len(message), piece):
        counter.feed(message[i : i + piece])
    return counter.count


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 11, 64, 10_000])
def test_hop_counter_counts_across_any_split(piece: int) -> None:
    headers = b"".join(b"Received: from h%d by x; date\r\n" % i for i in range(7))
    message = headers + b"RECEIVED: folded\r\n continues\r\nSubject: s\r\n\r\n"
    body = b"Received: not a header, in the body\r\n" * 3
    assert count(message + body, piece) == 8


def test_hop_counter_ignores_fields_that_only_end_in_received() -> None:
    message = b"X-Received: a\r\nReceived-SPF: pass\r\nSubject: s\r\n\r\n"
    assert count(message, 5) == 0


def test_rfc5322_date_kept_per_second_is_the_same_text() -> None:
    import email.utils
    from datetime import UTC, datetime

    from postroom.server.received import rfc5322_date

    for when in (0.0, 1.5, 1_700_000_000.9, 1_700_000_001.0, 1_700_000_000.2, 1.4):
        expected = email.utils.format_datetime(datetime.fromtimestamp(int(when), UTC))
        assert rfc5322_date(when) == expected
