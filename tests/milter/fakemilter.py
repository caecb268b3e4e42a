"""A scripted filter (the milter side of the protocol) for tests: answers as told, records all.

It listens on loopback in the test's event loop. `Script` says which protocol
steps it asks to leave out or not to answer, what it answers to each command
(continue by default), and where it misbehaves: `hang` (never answers that
command), `die` (closes the connection on it), `garbage` (answers bytes that
are no packet). Everything the MTA sent is kept in `received`.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from dataclasses import dataclass, field

ALL_ACTIONS = 0x1FF
# Commands that await an answer unless the matching SMFIP_NR_* flag is negotiated.
ANSWERED = {b"C": 0x1000, b"H": 0x2000, b"M": 0x4000, b"R": 0x8000, b"T": 0x10000,
            b"L": 0x80, b"N": 0x40000, b"B": 0x80000, b"E": 0}


def pkt(code: bytes, data: bytes = b"") -> bytes:
    return struct.pack("!I", len(data) + 1) + code + data


def cstr(*values: str) -> bytes:
    return b"".join(v.encode() + b"\0" for v in values)


@dataclass
class Script:
    protocol: int = 0  # SMFIP_* flags asked for
    actions: int = ALL_ACTIONS
    answers: dict[bytes, list[bytes]] = field(default_factory=dict)  # command -> packets
    hang: bytes | None = None
    die: bytes | None = None
    garbage: bytes | None = None
    macro_lists: bytes = b""  # appended to the negotiation answer


class FakeMilter:
    def __init__(self, script: Script, unix_path: str | None = None) -> None:
        self.script = script
        self.unix_path = unix_path  # listen there instead of on a loopback port
        self.received: list[tuple[bytes, bytes]] = []
        self.sessions = 0
        self.server: asyncio.Server | None = None
        self.port = 0
        self.hung = asyncio.Event()  # set when a command went unanswered on purpose
        self.closed = asyncio.Event()  # set when a session ends (either side)

    async def start(self) -> FakeMilter:
        if self.unix_path is not None:
            self.server = await asyncio.start_unix_server(self._serve, self.unix_path)
            return self
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def socket(self) -> str:
        if self.unix_path is not None:
            return f"unix:{self.unix_path}"
        return f"inet:127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2)

    def commands(self) -> list[bytes]:
        return [code for code, _ in self.received if code != b"D"]

    def macros(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for code, data in self.received:
            if code == b"D":
                parts = data[1:].split(b"\0")[:-1]
                for name, value in zip(parts[::2], parts[1::2], strict=True):
                    out[name.decode()] = value.decode()
        return out

    def headers(self) -> list[tuple[str, str]]:
        out = []
        for code, data in self.received:
            if code == b"L":
                name, value = data.split(b"\0")[:2]
                out.append((name.decode(), value.decode()))
        return out

    def body(self) -> bytes:
        return b"".join(data for code, data in self.received if code == b"B")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        script = self.script
        try:
            while True:
                head = await reader.readexactly(4)
                (length,) = struct.unpack("!I", head)
                body = await reader.readexactly(length)
                code, data = body[:1], body[1:]
                self.received.append((code, data))
                if code == b"O":
                    writer.write(pkt(b"O", struct.pack("!III", 6, script.actions, script.protocol)
                                     + script.macro_lists))
                elif code == b"Q" or code == script.die:
                    break
                elif code == script.hang:
                    self.hung.set()
                    await reader.read()  # until the MTA gives up and closes
                    break
                elif code == script.garbage:
                    writer.write(b"\x00\x00\x00\x05Zjunk")
                elif code in ANSWERED and not script.protocol & ANSWERED[code]:
                    for answer in script.answers.get(code, [pkt(b"c")]):
                        writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            self.closed.set()
