"""A minimal SMTP sink that makes each message durable: the reference point of issue 2.

Not a server: one process, one event loop (uvloop when installed), no parsing
beyond finding each command line and the end of data, no limits, no checks. Each
message is written to DIR/tmp/, fsynced, renamed into DIR/new/ and only then
answered 250, one message after another, the way a careful single-process Python
receiver would do it. The benchmark runs it beside postroom to show the
ceiling that "fsync before 250" puts on such a receiver on the machine at hand.

    python3 bench/fsync_sink.py PORT DIR
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys

_names = itertools.count()


class Sink(asyncio.Protocol):
    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.buffer = b""
        self.in_data = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.reply(b"220 fsync-sink ESMTP")

    def reply(self, line: bytes) -> None:
        assert self.transport is not None
        self.transport.write(line + b"\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            if self.in_data:
                end = self.buffer.find(b"\r\n.\r\n")
                if end < 0:
                    return
                self.store(self.buffer[: end + 2])
                self.buffer = self.buffer[end + 5 :]
                self.in_data = False
                self.reply(b"250 2.0.0 stored")
                continue
            end = self.buffer.find(b"\r\n")
            if end < 0:
                return
            verb = self.buffer[:4].upper()
            self.buffer = self.buffer[end + 2 :]
            if verb == b"DATA":
                self.in_data = True
                self.reply(b"354 end with <CRLF>.<CRLF>")
            elif verb == b"QUIT":
                self.reply(b"221 2.0.0 bye")
                assert self.transport is not None
                self.transport.close()
                return
            elif verb == b"EHLO":
                self.reply(b"250-fsync-sink\r\n250 8BITMIME")
            else:
                self.reply(b"250 2.0.0 ok")

    def store(self, message: bytes) -> None:
        name = f"{os.getpid()}.{next(_names)}"
        tmp = os.path.join(self.folder, "tmp", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, message)
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, os.path.join(self.folder, "new", name))


async def serve(port: int, folder: str) -> None:
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Sink(folder), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:  # the benchmark's postroom install brings it
        pass
    else:
        uvloop.install()
    asyncio.run(serve(int(sys.argv[1]), sys.argv[2]))
