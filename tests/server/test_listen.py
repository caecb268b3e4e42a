"""Accepting connections: the kernel queues as many as LISTEN_BACKLOG says (not the event
loop's default), and `postroom serve` runs with its soft open files limit at the hard one.

The backlog is read as the kernel reports it: `ss` (iproute2) shows a listening
socket's backlog in its Send-Q column.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from inprocess import free_port
from postroom.config import load_config
from postroom.control import CONTROL_BACKLOG, CONTROL_SOCKET
from postroom.server.main import LISTEN_BACKLOG, start

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ss, /proc")

WAIT = 30.0
# Below any hard limit the server could meet, so that raising it shows.
LOW_SOFT_LIMIT = 256


def somaxconn() -> int:
    return int(Path("/proc/sys/net/core/somaxconn").read_text())



def tcp_backlog(ss: str, port: int) -> int:
    """The backlog of the socket listening on 127.0.0.1:`port`, as the kernel has it."""
    out = subprocess.run([ss, "-ltnH", "src", f"127.0.0.1:{port}"], check=True,
                         capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines() if line.strip()]
    assert len(rows) == 1, out
    return int(rows[0][2])  # State Recv-Q Send-Q Local Peer


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = fd.readlink().name
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:["):-1]))
    return inodes


def test_every_listener_queues_the_configured_backlog(
    tmp_path: Path, loop_factory: Callable[[], asyncio.AbstractEventLoop],
    require_peer: Callable[..., str],
) -> None:
    ss = require_peer("ss")
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\n'
        '[listen]\nsmtp = "127.0.0.1:0"\npop3 = "127.0.0.1:0"\n'
    )
    config = load_config(tmp_path)

    async def backlogs() -> dict[str, int]:
        running = await start(config)
        try:
            return {name: tcp_backlog(ss, running.address(name)[1])
                    for name in running.servers}
        finally:
            await running.stop(grace=1)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        seen = runner.run(backlogs())
    expected = min(LISTEN_BACKLOG, somaxconn())
    assert seen == {"smtp": expected, "pop3": expected}


def serve(tmp_path: Path) -> tuple[subprocess.Popen[bytes], dict[str, int], Path]:
    """`postroom serve` with a worker, started under a low soft open files limit."""
    ports = {"smtp": free_port(), "submission": free_port()}
    (tmp_path / "postroom.toml").write_text(
        'hostname = "mx.corp.example"\ndomains = ["corp.example"]\nworkers = 2\n[listen]\n'
        + "".join(f'{name} = "127.0.0.1:{port}"\n' for name, port in ports.items())
    )
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard <= LOW_SOFT_LIMIT:
        pytest.skip(f"the hard open files limit ({hard}) leaves nothing to raise")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LOW_SOFT_LIMIT, hard))

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "postroom", "--data", str(tmp_path), "serve"],
            stdout=subprocess.DEVNULL, stderr=out, preexec_fn=low_soft_limit,
        )
    deadline = time.monotonic() + WAIT
    while proc.poll() is None and "postroom ready" not in log.read_text():
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no 'postroom ready' in {WAIT}s:\n{log.read_text()}")
        time.sleep(0.05)
    assert proc.poll() is None, log.read_text()
    return proc, ports, log


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        assert proc.wait(WAIT) == 0
    finally:
        proc.kill()
        proc.wait()


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])  # Max open files SOFT HARD files
    raise AssertionError(f"no open files line in /proc/{pid}/limits")


def test_serve_raises_the_soft_open_files_limit_in_every_process(tmp_path: Path) -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    proc, _ports, log = serve(tmp_path)
    try:
        workers = children_of(proc.pid)
        assert len(workers) == 1
        assert {pid: soft_open_files(pid) for pid in (proc.pid, *workers)} == \
            {proc.pid: hard, workers[0]: hard}
        assert log.read_text().count(f"open files limit: {hard}\n") == 1
    finally:
        stop(proc)


def test_serve_listens_with_its_backlogs(
    tmp_path: Path, require_peer: Callable[..., str],
) -> None:
    """uvloop, a worker, submission taken last by the primary (server.acceptor), and the
    control socket: the kernel holds each listener's own backlog."""
    ss = require_peer("ss")
    proc, ports, _log = serve(tmp_path)
    try:
        expected = min(LISTEN_BACKLOG, somaxconn())
        assert {name: tcp_backlog(ss, port) for name, port in ports.items()} == \
            {name: expected for name in ports}
        # The primary's listening Unix socket is the control socket (its bound name
        # may be a /proc/self/fd path: see control.SUN_PATH_MAX).
        out = subprocess.run([ss, "-xlnH"], check=True, capture_output=True,
                             text=True).stdout
        inodes = socket_inodes(proc.pid)
        control = [r for r in (line.split() for line in out.splitlines())
                   if len(r) > 5 and r[4].endswith("/" + CONTROL_SOCKET)
                   and int(r[5]) in inodes]
        assert len(control) == 1, out
        assert int(control[0][3]) == CONTROL_BACKLOG  # Netid State Recv-Q Send-Q Local Inode
    finally:
        stop(proc)
