"""client.sinks: line ends and mboxrd quoting across the chunks a message arrives in.

Whole messages into a Maildir and an mbox, against a real server, are in
test_fetch.py.
"""

from __future__ import annotations

from postroom.client.sinks import LineEnds


def test_line_ends_across_chunks() -> None:
    text = b"From a\r\n>From b\r\nx From c\r\n\r\nFrom d\r\nlast"
    for step in (1, 2, 3, 5, 7, len(text)):
        lines = LineEnds(crlf=False, quote_from=True)
        out = b"".join(lines.feed(text[i : i + step]) for i in range(0, len(text), step))
        out += lines.end()
        assert out == b">From a\n>>From b\nx From c\n\n>From d\nlast\n", step
    lines = LineEnds(crlf=True, quote_from=False)
    long = b"y" * 3000 + b"\r"
    assert lines.feed(long) + lines.feed(b"\nFrom z\r\n") + lines.end() == (
        b"y" * 3000 + b"\r\nFrom z\r\n"
    )
    lines = LineEnds(crlf=False, quote_from=True)
    out = lines.feed(b"From " + b"q" * 2000) + lines.feed(b"\r\nFrom") + lines.feed(b" x\r\n")
    assert out + lines.end() == b">From " + b"q" * 2000 + b"\n>From x\n"
