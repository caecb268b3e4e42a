"""Sizes of messages whose Maildir names do not say them: read from the file, exact."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.protocol.pop3_server import POP3Server, POP3ServerConfig, Retrieve, Snapshot
from postroom.store.maildrop import Maildrop, file_sent_size


def sent_by_the_core(message: bytes) -> bytes:
    """What RETR sends for `message`, un-stuffed, without the status and "." lines."""
    core = POP3Server(POP3ServerConfig(allow_plaintext_auth=True))
    core.greeting()
    core.receive_data(b"USER a\r\n")
    core.next_event()
    core.ok()
    core.receive_data(b"PASS b\r\n")
    core.next_event()
    core.login_succeeded(Snapshot.of([(len(message), "u1")]))
    core.data_to_send()
    core.receive_data(b"RETR 1\r\n")
    assert isinstance(core.next_event(), Retrieve)
    core.send_message(message)
    body = core.data_to_send().partition(b"\r\n")[2]
    assert body.endswith(b".\r\n")
    lines = body[:-3].split(b"\r\n")[:-1]
    return b"".join((ln[1:] if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)


PIECES = st.sampled_from([b"a", b".", b"\r", b"\n", b"\r\n", b"\n\n", b"xyz"])


@settings(max_examples=200, deadline=None)
@given(st.lists(PIECES, max_size=40).map(b"".join))
def test_sent_size_is_what_retr_sends(message: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m"
        path.write_bytes(message)
        size, crlf = file_sent_size(path)
    assert size == len(sent_by_the_core(message))
    assert crlf == (message.count(b"\n") == message.count(b"\r\n") == message.count(b"\r"))


def test_a_crlf_split_between_reads_is_not_a_bare_lf(tmp_path: Path) -> None:
    message = b"x" * (256 * 1024 - 1) + b"\r\n" + b"end\r\n"
    (tmp_path / "m").write_bytes(message)
    assert file_sent_size(tmp_path / "m") == (len(message), True)


def test_maildrop_lists_foreign_lf_files_with_their_size_as_sent(tmp_path: Path) -> None:
    """Names from other MDAs (no W=; S= of the stored file, or nothing): LIST must
    still say what RETR will send (RFC 1939 5, 11)."""
    for sub in ("new", "cur", "tmp"):
        (tmp_path / sub).mkdir()
    lf = b"Subject: lf\n\nbody\n"
    (tmp_path / "new" / f"1.M1P1.other,S={len(lf)}").write_bytes(lf)
    (tmp_path / "new" / "2.M2P2.other").write_bytes(lf)
    crlf = lf.replace(b"\n", b"\r\n")
    (tmp_path / "new" / "3.M3P3.other").write_bytes(crlf)
    drop = Maildrop.open(tmp_path)
    try:
        assert [(size, drop.crlf(n)) for n, size in enumerate(drop.sizes, 1)] == [
            (len(crlf), False), (len(crlf), False), (len(crlf), True)
        ]
        for number in (1, 2, 3):
            assert b"".join(drop.read_chunks(number) or []) in (lf, crlf)
    finally:
        drop.close()
