"""Standard ports without running as root (server/privileges.py, cli/system.py).

As root, in network namespaces of the tests' own (so that ports 25, 587, 465,
110 and 995 are free whatever else runs here): `postroom init --system`
prepares the account and the data folder, `postroom serve` binds the standard
ports and then runs as that account (its processes' uids, capabilities and the
files they make say so) while mail flows end to end; the same server started by
that account with only CAP_NET_BIND_SERVICE (setpriv) works too. A Python or a
source tree in a folder the account may not enter (root's home) is made
reachable in a mount namespace, as an installation outside home folders is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import poplib
import pwd
import shlex
import shutil
import smtplib
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serving import SRC, Server, children_of, client_context, message, message_ids, uid_of

from postroom.server.privileges import CAP_NET_BIND_SERVICE

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only"),
              pytest.mark.slow]

ACCOUNT = "postroom"
PORTS = {"smtp": 25, "submission": 587, "submissions": 465, "pop3": 110, "pop3s": 995}
CLONE_NEWNET = 0x40000000  # linux/sched.h


@pytest.fixture(name="tools")
def tools_fixture(require_peer: Callable[..., str],
                  peer_missing: Callable[[str], None]) -> dict[str, str]:
    if os.geteuid() != 0:
        peer_missing("needs root: binds ports below 1024, creates a system user")
    return {name: require_peer(name) for name in ("unshare", "ip", "setpriv", "mount",
                                                  "useradd")}


@pytest.fixture(name="base")
def base_fixture() -> Iterator[Path]:
    """A folder every user may search (pytest's own temp folders are root's alone)."""
    base = Path(tempfile.mkdtemp(prefix="postroom-priv-"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def blocked_ancestors(path: Path) -> list[Path]:
    """Folders above `path` that other users may not search (like /root, mode 0700)."""
    return [p for p in reversed(path.parents) if not p.stat().st_mode & 0o001]


def reachable(paths: list[Path], hold: Path) -> str:
    """Shell lines, for a private mount namespace, that let any user reach `paths`: each
    blocked folder above them is covered with a tmpfs anyone may search, and only those
    paths are bound back into it (the real folder is untouched outside the namespace)."""
    lines = ["set -e"]
    covered: dict[Path, list[Path]] = {}
    resolved = {path.resolve() for path in paths}
    for path in sorted(p for p in resolved if not any(q in p.parents for q in resolved)):
        blocked = blocked_ancestors(path.resolve())
        if blocked:
            covered.setdefault(blocked[0], []).append(path.resolve())
    for index, (folder, inside) in enumerate(covered.items()):
        keep = hold / str(index)
        keep.mkdir(parents=True, exist_ok=True)
        lines += [f"mount --bind {shlex.quote(str(folder))} {shlex.quote(str(keep))}",
                  f"mount -t tmpfs -o mode=0755 tmpfs {shlex.quote(str(folder))}"]
        for path in inside:
            rel = path.relative_to(folder)
            lines += [f"mkdir -p {shlex.quote(str(path))}",
                      f"mount --bind {shlex.quote(str(keep / rel))} {shlex.quote(str(path))}"]
    return "\n".join(lines)


def namespace(base: Path, *, network: bool) -> list[str]:
    """A command prefix: new mount (and network) namespace, loopback up, the Python and
    the source reachable by the account; then the command."""
    prefix = Path(sys.prefix)
    script = reachable([prefix, Path(sys.base_prefix), SRC, Path(sys.executable).parent],
                       base / "hold")
    if network:
        script += "\nip link set lo up"
    script += '\nexec "$@"'
    return ["unshare", "--mount", *(["--net"] if network else []), "--", "sh", "-c", script,
            "sh"]


def run(prefix: list[str], *args: str, stdin: bytes | None = None,
        ) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("POSTROOM_RUN_USER", None)
    return subprocess.run([*prefix, sys.executable, "-m", "postroom", *args], input=stdin,
                          capture_output=True, env=env, timeout=120, check=False)


def in_netns(pid: int) -> Callable[[str, int], socket.socket]:
    """connect() into the network namespace of process `pid` (setns in a thread of its own;
    the socket stays in that namespace wherever it is used)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

    def connect(host: str, port: int) -> socket.socket:
        made: list[socket.socket | BaseException] = []

        def inside() -> None:
            try:
                fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), "setns")
                finally:
                    os.close(fd)
                made.append(socket.create_connection((host, port), timeout=30))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                made.append(exc)

        thread = threading.Thread(target=inside)
        thread.start()
        thread.join()
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    return connect


class NsSMTP(smtplib.SMTP):
    def __init__(self, connect: Callable[[str, int], socket.socket], port: int) -> None:
        self._connect_in = connect
        super().__init__("127.0.0.1", port, timeout=30)

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self._connect_in(host, port)


