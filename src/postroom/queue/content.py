"""A queued message as couriers get it: its octets open for reading, and how many there are.

The queue opens its own files (QueueStore.open_content) and hands couriers a
Content, so no courier knows a queue path or the queue file's format. One
Content may be read by several at once (the local and the remote courier, an
SMTP transaction per next hop tried), each through a reader of its own:
readers read with pread(2) on a descriptor of their own, so none moves
another's position, and each stays readable after the Content is closed (a
courier's thread may still be copying when its attempt is cancelled).
"""

from __future__ import annotations

import io
import os
from typing import BinaryIO, cast


class Content:
    """`size` octets of an open file, from offset `start` to its end; owns `fd`."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        self._fd = fd
        self._start = start
        self.size = size

    def reader(self) -> BinaryIO:
        """A new stream at the message's first octet, seekable within the message;
        the caller closes it. Call it in the event loop's thread, never after close()."""
        if self._fd < 0:
            raise ValueError("the content is closed")
        return cast(BinaryIO, _Reader(os.dup(self._fd), self._start, self.size))

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self) -> Content:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Reader(io.RawIOBase):
    """A read-only stream over octets start..start+size of a descriptor it owns."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self._fd, self._start, self._size, self._pos = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._pos, os.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        """`size` octets (all that are left when negative), fewer only at the end:
        one pread(2), which allocates no more than it returns."""
        if self.closed:
            raise ValueError("I/O operation on closed file")
        left = max(0, self._size - self._pos)
        if size is not None and 0 <= size < left:
            left = size
        data = os.pread(self._fd, left, self._start + self._pos) if left else b""
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()
