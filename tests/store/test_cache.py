"""Cached directory lookups see changes made by another process at once."""

import time
from pathlib import Path

from postroom.store.cache import RECHECK_AFTER, CachedLookups
from postroom.store.users import SQLiteUserDirectory


def test_cache_answers_and_notices_changes_from_another_connection(tmp_path: Path) -> None:
    db = tmp_path / "users.sqlite3"
    server_side = SQLiteUserDirectory(db)
    lookups = CachedLookups(server_side, db)
    assert not lookups.has_domain("corp.example")
    assert lookups.expand("boss@corp.example") is None

    cli_side = SQLiteUserDirectory(db)  # as `postroom domain add` would, separately
    cli_side.add_domain("corp.example")
    cli_side.add_user("boss@corp.example", "pw")
    time.sleep(RECHECK_AFTER * 2)
    assert lookups.has_domain("corp.example")
    expansion = lookups.expand("boss@corp.example")
    assert expansion is not None and expansion.mailboxes == ("boss@corp.example",)

    cli_side.remove_user("boss@corp.example")
    time.sleep(RECHECK_AFTER * 2)
    assert lookups.expand("boss@corp.example") is None
