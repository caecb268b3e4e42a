"""The user directory: domains, argon2id passwords, aliases, subaddresses, resolution.

Tests taking the `db` fixture run on both backends, the embedded SQLite file and
PostgreSQL (tests/pgserver.py); the others are about the SQLite file itself.
"""

from __future__ import annotations

import sqlite3
import stat
import threading
import unicodedata
from contextlib import closing
from pathlib import Path

import psycopg
import pytest
from argon2 import PasswordHasher

from postroom.store.api import DirectoryError, Expansion, UserDirectory
from postroom.store.expansion import MAX_ALIAS_DEPTH
from postroom.store.pgstore import prepare
from postroom.store.pgusers import PGUserDirectory
from postroom.store.users import SQLiteUserDirectory

# Tests use tiny argon2 parameters; one test checks the real defaults.
CHEAP = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)


def reopen(db: SQLiteUserDirectory, hasher: PasswordHasher = CHEAP) -> SQLiteUserDirectory:
    """A second directory on the same store, as another process (a server) opens it."""
    if isinstance(db, PGUserDirectory):
        return PGUserDirectory(db.url, hasher=hasher)
    return SQLiteUserDirectory(db.path, hasher=hasher)


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> SQLiteUserDirectory:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        prepare(url)
        directory: SQLiteUserDirectory = PGUserDirectory(url, hasher=CHEAP)
    else:
        directory = SQLiteUserDirectory(tmp_path / "users.sqlite3", hasher=CHEAP)
    directory.add_domain("corp.example")
    return directory


def sql(db: SQLiteUserDirectory, statement: str, *params: object) -> list[tuple[object, ...]]:
    """Run one statement on the store's database behind its back (SQLite's placeholders)."""
    if isinstance(db, PGUserDirectory):
        with psycopg.connect(db.url, autocommit=True) as pg:
            cur = pg.execute(statement.replace("?", "%s").encode(), params)
            return list(cur.fetchall()) if cur.description else []
    with closing(sqlite3.connect(db.path)) as conn, conn:
        return list(conn.execute(statement, params).fetchall())


def legacy_alias(db: SQLiteUserDirectory, source: str, *targets: str) -> None:
    """Store an alias without add_alias's checks: one made before them, or by another tool."""
    for position, target in enumerate(targets):
        sql(db, "INSERT INTO aliases (source, position, target) VALUES (?, ?, ?)",
            source, position, target)


def resolve(db: SQLiteUserDirectory, address: str) -> list[str] | None:
    """The addresses mail for `address` reaches; None when none (RCPT's 550)."""
    expansion = db.expand(address)
    if expansion is None or expansion.broken:
        return None
    return [*expansion.mailboxes, *expansion.remote]


def stored_hash(db: SQLiteUserDirectory, address: str) -> str:
    return str(sql(db, "SELECT password FROM users WHERE address = ?", address)[0][0])


def test_is_a_user_directory(db: SQLiteUserDirectory) -> None:
    directory: UserDirectory = db  # the Protocol is satisfied structurally
    assert directory.has_domain("corp.example")


# -- domains ---------------------------------------------------------------------


def test_domains(db: SQLiteUserDirectory) -> None:
    db.add_domain("Other.Example.")
    assert db.list_domains() == ["corp.example", "other.example"]
    assert db.has_domain("OTHER.example")
    assert not db.has_domain("nope.example")
    assert not db.has_domain("not a domain")
    with pytest.raises(DirectoryError, match="already exists"):
        db.add_domain("other.example")
    db.remove_domain("other.example")
    assert db.list_domains() == ["corp.example"]
    with pytest.raises(DirectoryError, match="no such domain"):
        db.remove_domain("other.example")
    with pytest.raises(DirectoryError):
        db.add_domain("bad_domain!")


def test_idn_domains_are_stored_as_a_labels(db: SQLiteUserDirectory) -> None:
    db.add_domain("bücher.example")
    assert "xn--bcher-kva.example" in db.list_domains()
    assert db.has_domain("BÜCHER.example")


