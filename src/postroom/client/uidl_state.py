"""`postroom fetch`'s memory of what it downloaded: UIDLs per account, in a file kept atomically.

With --keep, a message whose UIDL (RFC 1939 7) is recorded is not stored
again; without it, such a message is deleted now (its earlier DELE was lost
with its session). A UIDL is recorded only once its message is durable.
"""

from __future__ import annotations

from pathlib import Path

from postroom.client.connect import ClientError
from postroom.store.atomic import atomic_write

STATE_NAME = ".postroom-fetch-uidls"
STATE_HEADER = "# postroom fetch: messages already downloaded, one per line: UIDL ACCOUNT\n"


class SeenUIDLs:
    """UIDLs of messages already downloaded, per account, in a file rewritten atomically.

    One line per message: the UIDL (RFC 1939 7: no spaces in it), a space,
    the account ("pop3://user@host"), so that one state file may serve
    several accounts.
    """

    def __init__(self, path: Path, account: str) -> None:
        self.path = path
        self.account = account
        self._others: list[str] = []  # lines of other accounts, kept as they are
        self.uids: dict[str, None] = {}  # this account's, in order

    def load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise ClientError(f"cannot read the state file {self.path}: {exc}",
                              kind="usage") from None
        for line in text.splitlines():
            if not line.strip() or line.startswith("#"):
                continue
            uid, _, account = line.partition(" ")
            if account == self.account:
                self.uids[uid] = None
            else:
                self._others.append(line)

    def __contains__(self, uid: object) -> bool:
        return uid in self.uids

    def add(self, uid: str) -> None:
        self.uids[uid] = None
        self.save()

    def keep_only(self, uids: set[str]) -> None:
        """Forget UIDLs not in `uids` (gone from the server); saves when something changed."""
        gone = [u for u in self.uids if u not in uids]
        for uid in gone:
            del self.uids[uid]
        if gone:
            self.save()

    def save(self) -> None:
        lines = [*self._others, *(f"{uid} {self.account}" for uid in self.uids)]
        data = (STATE_HEADER + "".join(f"{line}\n" for line in lines)).encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, data, mode=0o600)
        except OSError as exc:
            raise ClientError(f"cannot write the state file {self.path}: {exc}",
                              kind="usage") from None
