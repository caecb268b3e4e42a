"""Return-Path at final delivery: the field written, and earlier ones removed piece by piece."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from postroom.store.returnpath import ReturnPathRemover, return_path


def removed(data: bytes, *pieces: int) -> bytes:
    remover = ReturnPathRemover()
    out, pos = [], 0
    for size in [*pieces, len(data)]:
        out.append(remover.feed(data[pos : pos + size]))
        pos += size
    return b"".join(out) + remover.end()


def test_return_path_field() -> None:
    assert return_path("smith@isp.example") == b"Return-Path: <smith@isp.example>\r\n"
    assert return_path("") == b"Return-Path: <>\r\n"  # the null sender (RFC 5321 4.5.5)
    assert return_path("jörg@isp.example") == "Return-Path: <jörg@isp.example>\r\n".encode()


def test_every_return_path_field_goes_folded_lines_included() -> None:
    message = (b"Return-Path: <forged@evil.example>\r\nReceived: by x\r\n\tfolded\r\n"
               b"return-path : <also@evil.example>\r\n (comment)\r\nSubject: hi\r\n\r\n"
               b"Return-Path: <in the body, kept>\r\n")
    want = (b"Received: by x\r\n\tfolded\r\nSubject: hi\r\n\r\n"
            b"Return-Path: <in the body, kept>\r\n")
    for step in (1, 2, 5, 13, len(message)):
        assert removed(message, *[step] * (len(message) // step)) == want


def test_messages_without_return_path_pass_unchanged() -> None:
    for message in (b"Subject: x\r\n\r\nbody\r\n", b"no header at all\r\nReturn-Path: <b>\r\n",
                    b"", b"Subject: no end", b"Return-Path-Extra: <x>\n\nbody", b"Retu"):
        assert removed(message) == message
        assert removed(message, *[1] * len(message)) == message


# --- against a line-by-line reference ----------------------------------------------

_LINE = re.compile(rb"[^\n]*\n|[^\n]+$")


def reference(data: bytes) -> bytes:
    out, field = [], None
    lines = _LINE.findall(data)
    for i, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            return b"".join(out) + b"".join(lines[i:])
        if line[:1] in (b" ", b"\t"):
            if field is None:
                return b"".join(out) + b"".join(lines[i:])
        elif re.match(rb"(?i)return-path[ \t]*:", line):
            field = "drop"
        elif re.match(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:", line):
            field = "keep"
        else:
            return b"".join(out) + b"".join(lines[i:])
        if field == "keep":
            out.append(line)
    return b"".join(out)


PIECES = [b"Return-Path", b": <a@b>", b"return-path :", b"X", b":", b" ", b"\t", b"\r\n",
          b"\n", b"\r", b"body text", b"Subject: y"]


@settings(max_examples=400, deadline=None)
@given(
    parts=st.lists(st.sampled_from(PIECES), max_size=40),
    cuts=st.lists(st.integers(min_value=1, max_value=20), max_size=30),
)
def test_remover_matches_the_reference(parts: list[bytes], cuts: list[int]) -> None:
    data = b"".join(parts)
    assert removed(data, *cuts) == reference(data)
