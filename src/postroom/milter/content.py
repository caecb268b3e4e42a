"""A received message as filters see it and change it: header fields, body pieces, the rewrite.

The message is read back from its `Incoming` a block at a time (a large one
lives in a spool file, read in a worker thread), so memory holds the header
section (bounded by the SMTP server's header limits) and one block, never the
whole message. A filter's header changes and new body make a new `Incoming`:
the edited header section, then the old body streamed across or the new body
from a temporary file (in memory while small).
"""

from __future__ import annotations

import asyncio
import re
import tempfile
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass

from postroom.protocol.header_limits import MAX_HEADER_SECTION
from postroom.protocol.milter_client import (
    AddHeader,
    ChangeHeader,
    InsertHeader,
    Modification,
    header_field,
    header_value,
)
from postroom.store.api import Incoming

BLOCK = 256 * 1024  # read from the stored message per worker-thread hop
# The header section read before the rest counts as body: twice the SMTP server's
# limit, so a section it let through is always whole here.
MAX_SECTION = 2 * MAX_HEADER_SECTION
# A new body (SMFIR_REPLBODY) is held in memory up to this size, then in a temporary file.
BODY_IN_MEMORY = 512 * 1024
_FIELD_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+[ \t]*:")  # RFC 5322 3.6.8, 4.5 (WSP)


@dataclass
class Field:
    """One header field: its name and its octets as stored (folded lines, CRLF)."""

    name: str
    raw: bytes

    @property
    def value(self) -> str:
        """As filters get it (milter_client.header_value)."""
        return header_value(self.raw.split(b":", 1)[1])


@dataclass
class Section:
    """The header section of a message: its fields, and where its body starts."""

    fields: list[Field]
    separator: bytes  # the empty line that ends the section (b"" when none)
    size: int  # octets of fields and separator: the body starts here


def parse_section(data: bytes, complete: bool) -> Section | None:
    """The header section at the start of `data`; None when more data is needed
    (unless `complete`: `data` is the whole message). It ends at the empty line or
    at the first line that is no field, as postroom.protocol.header_limits sees it."""
    fields: list[Field] = []
    pos = 0
    while True:
        nl = data.find(b"\n", pos)
        if nl < 0:
            if not complete and len(data) < MAX_SECTION:
                return None
            line = data[pos:]
            if line and line[:1] in (b" ", b"\t") and fields and not _is_empty(line):
                fields[-1].raw += line  # a last folded line without its line end
                return Section(fields, b"", len(data))
            return Section(fields, b"", pos)
        line = data[pos : nl + 1]
        if _is_empty(line):
            return Section(fields, line, nl + 1)
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].raw += line
        else:
            m = _FIELD_NAME.match(line)
            if m is None:
                return Section(fields, b"", pos)
            name = m.group(0)[:-1].rstrip(b" \t").decode("utf-8", "surrogateescape")
            fields.append(Field(name, line))
        pos = nl + 1
        if pos >= MAX_SECTION:
            return Section(fields, b"", pos)


def _is_empty(line: bytes) -> bool:
    return line in (b"\r\n", b"\n")


def edit_fields(fields: Sequence[Field], edits: Sequence[Modification]) -> list[Field]:
    """The fields after a filter's header changes, in the order it made them: add at the
    end, insert at an index (0: first), change or delete (empty value) the index-th field
    of a name, adding it when there are fewer (as Sendmail and Postfix do)."""
    out = list(fields)
    for edit in edits:
        if isinstance(edit, AddHeader):
            out.append(Field(edit.name, header_field(edit.name, edit.value)))
        elif isinstance(edit, InsertHeader):
            out.insert(min(edit.index, len(out)), Field(edit.name,
                                                        header_field(edit.name, edit.value)))
        elif isinstance(edit, ChangeHeader):
            seen = 0
            for i, f in enumerate(out):
                if f.name.lower() == edit.name.lower():
                    seen += 1
                    if seen == max(edit.index, 1):
                        if edit.value:
                            out[i] = Field(f.name, header_field(f.name, edit.value))
                        else:
                            del out[i]
                        break
            else:
                if edit.value:
                    out.append(Field(edit.name, header_field(edit.name, edit.value)))
    return out


async def blocks(message: Incoming) -> AsyncGenerator[bytes, None]:
    """The stored message (without its head) in pieces of about BLOCK octets, read in a
    worker thread (a spooled message is read from disk)."""
    chunks = message.chunks()
    while True:
        block = await asyncio.to_thread(_gather, chunks)
        if not block:
            return
        yield block


def _gather(chunks: Iterator[bytes]) -> bytes:
    out: list[bytes] = []
    size = 0
    for chunk in chunks:
        out.append(chunk)
        size += len(chunk)
        if size >= BLOCK:
            break
    return b"".join(out)


class NewBody:
    """A body a filter sends in pieces (SMFIR_REPLBODY): in memory while small."""

    def __init__(self) -> None:
        spooled = tempfile.SpooledTemporaryFile  # closed by close()
        self.file: tempfile.SpooledTemporaryFile[bytes] = spooled(max_size=BODY_IN_MEMORY)
        self.size = 0

    def write(self, data: bytes) -> None:
        self.file.write(data)
        self.size += len(data)

    def read(self) -> Iterator[bytes]:
        """BLOCKING (it may read a file)."""
        self.file.seek(0)
        while piece := self.file.read(BLOCK):
            yield piece

    def close(self) -> None:
        self.file.close()


async def rewrite(old: Incoming, new: Incoming, section: Section, fields: Sequence[Field],
                  body: NewBody | None) -> None:
    """Write into `new` the message `old` with `fields` for its header section and
    `body` (None: the old one) after it. OSError from the store."""
    new.write(b"".join(f.raw for f in fields))
    new.write(section.separator or (b"\r\n" if body is not None else b""))
    if body is not None:
        pieces = body.read()
        while piece := await asyncio.to_thread(next, pieces, b""):
            new.write(piece)
        return
    skip = section.size
    async for block in blocks(old):
        if skip >= len(block):
            skip -= len(block)
            continue
        new.write(block[skip:] if skip else block)
        skip = 0