def test_remove_domain_refused_while_it_has_users(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    with pytest.raises(DirectoryError) as e:
        db.remove_domain("corp.example")
    assert "still has 1 user" in str(e.value)
    assert "postroom user del boss@corp.example" in str(e.value)
    db.add_alias("info@corp.example", ["boss@corp.example"])
    db.remove_user("boss@corp.example")
    with pytest.raises(DirectoryError, match=r"1 alias.*postroom alias del info@corp\.example"):
        db.remove_domain("corp.example")
    db.remove_alias("info@corp.example")
    db.remove_domain("corp.example")


def test_static_domains_from_the_config(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db", static_domains=["Static.Example"], hasher=CHEAP)
    assert db.has_domain("static.example")
    assert db.list_domains() == ["static.example"]
    db.add_user("a@static.example", "pw")  # allowed without `domain add`
    with pytest.raises(DirectoryError, match="config file"):
        db.remove_domain("static.example")
    db.add_domain("db.example")
    assert db.list_domains() == ["db.example", "static.example"]


# -- users and passwords -----------------------------------------------------------


def test_unknown_domain_says_what_to_do(db: SQLiteUserDirectory) -> None:
    with pytest.raises(DirectoryError) as e:
        db.add_user("x@nope.example", "pw")
    assert "add the domain first: postroom domain add nope.example" in str(e.value)
    assert "\n" not in str(e.value)


def test_argon2id_hash_is_stored(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db")  # the real default parameters
    db.add_domain("corp.example")
    db.add_user("boss@corp.example", "correct horse")
    value = stored_hash(db, "boss@corp.example")
    assert value.startswith("$argon2id$")
    assert "correct horse" not in value
    assert db.verify_password("boss@corp.example", "correct horse")
    assert not db.verify_password("boss@corp.example", "wrong")


def test_database_file_is_private(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "users.sqlite3", hasher=CHEAP)
    db.add_domain("corp.example")
    assert stat.S_IMODE(db.path.stat().st_mode) == 0o600


def test_verify_password(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "s3cret")
    assert db.verify_password("boss@corp.example", "s3cret")
    assert not db.verify_password("boss@corp.example", "s3cret ")
    assert not db.verify_password("nobody@corp.example", "s3cret")
    assert not db.verify_password("not an address", "s3cret")


class CountingHasher(PasswordHasher):
    calls = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        CountingHasher.calls += 1
        return super().verify(hash, password)


def test_unknown_users_cost_a_hash_too(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(
        tmp_path / "u.db", hasher=CountingHasher(time_cost=1, memory_cost=8, parallelism=1)
    )
    db.add_domain("corp.example")
    CountingHasher.calls = 0
    assert not db.verify_password("nobody@corp.example", "x")
    assert not db.verify_password("nobody@elsewhere.example", "x")
    assert not db.verify_password("not an address", "x")
    assert CountingHasher.calls == 3


def test_rehash_when_parameters_change(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    old = stored_hash(db, "boss@corp.example")
    stronger = reopen(db, PasswordHasher(time_cost=2, memory_cost=16, parallelism=1))
    assert stronger.verify_password("boss@corp.example", "pw")
    new = stored_hash(db, "boss@corp.example")
    assert new != old and "m=16,t=2" in new
    assert stronger.verify_password("boss@corp.example", "pw")
    assert stored_hash(db, "boss@corp.example") == new  # no rehash when nothing changed


def test_set_password_and_remove(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "one")
    db.set_password("BOSS@corp.example", "two")
    assert not db.verify_password("boss@corp.example", "one")
    assert db.verify_password("boss@corp.example", "two")
    db.remove_user("boss@corp.example")
    assert db.list_users() == []
    with pytest.raises(DirectoryError, match="no such user"):
        db.remove_user("boss@corp.example")
    with pytest.raises(DirectoryError, match="no such user"):
        db.set_password("boss@corp.example", "x")


def test_duplicate_user(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    with pytest.raises(DirectoryError, match="already exists"):
        db.add_user("Boss@Corp.Example", "pw")


@pytest.mark.parametrize("password", ["", "a\0b", "line\nbreak", "cr\rhere", "x" * 1025])
def test_bad_passwords(db: SQLiteUserDirectory, password: str) -> None:
    with pytest.raises(DirectoryError):
        db.add_user("boss@corp.example", password)


@pytest.mark.parametrize(
    "address", ['"quoted user"@corp.example', "a/b@corp.example", "noat", "a@@corp.example"]
)
def test_bad_user_names(db: SQLiteUserDirectory, address: str) -> None:
    with pytest.raises(DirectoryError):
        db.add_user(address, "pw")


def test_case_handling(db: SQLiteUserDirectory) -> None:
    db.add_user("Boss.Man@CORP.Example", "pw")
    assert db.list_users() == ["boss.man@corp.example"]
    assert db.has_user("BOSS.MAN@corp.example")
    assert db.verify_password("bOSS.mAN@Corp.Example.", "pw")
    assert resolve(db, "BOSS.MAN@CORP.EXAMPLE") == ["boss.man@corp.example"]


def test_password_normalization(db: SQLiteUserDirectory) -> None:
    # RFC 8265 OpaqueString: composed and decomposed forms are the same password,
    # and a no-break space counts as a space.
    db.add_user("boss@corp.example", "caf\u00e9 au\u00a0lait")
    assert db.verify_password("boss@corp.example", unicodedata.normalize("NFD", "café au lait"))


def test_list_users_by_domain(db: SQLiteUserDirectory) -> None:
    db.add_domain("other.example")
    for address in ("b@corp.example", "a@corp.example", "z@other.example"):
        db.add_user(address, "pw")
    assert db.list_users() == ["a@corp.example", "b@corp.example", "z@other.example"]
    assert db.list_users("Other.Example") == ["z@other.example"]


# -- aliases and resolution ------------------------------------------------------------


def test_resolve_user_and_unknown(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    assert resolve(db, "boss@corp.example") == ["boss@corp.example"]
    assert resolve(db, "nobody@corp.example") is None
    assert resolve(db, "boss@elsewhere.example") is None  # not a local domain
    assert resolve(db, "garbage") is None


def test_aliases(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_user("deputy@corp.example", "pw")
    db.add_alias("Sales@corp.example", ["Boss@corp.example"])
    db.add_alias("sales@corp.example", ["DEPUTY@corp.example", "boss@corp.example"])
    assert db.list_aliases() == {"sales@corp.example": ["boss@corp.example",
                                                        "deputy@corp.example"]}
    assert resolve(db, "SALES@corp.example") == ["boss@corp.example", "deputy@corp.example"]
    db.remove_alias("sales@corp.example", ["Deputy@corp.example"])
    assert resolve(db, "sales@corp.example") == ["boss@corp.example"]
    with pytest.raises(DirectoryError, match="has no target"):
        db.remove_alias("sales@corp.example", ["nobody@corp.example"])
    db.remove_alias("sales@corp.example")
    assert resolve(db, "sales@corp.example") is None
    with pytest.raises(DirectoryError, match="no such alias"):
        db.remove_alias("sales@corp.example")


def test_alias_needs_a_local_source_and_valid_targets(db: SQLiteUserDirectory) -> None:
    with pytest.raises(DirectoryError, match="postroom domain add elsewhere.example"):
        db.add_alias("x@elsewhere.example", ["boss@corp.example"])
    with pytest.raises(DirectoryError):
        db.add_alias("x@corp.example", ["not an address"])
    with pytest.raises(DirectoryError):
        db.add_alias("x@corp.example", [])


def test_nested_aliases(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_user("deputy@corp.example", "pw")
    db.add_alias("team@corp.example", ["boss@corp.example", "deputy@corp.example"])
    db.add_alias("all@corp.example", ["deputy@corp.example", "team@corp.example"])
    assert resolve(db, "all@corp.example") == ["deputy@corp.example", "boss@corp.example"]


def test_stored_remote_targets_come_after_the_mailboxes(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    legacy_alias(db, "all@corp.example", "Ext@Far.example", "boss@corp.example")
    assert resolve(db, "all@corp.example") == ["boss@corp.example", "Ext@Far.example"]


def test_alias_cycles_terminate(db: SQLiteUserDirectory) -> None:
    legacy_alias(db, "a@corp.example", "b@corp.example")
    legacy_alias(db, "b@corp.example", "a@corp.example")
    assert resolve(db, "a@corp.example") is None  # nothing deliverable
    expansion = db.expand("a@corp.example")
    assert expansion is not None and expansion.broken
    assert expansion.loops == ("a@corp.example",)
    legacy_alias(db, "c@corp.example", "c@corp.example")
    assert db.expand("c@corp.example") == Expansion((), (), (), ("c@corp.example",))


def test_alias_keeping_a_copy(db: SQLiteUserDirectory) -> None:
    # The usual "forward and keep a copy": the user is a target of its own alias.
    db.add_user("boss@corp.example", "pw")
    db.add_user("home@corp.example", "pw")
    db.add_alias("boss@corp.example", ["boss@corp.example", "home@corp.example"],
                 replace_user=True)
    assert resolve(db, "boss@corp.example") == ["boss@corp.example", "home@corp.example"]


def test_alias_depth_limit(db: SQLiteUserDirectory) -> None:
    db.add_user("end@corp.example", "pw")
    chain = [f"hop{i}@corp.example" for i in range(MAX_ALIAS_DEPTH + 2)]
    for source, target in zip(chain, [*chain[1:], "end@corp.example"], strict=True):
        legacy_alias(db, source, target)
    assert resolve(db, chain[-3]) == ["end@corp.example"]
    assert resolve(db, chain[0]) is None
    expansion = db.expand(chain[0])
    assert expansion is not None and expansion.unknown
    with pytest.raises(DirectoryError, match=f"deeper than {MAX_ALIAS_DEPTH}"):
        db.add_alias("top@corp.example", [chain[2]])  # top is one alias more
    db.add_alias("top@corp.example", [chain[3]])
    assert resolve(db, "top@corp.example") == ["end@corp.example"]


def test_alias_to_unknown_local_target(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_user("gone@corp.example", "pw")
    db.add_alias("info@corp.example", ["boss@corp.example", "gone@corp.example"])
    db.remove_user("gone@corp.example")  # the alias is left pointing at no one
    assert resolve(db, "info@corp.example") == ["boss@corp.example"]
    expansion = db.expand("info@corp.example")
    assert expansion is not None
    assert expansion.mailboxes == ("boss@corp.example",)
    assert expansion.unknown == ("gone@corp.example",)


def test_subaddress(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_user("deputy@corp.example", "pw")
    db.add_alias("sales@corp.example", ["boss@corp.example", "deputy@corp.example"])
    assert resolve(db, "boss+lists@corp.example") == ["boss@corp.example"]
    assert resolve(db, "Boss+Lists+More@corp.example") == ["boss@corp.example"]
    assert resolve(db, "sales+q3@corp.example") == ["boss@corp.example", "deputy@corp.example"]
    assert resolve(db, "nobody+x@corp.example") is None
    assert resolve(db, "+x@corp.example") is None
    # An alias that exists with the "+" wins over the subaddress rule.
    db.add_alias("boss+private@corp.example", ["deputy@corp.example"])
    assert resolve(db, "boss+private@corp.example") == ["deputy@corp.example"]


# -- concurrency ---------------------------------------------------------------------


def test_a_second_process_sees_changes(db: SQLiteUserDirectory) -> None:
    server = reopen(db)  # as a long-running server would
    assert resolve(server, "new@corp.example") is None
    db.add_user("new@corp.example", "pw")  # as the CLI would, in its own connection
    assert resolve(server, "new@corp.example") == ["new@corp.example"]
    if not isinstance(db, PGUserDirectory):
        with closing(sqlite3.connect(db.path)) as conn:
            (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        assert mode == "wal"


def test_usable_from_worker_threads(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    results: list[bool] = []

    def check() -> None:
        results.append(db.verify_password("boss@corp.example", "pw"))

    threads = [threading.Thread(target=check) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 4


# -- what add_alias refuses ------------------------------------------------------------


def test_alias_to_another_host_forwards(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_alias("ext@corp.example", ["boss@corp.example", "Partner@far.example"])
    assert db.list_aliases() == {"ext@corp.example": ["boss@corp.example",
                                                      "Partner@far.example"]}
    found = db.expand("ext@corp.example")
    assert found is not None
    assert (found.mailboxes, found.remote) == (("boss@corp.example",), ("Partner@far.example",))


def test_alias_to_nobody_is_refused_and_nothing_is_stored(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    with pytest.raises(DirectoryError, match="ghost@corp.example: no such user or alias"):
        db.add_alias("info@corp.example", ["boss@corp.example", "ghost@corp.example"])
    assert db.list_aliases() == {}
    db.add_alias("info@corp.example", ["boss+info@corp.example"])  # a subaddress reaches boss
    db.add_alias("team@corp.example", ["info@corp.example"])  # so does another alias
    assert resolve(db, "team@corp.example") == ["boss@corp.example"]


def test_alias_loops_are_refused(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_alias("a@corp.example", ["boss@corp.example"])
    db.add_alias("b@corp.example", ["a@corp.example"])
    with pytest.raises(DirectoryError, match="would make a loop"):
        db.add_alias("a@corp.example", ["b@corp.example"])
    with pytest.raises(DirectoryError, match="would make a loop"):
        db.add_alias("c@corp.example", ["c@corp.example"])
    assert db.list_aliases() == {"a@corp.example": ["boss@corp.example"],
                                 "b@corp.example": ["a@corp.example"]}


def test_alias_over_a_user_takes_replace_user(db: SQLiteUserDirectory) -> None:
    db.add_user("boss@corp.example", "pw")
    db.add_user("deputy@corp.example", "pw")
    with pytest.raises(DirectoryError, match="boss@corp.example is a user.*--force"):
        db.add_alias("Boss@corp.example", ["deputy@corp.example"])
    assert resolve(db, "boss@corp.example") == ["boss@corp.example"]
    db.add_alias("boss@corp.example", ["deputy@corp.example"], replace_user=True)
    assert resolve(db, "boss@corp.example") == ["deputy@corp.example"]


# -- users and domains: names that would mislead ---------------------------------------


@pytest.mark.parametrize("address", ["boss+tag@corp.example", "+x@corp.example"])
def test_a_user_name_cannot_hold_the_subaddress_delimiter(
    db: SQLiteUserDirectory, address: str
) -> None:
    with pytest.raises(DirectoryError, match="cannot contain '\\+'"):
        db.add_user(address, "pw")
    assert db.list_users() == []


@pytest.mark.parametrize("name", ["1.2.3.4", "[1.2.3.4]", "x.example.99"])
def test_an_ip_address_is_no_local_domain(db: SQLiteUserDirectory, name: str) -> None:
    with pytest.raises(DirectoryError, match="not a mail domain"):
        db.add_domain(name)


def test_a_stored_domain_from_before_the_rule_can_still_be_removed(
    db: SQLiteUserDirectory,
) -> None:
    sql(db, "INSERT INTO domains (name, created) VALUES ('1.2.3.4', 0)")
    assert db.list_users("1.2.3.4") == []
    db.remove_domain("1.2.3.4")
    assert db.list_domains() == ["corp.example"]


def test_a_config_domain_is_neither_added_nor_removed(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db", static_domains=["corp.example"], hasher=CHEAP)
    with pytest.raises(DirectoryError, match="`domains` in the config file lists it"):
        db.add_domain("Corp.Example")
    assert db.list_domains() == ["corp.example"]
    with closing(sqlite3.connect(db.path)) as conn, conn:  # stored too, by an older version
        conn.execute("INSERT INTO domains (name, created) VALUES ('corp.example', 0)")
    with pytest.raises(DirectoryError, match="remove it there"):
        db.remove_domain("corp.example")


# -- postmaster (RFC 5321 4.5.1) -----------------------------------------------------------


@pytest.fixture
def with_admin(tmp_path: Path) -> SQLiteUserDirectory:
    db = SQLiteUserDirectory(tmp_path / "u.db", static_domains=["corp.example"],
                             hasher=CHEAP, postmaster="Boss@corp.example")
    db.add_domain("added.example")
    db.add_user("boss@corp.example", "pw")
    db.add_user("alice@corp.example", "pw")
    return db


@pytest.mark.parametrize("address", ["postmaster@corp.example", "POSTMASTER@Added.Example",
                                     "PostMaster+x@corp.example"])
def test_postmaster_of_every_local_domain_is_the_administrator(
    with_admin: SQLiteUserDirectory, address: str
) -> None:
    assert resolve(with_admin, address) == ["boss@corp.example"]
    assert resolve(with_admin, "postmaster@elsewhere.example") is None  # not ours


def test_an_alias_for_postmaster_wins_and_may_point_at_postmaster(
    with_admin: SQLiteUserDirectory,
) -> None:
    with_admin.add_alias("postmaster@added.example", ["alice@corp.example"])
    with_admin.add_alias("abuse@corp.example", ["postmaster@corp.example"])
    assert resolve(with_admin, "postmaster@added.example") == ["alice@corp.example"]
    assert resolve(with_admin, "abuse@corp.example") == ["boss@corp.example"]


def test_the_administrator_may_be_an_alias(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db", ["corp.example"], hasher=CHEAP,
                             postmaster="it@corp.example")
    db.add_user("boss@corp.example", "pw")
    db.add_user("alice@corp.example", "pw")
    db.add_alias("it@corp.example", ["boss@corp.example", "alice@corp.example"])
    assert resolve(db, "postmaster@corp.example") == ["boss@corp.example", "alice@corp.example"]


@pytest.mark.parametrize("admin", ["postmaster@corp.example", "nobody@corp.example"])
def test_postmaster_is_never_without_a_mailbox(tmp_path: Path, admin: str) -> None:
    # An administrator who is no user (yet) keeps the mail in its own mailbox folder,
    # also when the administrator is postmaster itself.
    db = SQLiteUserDirectory(tmp_path / "u.db", ["corp.example"], hasher=CHEAP,
                             postmaster=admin)
    db.add_domain("added.example")
    for address in ("postmaster@corp.example", "postmaster@added.example"):
        assert resolve(db, address) == [admin]


def test_without_an_administrator_postmaster_is_left_to_users_and_aliases(
    db: SQLiteUserDirectory,
) -> None:
    assert resolve(db, "postmaster@corp.example") is None


def test_the_administrators_domain_is_not_removed(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db", hasher=CHEAP, postmaster="it@other.example")
    db.add_domain("other.example")
    with pytest.raises(DirectoryError, match="holds the administrator's mailbox"):
        db.remove_domain("other.example")


def test_the_administrators_alias_may_not_lead_back_to_postmaster(tmp_path: Path) -> None:
    db = SQLiteUserDirectory(tmp_path / "u.db", ["corp.example"], hasher=CHEAP,
                             postmaster="it@corp.example")
    db.add_user("boss@corp.example", "pw")
    db.add_alias("it@corp.example", ["boss@corp.example"])
    with pytest.raises(DirectoryError, match="would make a loop"):
        db.add_alias("it@corp.example", ["postmaster@corp.example"])
