"""A private PostgreSQL server for the tests: initdb and pg_ctl in a temporary folder, on loopback.

Run as root, the server runs as the `postgres` user (PostgreSQL refuses root),
so its folder is made outside pytest's private temp folder, in one every parent
of which `postgres` can traverse. Nothing here imports postroom.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin",
               "/usr/lib/postgresql/17/bin")
START_TIMEOUT = 60  # seconds pg_ctl -w waits for the server to accept connections


def pg_bin() -> Path | None:
    """The folder of initdb and pg_ctl, or None when PostgreSQL is not installed."""
    for folder in PG_BIN_DIRS:
        if (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivatePostgres:
    """One PostgreSQL cluster of the test run's own, trusting loopback connections."""

    def __init__(self, bindir: Path, parent: Path | None = None, fsync: bool = False) -> None:
        """`parent`: where its folder goes (the system's temp folder by default);
        `fsync`: sync as a real server does (benchmarks), not as a test's throwaway."""
        self.bindir = bindir
        self.fsync = fsync
        self.root = Path(tempfile.mkdtemp(prefix="postroom-pg-", dir=parent))
        self.root.chmod(0o755)
        self.data = self.root / "pg"
        self.sockets = self.root / "sock"
        self.sockets.mkdir()
        self.log = self.root / "pg.log"
        self.port = free_port()
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            for path in (self.root, self.sockets):
                os.chown(path, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def url_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True,
                                timeout=START_TIMEOUT + 30, check=False)
        if result.returncode != 0:
            raise subprocess.CalledProcessError(result.returncode, args, result.stdout,
                                                f"{result.stderr}\n{_tail(self.log)}")

    def init(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")

    def start(self) -> None:
        # fsync off for tests: a test cluster that a crash loses costs nothing, and
        # the tests of durability kill postroom, not the machine.
        options = (f"-p {self.port} -k {self.sockets} -c listen_addresses=127.0.0.1 "
                   f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=300")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log),
                  "-w", "-t", str(START_TIMEOUT), "-o", options, "start")

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                      "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


@contextlib.contextmanager
def private_postgres(bindir: Path, parent: Path | None = None, fsync: bool = False
                     ) -> Iterator[PrivatePostgres]:
    server = PrivatePostgres(bindir, parent, fsync)
    try:
        server.init()
        server.start()
        yield server
    finally:
        server.stop()
        server.remove()
