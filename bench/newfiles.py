"""Names that appear in a folder, as the kernel tells them (inotify(7)), for the benchmarks.

The benchmarks stop their clock, and the relay benchmark takes each message's
latency, when a file shows up in a Maildir's new/. Polling the folder for that
costs the machine the benchmark is measuring: a listdir(2) of a folder that
grows to thousands of names, every millisecond, took about a sixth of this
2-CPU machine (perf: ext4's readdir and name hashing), and a receiver that is
short of CPU lost more to it than one that waits on timers. inotify reports
each name once, when it is created or renamed into the folder, and the
watching thread sleeps in read(2) in between.

Linux only, through ctypes (the standard library has no inotify binding).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
import time
from pathlib import Path

IN_CREATE = 0x00000100  # <sys/inotify.h>
IN_MOVED_TO = 0x00000080
IN_Q_OVERFLOW = 0x00004000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of NUL-padded name

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class NewFiles:
    """Tells the names added to `folder` (created, linked or renamed in), each once.

    The folder need not exist yet: `wait` polls for it (a stat(2) per
    millisecond) until it does, then watches it and lists what is already in.
    Names that start with "." are left out (temporary files).
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.known: set[str] = set()
        self.fd = -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> NewFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait(self, timeout: float) -> list[str]:
        """The names added since the last call; waits up to `timeout` s for at least one.

        Each name comes with no time of its own: the caller takes the clock
        when this returns, which is within the scheduler's wake-up of the
        rename that made the file visible.
        """
        if self.fd < 0:
            deadline = time.monotonic() + timeout
            while not self._watch():
                if time.monotonic() >= deadline:
                    return []
                time.sleep(0.001)
            return self._fresh(self._listing())
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return []
        data = os.read(self.fd, 1 << 16)
        names: list[str] = []
        offset = 0
        while offset < len(data):
            _, mask, _, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size
            if mask & IN_Q_OVERFLOW:  # events were dropped: the listing is the truth
                names.extend(self._listing())
            elif length:
                names.append(data[offset:offset + length].rstrip(b"\0").decode())
            offset += length
        return self._fresh(names)

    def _watch(self) -> bool:
        if not self.folder.is_dir():
            return False
        fd = _libc.inotify_init1(IN_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        if _libc.inotify_add_watch(fd, os.fsencode(self.folder), IN_CREATE | IN_MOVED_TO) < 0:
            err = ctypes.get_errno()
            os.close(fd)
            raise OSError(err, f"inotify_add_watch {self.folder}")
        self.fd = fd
        return True

    def _listing(self) -> list[str]:
        try:
            return os.listdir(self.folder)
        except FileNotFoundError:
            return []

    def _fresh(self, names: list[str]) -> list[str]:
        fresh = []
        for name in names:
            if name.startswith(".") or name in self.known:
                continue
            self.known.add(name)
            fresh.append(name)
        return fresh
