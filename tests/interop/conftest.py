"""Fixtures that start postroom and a private Postfix on loopback for interop tests.

`postroom` is one server per test module (tests tell their messages apart by a
token); `postroom_factory` makes servers of a test's own; `private_postfix`
makes Postfix instances. Every process is stopped by PID at teardown.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mailharness import Dnsmasq, HarnessError, Postroom, PrivateExim, PrivatePostfix

HOSTNAME = "mx.corp.example"
DOMAIN = "corp.example"
USERS = {
    "boss@corp.example": "boss-secret",
    "alice@corp.example": "alice-secret",
}
ALIASES = {"team@corp.example": ["boss@corp.example", "alice@corp.example"]}


def _postroom_importable() -> None:
    import importlib.util

    if importlib.util.find_spec("postroom") is None and not (
        Path(__file__).resolve().parents[2] / "src" / "postroom"
    ).is_dir():
        pytest.fail("postroom is neither installed nor found in src/")


class _Servers:
    """Starts servers and remembers them, so teardown can stop every one."""

    def __init__(self, base: Path, peer_missing: Callable[[str], None]) -> None:
        self.base = base
        self.peer_missing = peer_missing
        self.postrooms: list[Postroom] = []
        self.postfixes: list[PrivatePostfix] = []
        self.cleanup: list[Path] = []

    def postroom(self, *, start: bool = True, **options: Any) -> Postroom:
        _postroom_importable()
        options.setdefault("hostname", HOSTNAME)
        options.setdefault("domains", [DOMAIN])
        options.setdefault("users", dict(USERS))
        options.setdefault("aliases", dict(ALIASES))
        root = self.base / f"postroom{len(self.postrooms)}"
        root.mkdir()
        server = Postroom(root, **options)
        self.postrooms.append(server)
        if not start:
            return server
        try:
            server.start()
        except HarnessError as exc:
            problem = str(exc)
        else:
            return server
        pytest.fail(f"postroom did not start: {problem}", pytrace=False)

    def postfix(self, **options: Any) -> PrivatePostfix:
        reason = PrivatePostfix.unavailable_reason()
        if reason is not None:
            self.peer_missing(reason)
        # Not under pytest's temp folder: every pytest run (another one in
        # parallel, too) makes that 0700 again, which locks out the postfix user.
        root = Path(tempfile.mkdtemp(prefix="postroom-postfix-"))
        self.cleanup.append(root)
        (self.base / f"postfix{len(self.postfixes)}").symlink_to(root)
        instance = PrivatePostfix(root, **options)
        self.postfixes.append(instance)
        try:
            instance.start()
        except HarnessError as exc:
            problem = str(exc)
        else:
            return instance
        pytest.fail(f"private postfix did not start: {problem}", pytrace=False)

    def close(self) -> None:
        for server in self.postrooms:
            server.stop()
        for instance in self.postfixes:
            instance.stop()
        for folder in self.cleanup:
            shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def _module_servers(
    tmp_path_factory: pytest.TempPathFactory, peer_missing: Callable[[str], None]
) -> Iterator[_Servers]:
    servers = _Servers(tmp_path_factory.mktemp("interop-module"), peer_missing)
    yield servers
    servers.close()


@pytest.fixture
def _test_servers(tmp_path: Path, peer_missing: Callable[[str], None]) -> Iterator[_Servers]:
    servers = _Servers(tmp_path, peer_missing)
    yield servers
    servers.close()


@pytest.fixture(scope="module")
def postroom(_module_servers: _Servers) -> Postroom:
    """A running postroom (SMTP listener only) shared by the tests of one module.

    Domain corp.example, users boss@ and alice@, alias team@ -> both.
    """
    return _module_servers.postroom()


@pytest.fixture
def postroom_factory(_test_servers: _Servers) -> Callable[..., Postroom]:
    """Make postroom servers of this test's own: `postroom_factory(start=True, **Postroom args)`."""
    return _test_servers.postroom


@pytest.fixture
def private_postfix(_test_servers: _Servers) -> Callable[..., PrivatePostfix]:
    """Start a private Postfix: `private_postfix(relayhost=(host, port), tls_level=...)`.

    Skips (fails in CI) when Postfix or root is missing.
    """
    return _test_servers.postfix


@pytest.fixture
def dnsmasq_factory(
    tmp_path: Path, require_peer: Callable[..., str]
) -> Iterator[Callable[..., Dnsmasq]]:
    """Start dnsmasq with record options (`--mx-host=...`, `--host-record=...`).

    `dnsmasq_factory(*options)` returns the running Dnsmasq (its `port`);
    every instance is stopped at teardown. Skips (fails in CI) without dnsmasq.
    """
    require_peer("dnsmasq")
    started: list[Dnsmasq] = []

    def start(*options: str) -> Dnsmasq:
        server = Dnsmasq(tmp_path / f"dnsmasq{len(started)}", *options)
        started.append(server)
        try:
            server.start()
        except HarnessError as exc:
            pytest.fail(str(exc), pytrace=False)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def private_exim(
    peer_missing: Callable[[str], None]
) -> Iterator[Callable[..., PrivateExim]]:
    """Set up private Exims: `private_exim(relay=(host, port), tls=False)`.

    Skips (fails in CI) when Exim, root or the Debian-exim user is missing. The
    folder is not pytest's temp folder, which is 0700 and locks the exim user out.
    """
    reason = PrivateExim.unavailable_reason()
    if reason is not None:
        peer_missing(reason)
    roots: list[Path] = []

    def make(**options: Any) -> PrivateExim:
        root = Path(tempfile.mkdtemp(prefix="postroom-exim-"))
        roots.append(root)
        instance = PrivateExim(root, **options)
        instance.setup()
        return instance

    yield make
    for root in roots:
        shutil.rmtree(root, ignore_errors=True)
