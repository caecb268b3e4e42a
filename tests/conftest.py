"""Suite-wide fixtures: `require_peer`, which skips (or, in CI, fails) when a peer is missing,
and `loop_factory`, which runs a test on asyncio's loop and on uvloop.

Nothing here imports postroom: tests of one layer must still collect while
other layers are missing or broken.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# The suite runs as root (CI too) and starts `postroom serve` on folders of root's own:
# servers stay root there, as told (server/privileges.py). The tests of the switch to
# an unprivileged user take this out of their servers' environment.
os.environ.setdefault("POSTROOM_RUN_USER", "root")

# Debian puts mail servers and their tools (postfix, smtp-source, dovecot) in
# sbin folders, which an unprivileged user's PATH often lacks.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


def in_ci() -> bool:
    """True when the environment says this is a CI run (CI=true), where skips hide breakage."""
    return os.environ.get("CI", "").strip().lower() == "true"


def find_program(name: str) -> str | None:
    """The full path of program `name`, searching PATH and then the sbin folders."""
    found = shutil.which(name)
    if found:
        return found
    for folder in _SBIN_DIRS:
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def peer_missing(reason: str) -> None:
    """Stop the current test because a peer cannot run: fail in CI, skip elsewhere."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so a missing peer is a failure)", pytrace=False)
    pytest.skip(reason)


def require_peer(name: str, *, module: bool = False) -> str:
    """Make sure a third-party peer is available; return its path (or the module name).

    `name` is a program looked up on PATH (and in sbin folders) unless
    `module=True`, in which case it is an importable Python module. When the
    peer is missing the test is skipped, or failed when CI is "true".
    """
    if module:
        if importlib.util.find_spec(name) is None:
            peer_missing(f"Python module {name!r} is not installed")
        return name
    path = find_program(name)
    if path is None:
        peer_missing(f"program {name!r} is not installed")
        raise AssertionError("unreachable")  # pytest.skip/fail raise
    return path


@pytest.fixture(name="require_peer", scope="session")
def require_peer_fixture() -> Callable[..., str]:
    """The `require_peer(name, module=False)` function, for tests that prefer a fixture."""
    return require_peer


@pytest.fixture(name="peer_missing", scope="session")
def peer_missing_fixture() -> Callable[[str], None]:
    """The `peer_missing(reason)` function: skip, or fail when CI is "true"."""
    return peer_missing


@pytest.fixture(name="loop_factory", params=["asyncio", "uvloop"])
def loop_factory_fixture(
    request: pytest.FixtureRequest,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """An event loop factory, once asyncio's own and once uvloop's (which `serve` runs on).

    Without uvloop the uvloop case is skipped, or failed in CI: it must not vanish.
    """
    if request.param == "asyncio":
        return asyncio.new_event_loop
    try:
        import uvloop
    except ImportError:
        peer_missing("Python module 'uvloop' is not installed (postroom serve runs on it)")
        raise AssertionError("unreachable") from None  # pytest.skip/fail raise
    return uvloop.new_event_loop


# -- PostgreSQL (the store's second backend) -------------------------------------------


@pytest.fixture(name="postgres", scope="session")
def postgres_fixture() -> Iterator[Any]:
    """A private PostgreSQL server shared by the whole run (tests/pgserver.py); skipped,
    or failed in CI, when PostgreSQL is not installed."""
    from pgserver import pg_bin, private_postgres

    bindir = pg_bin()
    if bindir is None:
        peer_missing("PostgreSQL (initdb, pg_ctl) is not installed")
        raise AssertionError("unreachable")
    require_peer("psycopg", module=True)
    with private_postgres(bindir) as server:
        yield server


_databases = itertools.count(1)


@pytest.fixture(name="pg_url")
def pg_url_fixture(postgres: Any) -> str:
    """The URL of a new, empty database of the private server, this test's alone."""
    import psycopg

    name = f"t{os.getpid()}_{next(_databases)}"
    with psycopg.connect(postgres.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return str(postgres.url_for(name))
