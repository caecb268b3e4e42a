"""Free space on the filesystems that take mail, checked when a transaction starts.

A message that cannot fit on the disk fails only after the client has sent all
of it; RFC 1870 lets the client declare its size with MAIL FROM ... SIZE= so
that the server can refuse at once. `FreeSpace` answers MAIL with 452 4.3.1
(RFC 5321 4.2.2 "insufficient system storage", RFC 3463 X.3.1 "mail system
full") when the mailboxes' or the queue's filesystem has less free space than
the declared size plus a reserve, as Postfix does with queue_minfree. The
reserve alone applies when no size is declared: past it, a message of any
size may be what fills the disk.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from postroom.protocol.replies import Reply

INSUFFICIENT_STORAGE = Reply(452, "4.3.1", "Insufficient system storage")


class FreeSpace:
    """The free-space check for one data folder's mail and queue filesystems."""

    def __init__(
        self,
        paths: Sequence[Path],
        reserve: int,
        statvfs: Callable[[str], os.statvfs_result] = os.statvfs,
    ) -> None:
        self.paths = tuple(paths)
        self._names = tuple(str(path) for path in self.paths)
        self.reserve = reserve
        self._statvfs = statvfs

    def free(self) -> int:
        """Octets an unprivileged writer may still use on the fullest of the filesystems."""
        return min(self._available(name) for name in self._names)

    def check(self, declared: int | None) -> Reply | None:
        """None when a message of `declared` octets (None: not declared) fits, else 452."""
        needed = (declared or 0) + self.reserve
        if needed == 0:
            return None
        return INSUFFICIENT_STORAGE if self.free() < needed else None

    def _available(self, name: str) -> int:
        # A folder not made yet (no mail filed, nothing queued) lives on its parent's
        # filesystem. Called at every MAIL: plain strings, not pathlib.
        folder = name
        while True:
            try:
                st = self._statvfs(folder)
            except FileNotFoundError:
                parent = os.path.dirname(folder)
                if parent == folder:
                    raise FileNotFoundError(f"no folder of {name} exists") from None
                folder = parent
                continue
            return st.f_bavail * st.f_frsize