class NsSMTPS(smtplib.SMTP_SSL):
    def __init__(self, connect: Callable[[str, int], socket.socket], port: int) -> None:
        self._connect_in = connect
        super().__init__("127.0.0.1", port, timeout=30, context=client_context())

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        return self.context.wrap_socket(self._connect_in(host, port), server_hostname=host)


class NsPOP3(poplib.POP3):
    def __init__(self, connect: Callable[[str, int], socket.socket], port: int) -> None:
        self._connect_in = connect
        super().__init__("127.0.0.1", port, timeout=30)

    def _create_socket(self, timeout: float) -> socket.socket:
        return self._connect_in(self.host, self.port)


class NsPOP3S(poplib.POP3_SSL):
    def __init__(self, connect: Callable[[str, int], socket.socket], port: int) -> None:
        self._connect_in = connect
        super().__init__("127.0.0.1", port, timeout=30, context=client_context())

    def _create_socket(self, timeout: float) -> socket.socket:
        return self.context.wrap_socket(self._connect_in(self.host, self.port),
                                        server_hostname=self.host)


def capabilities(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    raise AssertionError("no CapEff")


def prepare(base: Path, tools: dict[str, str]) -> tuple[Path, int, int]:
    """`postroom init --system` into `base`, the standard ports, a user: (data, uid, gid)."""
    data, config = base / "var", base / "etc" / "postroom.toml"
    plain = namespace(base, network=False)
    made = run(plain, "--data", str(data), "--config", str(config), "init", "--system",
               "--hostname", "mx.corp.example", "--domain", "corp.example", "--force")
    assert made.returncode == 0, made.stderr
    said = made.stdout.decode()
    assert f"wrote {config}" in said and f"given to {ACCOUNT}:{ACCOUNT}" in said
    account = pwd.getpwnam(ACCOUNT)
    text = config.read_text()
    for name, port in PORTS.items():
        default = {"smtp": 2525, "submission": 2587, "submissions": 2465, "pop3": 2110,
                   "pop3s": 2995}[name]
        text = text.replace(f'{name} = "127.0.0.1:{default}"', f'{name} = "127.0.0.1:{port}"')
    config.write_text(text.replace("workers = 0", "workers = 3"))
    assert (config.stat().st_uid, config.stat().st_gid) == (0, account.pw_gid)
    # Run by root on the account's folder: the command acts as the account.
    added = run(plain, "--data", str(data), "user", "add", "boss@corp.example",
                "--password-stdin", stdin=b"secret-pw\n")
    assert added.returncode == 0, added.stderr
    for path in (data, data / "users.sqlite3", data / "mail", data / "queue"):
        assert path.stat().st_uid == account.pw_uid, path
    return data, account.pw_uid, account.pw_gid


def mail_flows(connect: Callable[[str, int], socket.socket]) -> list[str]:
    """Mail in on 25, 587 (STARTTLS, AUTH) and 465; read back on 110 (STLS) and 995."""
    sent = []
    mid, body = message(1, "mx")
    with NsSMTP(connect, 25) as client:
        client.sendmail("someone@client.example", ["boss@corp.example"], body)
    sent.append(mid)
    mid, body = message(2, "submission")
    body = body.replace(b"From: load@client.example", b"From: boss@corp.example")
    with NsSMTP(connect, 587) as client:
        client.starttls(context=client_context())
        client.login("boss@corp.example", "secret-pw")
        client.sendmail("boss@corp.example", ["boss@corp.example"], body)
    sent.append(mid)
    mid, body = message(3, "submissions")
    body = body.replace(b"From: load@client.example", b"From: boss@corp.example")
    with NsSMTPS(connect, 465) as client:
        client.login("boss@corp.example", "secret-pw")
        client.sendmail("boss@corp.example", ["boss@corp.example"], body)
    sent.append(mid)
    reader = NsPOP3(connect, 110)
    reader.stls(client_context())
    reader.user("boss@corp.example")
    reader.pass_("secret-pw")
    assert reader.stat()[0] == 3
    reader.quit()
    reader = NsPOP3S(connect, 995)
    reader.user("boss@corp.example")
    reader.pass_("secret-pw")
    assert b"".join(reader.retr(1)[1]).count(b"Message-ID") == 1
    reader.quit()
    return sent


def test_started_as_root_it_binds_standard_ports_then_runs_as_the_account(
        base: Path, tools: dict[str, str]) -> None:
    data, uid, gid = prepare(base, tools)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("POSTROOM_RUN_USER", None)
    server = Server(data, prefix=namespace(base, network=True), env=env)
    try:
        server.ready()
        server.wait_for(rf"now running as {ACCOUNT}:{ACCOUNT} \(uid {uid}, gid {gid}\)")
        primary = server.proc.pid
        workers = children_of(primary)
        assert len(workers) == 2
        for pid in (primary, *workers):
            assert uid_of(pid) == (uid, uid, uid, uid)
        # The primary keeps only CAP_NET_BIND_SERVICE (for a reload's new listener);
        # the workers keep nothing.
        assert capabilities(primary) == 1 << CAP_NET_BIND_SERVICE
        assert all(capabilities(pid) == 0 for pid in workers)
        sent = mail_flows(in_netns(primary))
        inbox = data / "mail" / "corp.example" / "boss"
        assert set(sent) <= message_ids(inbox)
        for path in [*inbox.rglob("*"), data / "postroom.pid", data / "postroom.ctl"]:
            assert path.lstat().st_uid == uid, path
        # The control socket answers root's commands (run as the account) and reloads.
        plain = namespace(base, network=False)
        told = run(plain, "--data", str(data), "queue", "flush")
        assert b"told the server (pid %d)" % primary in told.stdout, told
        # A reload that moves POP3S to another standard port: the primary still may
        # bind it (CAP_NET_BIND_SERVICE, kept for this), though it is no longer root.
        config = base / "etc" / "postroom.toml"
        config.write_text(config.read_text().replace('pop3s = "127.0.0.1:995"',
                                                     'pop3s = "127.0.0.1:996"'))
        reloaded = run(plain, "--data", str(data), "reload")
        assert reloaded.returncode == 0, reloaded.stderr
        server.wait_for(r"reload: started worker")
        server.wait_for(r"reload: listening for pop3s on 127.0.0.1:996")
        assert all(uid_of(pid)[1] == uid for pid in children_of(primary))
        reader = NsPOP3S(in_netns(primary), 996)
        reader.user("boss@corp.example")
        reader.pass_("secret-pw")
        assert reader.stat()[0] == 3
        reader.quit()
    finally:
        assert server.stop() == 0
    assert not (data / "postroom.pid").exists()


def test_root_with_a_folder_of_root_is_refused_with_what_to_do(
        base: Path, tools: dict[str, str]) -> None:
    data, uid, _gid = prepare(base, tools)
    os.chown(data / "queue", 0, 0)
    result = run(namespace(base, network=True), "--data", str(data), "serve")
    assert result.returncode == 2
    error = result.stderr.decode().strip()
    assert error.startswith(f"postroom: error: {data / 'queue'} belongs to root, not postroom")
    assert f"chown -R postroom:postroom {data}" in error
    assert len(error.splitlines()) == 1


def test_a_non_root_user_with_cap_net_bind_service_serves_standard_ports(
        base: Path, tools: dict[str, str]) -> None:
    data, uid, gid = prepare(base, tools)
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.pop("POSTROOM_RUN_USER", None)
    as_account = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--init-groups",
                  "--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service", "--"]
    server = Server(data, prefix=[*namespace(base, network=True), *as_account], env=env)
    try:
        server.ready()
        assert "now running as" not in server.log()  # nothing to switch
        primary = server.proc.pid
        workers = children_of(primary)
        assert uid_of(primary) == (uid, uid, uid, uid)
        assert capabilities(primary) == 1 << CAP_NET_BIND_SERVICE
        assert all(capabilities(pid) == 0 and uid_of(pid)[1] == uid for pid in workers)
        sent = mail_flows(in_netns(primary))
        assert set(sent) <= message_ids(data / "mail" / "corp.example" / "boss")
    finally:
        assert server.stop() == 0


def test_a_missing_account_or_root_under_another_name_is_refused_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from postroom.config import ConfigError, load_config
    from postroom.server import privileges

    monkeypatch.delenv("POSTROOM_RUN_USER", raising=False)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    path = tmp_path / "postroom.toml"
    path.write_text('[run]\nuser = "no-such-account"\n')
    with pytest.raises(ConfigError) as missing:
        privileges.resolve(load_config(tmp_path))
    assert str(missing.value) == (
        f"{path}: run.user: there is no user 'no-such-account' on this system; create it "
        '(`postroom init --system` does), or set it to "root" to keep running as root')
    with pytest.raises(ConfigError, match=r"--user: 'toor' is root \(uid 0\)"):
        monkeypatch.setattr(privileges.pwd, "getpwnam",
                            lambda name: pwd.struct_passwd((name, "x", 0, 0, "", "/", "/bin/sh")))
        privileges.resolve(load_config(tmp_path), "toor")
    monkeypatch.undo()
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert privileges.resolve(load_config(tmp_path), "root") is None  # told to stay root
    path.write_text('[run]\nuser = "Bad Name"\n')
    with pytest.raises(ConfigError, match=r'run.user: "Bad Name" is not a user or group name'):
        load_config(tmp_path)
