"""Run real mail servers on loopback for interop tests and benchmarks: postroom and Postfix.

Both run as child processes on free high ports of 127.0.0.1, each in a folder
of its own, and are stopped by PID (postroom) or by `postfix -c DIR stop`. No
system configuration is read or changed. The module depends on nothing but the
standard library so that `bench/` can use it outside pytest.
"""

from __future__ import annotations

import mailbox
import os
import poplib
import pwd
import re
import shutil
import signal
import smtplib
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
REPO = Path(__file__).resolve().parents[2]

# The servers the harness starts (tests and bench/) serve folders it made as the user
# running it, so they stay that user rather than switch to [run] user's default,
# postroom (server/privileges.py). tests/server/test_privileges.py takes this out.
os.environ.setdefault("POSTROOM_RUN_USER", pwd.getpwuid(os.geteuid()).pw_name)

# A benchmark's load is one user sending as fast as it can, and Postfix limits no
# user's rate by default: the legs compare without [limits]' per-user rates.
NO_USER_RATES = "\n[limits]\nuser_message_rate = 0\nuser_recipient_rate = 0\n"

# Debian installs postfix, postconf and smtp-source in sbin folders, which an
# unprivileged PATH often lacks.
_SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")


class HarnessError(RuntimeError):
    """A server could not be set up, started or stopped; the message carries its logs."""


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


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports of 127.0.0.1 that were free a moment ago."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def smtp_banner(port: int, timeout: float = 2.0) -> bytes | None:
    """The first line a server on `port` sends, or None when nothing answers."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as sock:
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            return data or None
    except OSError:
        return None


def maildir_files(folder: Path) -> list[Path]:
    """The message files of a Maildir's new/ and cur/ (tmp/ holds unfinished writes)."""
    files: list[Path] = []
    for sub in ("new", "cur"):
        part = folder / sub
        if part.is_dir():
            files.extend(p for p in part.iterdir() if not p.name.startswith("."))
    return sorted(files)


def count_new(folder: Path) -> int:
    """How many files a Maildir's new/ holds (0 while the folder does not exist)."""
    try:
        return sum(1 for name in os.listdir(folder / "new") if not name.startswith("."))
    except FileNotFoundError:
        return 0


def _tail(path: Path, limit: int = 6000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"({path} unreadable)"
    return text[-limit:]


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


class Postroom:
    """One postroom server: a data folder, a config, users, and the `serve` process.

    `listeners` names the listeners to enable (smtp, submission, submissions,
    pop3, pop3s); each gets a free port, found in `ports`. Users are added with
    the CLI by `setup()`, which `start()` calls the first time.
    """

    def __init__(
        self,
        root: Path,
        *,
        hostname: str = "mx.corp.example",
        domains: Sequence[str] = ("corp.example",),
        users: Mapping[str, str] | None = None,
        aliases: Mapping[str, Sequence[str]] | None = None,
        listeners: Sequence[str] = ("smtp",),
        max_message_size: str = "50M",
        extra_toml: str = "",
        workers: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.data = self.root / "data"
        self.hostname = hostname
        self.domains = list(domains)
        self.users = dict(users or {})
        self.aliases = {k: list(v) for k, v in (aliases or {}).items()}
        self.ports = dict(zip(listeners, free_ports(len(listeners)), strict=True))
        self.max_message_size = max_message_size
        self.extra_toml = extra_toml
        self.workers = workers  # server processes; None: postroom's default (one per CPU)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "server.log"
        self._is_set_up = False
        self.starts = 0

    # -- setup ---------------------------------------------------------------

    @property
    def smtp_port(self) -> int:
        return self.ports["smtp"]

    @property
    def config_path(self) -> Path:
        return self.data / "postroom.toml"

    def env(self) -> dict[str, str]:
        """The environment for postroom processes: unbuffered, with src/ importable."""
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("POSTROOM_DATA", None)
        src = REPO / "src"
        if (src / "postroom").is_dir():
            env["PYTHONPATH"] = os.pathsep.join(
                [str(src), *filter(None, [env.get("PYTHONPATH")])]
            )
        return env

    def write_config(self) -> None:
        lines = [f"hostname = {_toml_string(self.hostname)}", ""]
        if self.workers is not None:
            lines += [f"workers = {self.workers}", ""]
        lines.append("[listen]")
        lines += [f'{name} = "{LOOPBACK}:{port}"' for name, port in self.ports.items()]
        lines += [
            "",
            "[tls]",
            'cert = "tls/cert.pem"',
            'key = "tls/key.pem"',
            "",
            "[smtp]",
            f"max_message_size = {_toml_string(self.max_message_size)}",
            "",
        ]
        if self.extra_toml:
            lines.append(self.extra_toml)
        self.data.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines) + "\n")

    def cli(
        self, *args: str, stdin: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run `python -m postroom --data DATA ARGS...`; raise HarnessError if check fails."""
        command = [sys.executable, "-m", "postroom", "--data", str(self.data), *args]
        result = subprocess.run(
            command,
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
            check=False,
        )
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(command[2:])} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result

    def add_user(self, address: str, password: str, *, check: bool = True) -> bool:
        """Add a user with the CLI; with check=False return whether it worked."""
        result = self.cli("user", "add", address, "--password-stdin",
                          stdin=password + "\n", check=check)
        if result.returncode == 0:
            self.users[address] = password
            return True
        return False

    def setup(self) -> None:
        """Write the config, then add domains, users and aliases with the CLI."""
        self.write_config()
        for domain in self.domains:
            self.cli("domain", "add", domain)
        for address, password in list(self.users.items()):
            self.add_user(address, password)
        for source, targets in self.aliases.items():
            self.cli("alias", "add", source, *targets)
        self._is_set_up = True

    # -- process -------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> None:
        """Start `serve` and wait until the SMTP port shows a 220 banner."""
        if not self._is_set_up:
            self.setup()
        if self.process is not None and self.process.poll() is None:
            raise HarnessError("postroom is already running")
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"--- start {self.starts} ---\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "postroom", "--data", str(self.data), "serve"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env(),
                cwd=self.root,
            )
        deadline = time.monotonic() + timeout
        port = self.ports.get("smtp") or next(iter(self.ports.values()))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HarnessError(
                    f"postroom serve exited {self.process.returncode} while starting\n"
                    f"{self.output()}"
                )
            banner = smtp_banner(port, timeout=1.0)
            if banner is not None and banner.startswith(b"220"):
                return
            time.sleep(0.05)
        self.kill()
        raise HarnessError(
            f"postroom did not answer on port {port} within {timeout}s\n{self.output()}"
        )

    @property
    def pid(self) -> int:
        if self.process is None:
            raise HarnessError("postroom is not running")
        return self.process.pid

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (drain), then SIGKILL if it lingers; return the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL: no draining, no cleanup (the crash test's power cut)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def output(self) -> str:
        """The server's combined stdout/stderr so far (its tail)."""
        return _tail(self.log_path)

    # -- mailboxes -----------------------------------------------------------

    def maildir(self, address: str) -> Path:
        """The Maildir folder of a local address: DATA/mail/<domain>/<localpart>."""
        localpart, _, domain = address.rpartition("@")
        return self.data / "mail" / domain.lower() / localpart

    def mailbox(self, address: str) -> mailbox.Maildir:
        return mailbox.Maildir(self.maildir(address), factory=None, create=False)

    def messages(self, address: str) -> list[bytes]:
        """Every message in the address's Maildir (new/ and cur/), as stored bytes."""
        folder = self.maildir(address)
        if not (folder / "new").is_dir():
            return []
        box = self.mailbox(address)
        return [box.get_bytes(key) for key in sorted(box.keys())]

    def wait_for_messages(self, address: str, count: int = 1, timeout: float = 30.0) -> list[bytes]:
        """Poll until the Maildir holds at least `count` messages; return them."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.messages(address)
            if len(found) >= count or time.monotonic() > deadline:
                return found
            time.sleep(0.05)

    def wait_for_message(self, address: str, needle: bytes, timeout: float = 15.0) -> list[bytes]:
        """Poll until a message containing `needle` is stored; return all that contain it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [m for m in self.messages(address) if needle in m]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.05)


def _let_others_traverse(folder: Path) -> None:
    """Add search (x) permission for others to `folder` and its ancestors.

    Postfix's daemons run as the postfix user and its virtual agent as nobody;
    both must reach files under `folder`, but temp folders (pytest's, mkdtemp's)
    are made 0700. Only traversal is granted, never listing or reading.
    """
    for path in (folder, *folder.parents):
        mode = path.stat().st_mode
        if not mode & stat.S_IXOTH:
            path.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


# The master.cf the package ships, as it ships it (Debian's postfix package installs
# it here): /etc/postfix/master.cf is the machine owner's and may have been changed
# (postscreen, content filters, services of their own), which a test must not inherit.
MASTER_CF_TEMPLATE = Path("/usr/share/postfix/master.cf.dist")


class PrivatePostfix:
    """A Postfix instance in a folder of its own, leaving /etc/postfix alone.

    Two roles: with `relayhost` it relays everything it accepts to that host
    (mydestination empty, so no local delivery); with `mailbox_domain` it
    delivers mail for the listed `mailbox_users` to Maildirs under
    `vmail/<domain>/<user>/` through its virtual(8) agent, which fsyncs each
    file before renaming it into new/, as Postfix does by default.
    `extra_main_cf` adds or overrides main.cf settings. Needs root:
    the master process binds ports and switches to the postfix user.
    """

    def __init__(
        self,
        root: Path,
        *,
        myhostname: str = "relay.test",
        relayhost: tuple[str, int] | None = None,
        tls_level: str = "none",
        mailbox_domain: str | None = None,
        mailbox_users: Iterable[str] = (),
        extra_main_cf: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.extra_main_cf = dict(extra_main_cf or {})
        self.config_dir = self.root / "etc"
        self.queue_dir = self.root / "queue"
        self.data_dir = self.root / "data"
        self.vmail = self.root / "vmail"
        self.log_path = self.root / "postfix.log"
        self.port = free_ports(1)[0]
        self.myhostname = myhostname
        self.relayhost = relayhost
        self.tls_level = tls_level
        self.mailbox_domain = mailbox_domain
        self.mailbox_users = list(mailbox_users)
        self.started = False
        self.postfix = find_program("postfix")
        self.postconf = find_program("postconf")

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why a private Postfix cannot run here, or None when it can."""
        if find_program("postfix") is None or find_program("postconf") is None:
            return "postfix is not installed"
        if not MASTER_CF_TEMPLATE.is_file():
            return (f"{MASTER_CF_TEMPLATE} is missing: the private Postfix is built from the "
                    "package's own master.cf, which Debian's postfix package installs "
                    "(apt-get install --reinstall postfix)")
        if os.geteuid() != 0:
            return "a private Postfix instance needs root"
        try:
            pwd.getpwnam("postfix")
        except KeyError:
            return "the postfix user does not exist"
        return None

    def mailbox_path(self, user: str) -> Path:
        """The Maildir of `user` in mailbox_domain."""
        assert self.mailbox_domain is not None
        return self.vmail / self.mailbox_domain / user

    def _main_cf(self) -> str:
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "maillog_file": str(self.log_path),
            "maillog_file_prefixes": str(self.root),
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": LOOPBACK,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "myhostname": self.myhostname,
            "mydomain": self.myhostname,
            "myorigin": self.myhostname,
            "mydestination": "",
            "local_recipient_maps": "",
            "local_transport": "error:5.1.1 local delivery is disabled",
            "smtp_dns_support_level": "disabled",
            "smtp_tls_security_level": self.tls_level,
            "smtp_tls_loglevel": "1",  # log each TLS handshake, for failing tests
            "biff": "no",
            # Retry soon when the next hop defers, so a test sees the message.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtpd_banner": "$myhostname ESMTP",
        }
        if self.relayhost is not None:
            host, port = self.relayhost
            settings["relayhost"] = f"[{host}]:{port}"
        if self.mailbox_domain is not None:
            users = ", ".join(
                f"{{{u}@{self.mailbox_domain}={self.mailbox_domain}/{u}/}}"
                for u in self.mailbox_users
            )
            nobody = pwd.getpwnam("nobody")
            settings.update(
                {
                    "virtual_mailbox_domains": self.mailbox_domain,
                    "virtual_mailbox_base": str(self.vmail),
                    # A trailing "/" in the map's value selects Maildir delivery.
                    "virtual_mailbox_maps": f"inline:{{ {users} }}",
                    "virtual_uid_maps": f"static:{nobody.pw_uid}",
                    "virtual_gid_maps": f"static:{nobody.pw_gid}",
                    "virtual_mailbox_limit": "0",
                    "message_size_limit": "0",
                }
            )
        settings.update(self.extra_main_cf)  # a test's own settings win
        return "".join(f"{key} = {value}\n" for key, value in settings.items())

    def _master_cf(self) -> str:
        template = MASTER_CF_TEMPLATE.read_text()
        smtp_line = re.compile(r"^smtp\s+inet\s.*$", re.MULTILINE)
        if not smtp_line.search(template):
            raise HarnessError(f"no 'smtp inet' line in {MASTER_CF_TEMPLATE}")
        # The master process listens with a backlog of the service's process
        # limit (default_process_limit, 100): above any session count used here.
        return smtp_line.sub(f"{LOOPBACK}:{self.port} inet n - n - - smtpd", template, count=1)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=60,
                                check=False)
        if check and result.returncode != 0:
            raise HarnessError(
                f"{' '.join(args)} exited {result.returncode}\n{result.stdout}{result.stderr}\n"
                f"postfix.log:\n{_tail(self.log_path)}"
            )
        return result

    def start(self, timeout: float = 20.0) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        assert self.postfix is not None and self.postconf is not None
        for folder in (self.config_dir, self.queue_dir, self.data_dir):
            folder.mkdir(parents=True, exist_ok=True)
        _let_others_traverse(self.root)
        shutil.chown(self.data_dir, user="postfix")
        if self.mailbox_domain is not None:
            self.vmail.mkdir(exist_ok=True)
            shutil.chown(self.vmail, user="nobody", group=pwd.getpwnam("nobody").pw_gid)
        (self.config_dir / "main.cf").write_text(self._main_cf())
        (self.config_dir / "master.cf").write_text(self._master_cf())
        # No chroot: a chroot would need copies of /etc files inside the queue.
        self._run(self.postconf, "-c", str(self.config_dir), "-F", "*/*/chroot = n")
        self._run(self.postfix, "-c", str(self.config_dir), "check")
        self._run(self.postfix, "-c", str(self.config_dir), "start")
        self.started = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            banner = smtp_banner(self.port, timeout=1.0)
            if banner is not None and banner.startswith(b"220"):
                return
            time.sleep(0.1)
        self.stop()
        raise HarnessError(
            f"private postfix did not answer on port {self.port}\n{_tail(self.log_path)}"
        )

    def master_pid(self) -> int | None:
        try:
            return int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """`postfix stop`; if the master lingers, SIGKILL it by its PID."""
        if not self.started:
            return
        self.started = False
        assert self.postfix is not None
        pid = self.master_pid()
        self._run(self.postfix, "-c", str(self.config_dir), "stop", check=False)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return _tail(self.log_path)

    def send(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Submit a message to this Postfix with smtplib."""
        with smtplib.SMTP(LOOPBACK, self.port, timeout=30) as client:
            client.sendmail(sender, list(recipients), message)


# -- POP3: clients of postroom's listeners, and Dovecot as a second server ----

CRLF = b"\r\n"


def unverified_tls_context() -> ssl.SSLContext:
    """A client TLS context that accepts any certificate (servers here are self-signed)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def pop3_banner(port: int, *, implicit_tls: bool = False, timeout: float = 2.0) -> bytes | None:
    """The greeting a POP3 server on `port` sends (over TLS first for pop3s), or None."""
    try:
        with socket.create_connection((LOOPBACK, port), timeout=timeout) as raw:
            sock: socket.socket = raw
            if implicit_tls:
                sock = unverified_tls_context().wrap_socket(raw, server_hostname=LOOPBACK)
            data = b""
            while b"\n" not in data:
                chunk = sock.recv(512)
                if not chunk:
                    break
                data += chunk
            return data or None
    except (OSError, ssl.SSLError):
        return None


def wait_for_pop3(port: int, *, implicit_tls: bool = False, timeout: float = 20.0) -> bytes:
    """Poll until the POP3 server on `port` greets with +OK; return the greeting."""
    deadline = time.monotonic() + timeout
    while True:
        banner = pop3_banner(port, implicit_tls=implicit_tls, timeout=1.0)
        if banner is not None and banner.startswith(b"+OK"):
            return banner
        if time.monotonic() > deadline:
            raise HarnessError(f"no POP3 greeting on port {port} within {timeout}s: {banner!r}")
        time.sleep(0.05)


def pop3_session(
    port: int,
    *,
    security: str = "plain",
    user: str | None = None,
    password: str | None = None,
    timeout: float = 10.0,
) -> poplib.POP3:
    """A poplib client of 127.0.0.1:`port`, logged in with USER/PASS when `user` is given.

    `security` is "plain" (no TLS), "stls" (STLS, RFC 2595, before logging in)
    or "pop3s" (implicit TLS, RFC 8314). Certificates are not checked.
    """
    client: poplib.POP3
    if security == "pop3s":
        client = poplib.POP3_SSL(LOOPBACK, port, timeout=timeout,
                                 context=unverified_tls_context())
    else:
        client = poplib.POP3(LOOPBACK, port, timeout=timeout)
        if security == "stls":
            client.stls(unverified_tls_context())
        elif security != "plain":
            raise ValueError(f"unknown POP3 security {security!r}")
    if user is not None:
        client.user(user)
        client.pass_(password or "")
    return client


def pop3_message(client: poplib.POP3, number: int) -> bytes:
    """RETR `number`, rebuilt as the octets the server sent (dot-unstuffed, CRLF line ends).

    poplib strips each line's CRLF; every message here ends with CRLF (RFC 5322
    2.1), so joining the lines with CRLF and ending with one gives the bytes back.
    """
    _, lines, _ = client.retr(number)
    return b"".join(line + CRLF for line in lines)


def pop3_listing(client: poplib.POP3) -> dict[int, int]:
    """LIST as {message number: size in octets}."""
    _, lines, _ = client.list()
    sizes: dict[int, int] = {}
    for line in lines:
        number, size = line.split()
        sizes[int(number)] = int(size)
    return sizes


def pop3_uidls(client: poplib.POP3) -> dict[int, str]:
    """UIDL as {message number: unique id}."""
    _, lines, _ = client.uidl()
    uids: dict[int, str] = {}
    for line in lines:
        number, uid = line.split()
        uids[int(number)] = uid.decode("ascii")
    return uids


class PrivateDovecot:
    """A Dovecot POP3 server in a folder of its own, serving one existing Maildir to one user.

    Nothing under /etc/dovecot is read: `dovecot -c FILE` gets a config whose
    base, state and log paths are under `root`, a passwd-file passdb and userdb
    holding the one user, and `mail_location` naming `maildir` directly. With
    `cert`/`key` it offers STLS on the same port.

    Dovecot refuses mail access as root (uid or gid 0), so the mail process
    runs as `mail_user` and `start()` hands the Maildir to that user (chown -R)
    and lets others traverse its parents. Its auth process runs as the dovecot
    user and reads the passwd file under `root`: neither `root` nor `maildir`
    may live in a 0700 folder another run can lock again (pytest's temp root).
    Needs root. Dovecot writes its index and dovecot-uidlist files into the
    Maildir's top folder and renames the files it reads into cur/ with flags.
    """

    def __init__(
        self,
        root: Path,
        *,
        maildir: Path,
        user: str,
        password: str,
        cert: Path | None = None,
        key: Path | None = None,
        mail_user: str = "nobody",
    ) -> None:
        self.root = Path(root)
        self.maildir = Path(maildir)
        self.user = user
        self.password = password
        self.cert = cert
        self.key = key
        self.mail_user = mail_user
        self.port = free_ports(1)[0]
        self.config_path = self.root / "dovecot.conf"
        self.passwd_path = self.root / "passwd"
        self.base_dir = self.root / "run"
        self.state_dir = self.root / "state"
        self.log_path = self.root / "dovecot.log"
        self.started = False
        self.dovecot = find_program("dovecot")
        self.doveadm = find_program("doveadm")

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why a private Dovecot POP3 server cannot run here, or None when it can."""
        if find_program("dovecot") is None or find_program("doveadm") is None:
            return "dovecot (dovecot-core) is not installed"
        if not any(Path(d, "pop3").is_file() for d in ("/usr/lib/dovecot", "/usr/libexec/dovecot")):
            return "dovecot's pop3 service (dovecot-pop3d) is not installed"
        if os.geteuid() != 0:
            return "a private Dovecot instance needs root"
        for name in ("dovecot", "dovenull", "nobody"):
            try:
                pwd.getpwnam(name)
            except KeyError:
                return f"the {name} user does not exist"
        return None

    def _config(self) -> str:
        account = pwd.getpwnam(self.mail_user)
        lines = [
            "protocols = pop3",
            f"listen = {LOOPBACK}",
            f"base_dir = {self.base_dir}",
            f"state_dir = {self.state_dir}",
            f"log_path = {self.log_path}",
            "disable_plaintext_auth = no",
            "auth_mechanisms = plain login",
            f"mail_location = maildir:{self.maildir}",
            f"mail_uid = {self.mail_user}",
            f"mail_gid = {account.pw_gid}",
            # Dovecot's floor for mail uids/gids (default 500): let a system user through.
            f"first_valid_uid = {account.pw_uid}",
            f"first_valid_gid = {account.pw_gid}",
            "passdb {",
            "  driver = passwd-file",
            f"  args = scheme=PLAIN username_format=%u {self.passwd_path}",
            "}",
            "userdb {",
            "  driver = passwd-file",
            f"  args = username_format=%u {self.passwd_path}",
            "}",
            "service pop3-login {",
            "  inet_listener pop3 {",
            f"    address = {LOOPBACK}",
            f"    port = {self.port}",
            "  }",
            "  inet_listener pop3s {",
            "    port = 0",
            "  }",
            "}",
            # anvil chroots to an empty folder by default; none is made here.
            "service anvil {",
            "  chroot =",
            "}",
        ]
        if self.cert is not None and self.key is not None:
            lines += ["ssl = yes", f"ssl_cert = <{self.cert}", f"ssl_key = <{self.key}"]
        else:
            lines.append("ssl = no")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 20.0) -> None:
        reason = self.unavailable_reason()
        if reason is not None:
            raise HarnessError(reason)
        assert self.dovecot is not None
        for folder in (self.root, self.base_dir, self.state_dir):
            folder.mkdir(parents=True, exist_ok=True)
        _let_others_traverse(self.root)
        account = pwd.getpwnam(self.mail_user)
        for path in (self.maildir, *self.maildir.rglob("*")):
            os.chown(path, account.pw_uid, account.pw_gid)
        _let_others_traverse(self.maildir.parent)
        # user:password:uid:gid:gecos:home:shell — uid/gid come from mail_uid/mail_gid.
        self.passwd_path.write_text(f"{self.user}:{{PLAIN}}{self.password}::::::\n")
        self.passwd_path.chmod(0o644)
        self.config_path.write_text(self._config())
        # The master daemonizes with the standard streams inherited: pipes would
        # stay open as long as it runs, so its start-up errors go to a file.
        output = self.root / "start.out"
        with open(output, "wb") as out:
            result = subprocess.run([self.dovecot, "-c", str(self.config_path)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    timeout=60, check=False)
        if result.returncode != 0:
            raise HarnessError(
                f"dovecot exited {result.returncode}\n{_tail(output)}\n{self.log()}"
            )
        self.started = True
        try:
            wait_for_pop3(self.port, timeout=timeout)
        except HarnessError as exc:
            self.stop()
            raise HarnessError(f"{exc}\n{self.log()}") from None

    def master_pid(self) -> int | None:
        try:
            return int((self.base_dir / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 15.0) -> None:
        """`doveadm stop`; if the master lingers, SIGKILL it by its PID."""
        if not self.started:
            return
        self.started = False
        assert self.doveadm is not None
        pid = self.master_pid()
        subprocess.run([self.doveadm, "-c", str(self.config_path), "stop"],
                       stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log(self) -> str:
        return _tail(self.log_path)


def smtp_send(port: int, sender: str, recipient: str, messages: Iterable[bytes]) -> None:
    """Send each message to `recipient` over one smtplib connection to 127.0.0.1:`port`."""
    with smtplib.SMTP(LOOPBACK, port, timeout=30) as client:
        for message in messages:
            client.sendmail(sender, [recipient], message)


def stored_by_token(folder: Path, tokens: Iterable[str]) -> dict[str, bytes]:
    """{token: the bytes of the one file in the Maildir's new/ or cur/ that contains it}."""
    files = [path.read_bytes() for path in maildir_files(folder)]
    found: dict[str, bytes] = {}
    for token in tokens:
        holders = [data for data in files if token.encode() in data]
        if len(holders) != 1:
            raise HarnessError(f"{len(holders)} files in {folder} hold token {token}")
        found[token] = holders[0]
    return found


# -- relay: DNS on loopback and authenticated submission ----------------------


def free_dns_port() -> int:
    """A port of 127.0.0.1 free for both UDP and TCP (a DNS server listens on both)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
        tcp.bind((LOOPBACK, 0))
        port = int(tcp.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, port))
    return port


def dns_answers(port: int, name: str = "ready.invalid", timeout: float = 0.2) -> bool:
    """Whether a DNS server on 127.0.0.1:`port` answers a UDP query for `name` (type A).

    The query is built by hand (RFC 1035 4.1: a 12-octet header, one question)
    so that this module needs no DNS library.
    """
    header = (0x5EED).to_bytes(2, "big") + b"\x01\x00" + b"\x00\x01" + b"\x00" * 6
    qname = b"".join(len(label).to_bytes(1, "big") + label.encode("ascii")
                     for label in name.split(".")) + b"\x00"
    query = header + qname + b"\x00\x01\x00\x01"  # QTYPE A, QCLASS IN
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.sendto(query, (LOOPBACK, port))
            reply = sock.recv(512)
        except OSError:
            return False
    return reply[:2] == query[:2]


class Dnsmasq:
    """dnsmasq serving only the records its options give (--mx-host, --host-record, ...).

    No upstream servers, no /etc/hosts, no config file, no pid file; it listens
    on 127.0.0.1 at `port` (UDP and TCP) and logs to `root/dnsmasq.log`.
    """

    def __init__(self, root: Path, *options: str) -> None:
        self.root = Path(root)
        self.options = list(options)
        self.port = 0
        self.log_path = self.root / "dnsmasq.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.program = find_program("dnsmasq")

    def start(self, timeout: float = 10.0) -> int:
        """Start dnsmasq and wait until it answers; return its port."""
        if self.program is None:
            raise HarnessError("dnsmasq is not installed")
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.port = free_dns_port()
            with open(self.log_path, "ab") as log:
                self.process = subprocess.Popen(
                    [self.program, "--keep-in-foreground", "--no-resolv", "--no-hosts",
                     "--conf-file=/dev/null", "--pid-file=", f"--port={self.port}",
                     f"--listen-address={LOOPBACK}", "--bind-interfaces",
                     "--log-facility=-", *self.options],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                if dns_answers(self.port):
                    return self.port
                time.sleep(0.05)
            if self.process.poll() is None:
                break  # running but silent: not a port race
            # It exited: most likely something took the port in between; try another.
        self.stop()
        raise HarnessError(f"dnsmasq did not start\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def submission_client(
    port: int, user: str, password: str, *, implicit_tls: bool = False, timeout: float = 30.0
) -> smtplib.SMTP:
    """An smtplib client of a submission port (RFC 6409), in TLS and logged in.

    Port 587 style: STARTTLS (RFC 3207) and then AUTH; with `implicit_tls`
    port 465 style (RFC 8314): TLS from the first octet. Certificates are not
    checked (the servers here are self-signed).
    """
    client: smtplib.SMTP
    if implicit_tls:
        client = smtplib.SMTP_SSL(LOOPBACK, port, timeout=timeout,
                                  context=unverified_tls_context())
    else:
        client = smtplib.SMTP(LOOPBACK, port, timeout=timeout)
        client.starttls(context=unverified_tls_context())
    client.login(user, password)
    return client


QUEUED_AS = re.compile(rb"queued as ([A-Za-z0-9._-]+)")


def send_and_get_queue_id(
    client: smtplib.SMTP, sender: str, recipients: Sequence[str], message: bytes
) -> str:
    """One transaction on an open client; return the queue ID in the DATA reply.

    smtplib's sendmail() hides the final reply, which carries the ID
    ("250 2.0.0 Ok: queued as ID"). Any refusal raises smtplib.SMTPResponseException.
    """
    code, text = client.mail(sender)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, text, sender)
    for recipient in recipients:
        code, text = client.rcpt(recipient)
        if code not in (250, 251):
            raise smtplib.SMTPResponseException(code, text)
    code, text = client.data(message)
    if code != 250:
        raise smtplib.SMTPDataError(code, text)
    match = QUEUED_AS.search(text)
    if match is None:
        raise HarnessError(f"no queue ID in the DATA reply {text!r}")
    return match.group(1).decode("ascii")


def wait_until_unqueued(server: Postroom, queue_id: str, timeout: float = 10.0) -> str:
    """Poll `postroom queue list` until `queue_id` is gone; return the last listing.

    The caller asserts on the result: `queue_id not in listing`.
    """
    deadline = time.monotonic() + timeout
    while True:
        listing = server.cli("queue", "list").stdout
        if queue_id not in listing or time.monotonic() > deadline:
            return listing
        time.sleep(0.2)


# Where .ci/run unpacks Debian's exim4-daemon-light: the package conflicts with
# postfix, so it is unpacked (dpkg -x), not installed. EXIM_BINARY overrides.
EXIM_UNPACKED = Path("/opt/exim4-peer/usr/sbin/exim4")
EXIM_USER = "Debian-exim"  # the user Debian's exim binary is built to run as


def exim_binary() -> str | None:
    """Exim's binary: $EXIM_BINARY, an exim4 on PATH or in sbin, or .ci/run's unpacked one."""
    named = os.environ.get("EXIM_BINARY")
    if named:
        return named if os.access(named, os.X_OK) else None
    found = find_program("exim4")
    if found:
        return found
    return str(EXIM_UNPACKED) if os.access(EXIM_UNPACKED, os.X_OK) else None


class PrivateExim:
    """An Exim 4 that sends everything it is given to one host, from a folder of its own.

    Exim reads only the config given with -C (its spool, log and hints databases
    live under `root`), routes every address to `relay` with a manualroute
    router, uses CHUNKING and PIPELINING where offered, and STARTTLS when
    `tls=True` (without checking the certificate). It runs no daemon: `send`
    delivers one message in the foreground, `queue` only queues, and
    `run_queue` delivers the whole queue in a two-stage run, which passes one
    connection on from message to message. Needs root and the Debian-exim user.
    """

    def __init__(self, root: Path, *, relay: tuple[str, int], tls: bool = False) -> None:
        self.root = Path(root)
        self.relay = relay
        self.tls = tls
        self.binary = exim_binary()
        self.config = self.root / "exim.conf"
        self.spool = self.root / "spool"
        self.logs = self.root / "log"

    @staticmethod
    def unavailable_reason() -> str | None:
        """Why a private Exim cannot run here, or None when it can."""
        if exim_binary() is None:
            return ("exim4 is not available (.ci/run unpacks Debian's exim4-daemon-light "
                    f"into {EXIM_UNPACKED.parents[2]}; or set EXIM_BINARY)")
        if os.geteuid() != 0:
            return "a private Exim needs root (it switches to the Debian-exim user)"
        try:
            pwd.getpwnam(EXIM_USER)
        except KeyError:
            return f"the {EXIM_USER} user does not exist"
        return None

    def setup(self) -> None:
        assert self.binary is not None
        host, port = self.relay
        tls = ("  tls_verify_certificates =\n  tls_try_verify_hosts =\n" if self.tls
               else "  hosts_avoid_tls = *\n")
        self.config.write_text(
            f"exim_path = {os.path.realpath(self.binary)}\n"
            "primary_hostname = exim.test\n"
            f"spool_directory = {self.spool}\n"
            f"log_file_path = {self.logs}/%slog\n"
            "keep_environment =\n"
            "trusted_users = root\n"
            "acl_not_smtp = accept_local\n"
            "begin acl\n"
            "accept_local:\n"
            "  accept\n"
            "begin routers\n"
            "to_relay:\n"
            "  driver = manualroute\n"
            f"  route_list = * {host}::{port}\n"
            "  transport = relay_smtp\n"
            "  self = send\n"
            "begin transports\n"
            "relay_smtp:\n"
            "  driver = smtp\n"
            "  allow_localhost\n"
            "  hosts_try_chunking = *\n"
            + tls
            + "begin retry\n"
            "* * F,1h,1h\n"
        )
        exim = pwd.getpwnam(EXIM_USER)
        for folder in (self.spool, self.logs):
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, exim.pw_uid, exim.pw_gid)
        _let_others_traverse(self.root)

    def _exim(self, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        assert self.binary is not None
        return subprocess.run([self.binary, "-C", str(self.config), *args], input=stdin,
                              capture_output=True, timeout=60, check=False)

    def queue(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Accept a message from the command line and only queue it (-odq)."""
        self._submit("-odq", sender, recipients, message)

    def send(self, sender: str, recipients: Sequence[str], message: bytes) -> None:
        """Accept a message and deliver it at once, in the foreground (-odf)."""
        self._submit("-odf", sender, recipients, message)

    def _submit(self, mode: str, sender: str, recipients: Sequence[str], message: bytes) -> None:
        result = self._exim(mode, "-f", sender, "--", *recipients, stdin=message)
        if result.returncode != 0:
            raise HarnessError(f"exim {mode} exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')}\n{self.log()}")

    def run_queue(self) -> None:
        """One two-stage queue run (-qqff): routing first, so that every message waits
        for the same host, then deliveries that pass the connection on."""
        result = self._exim("-qqff")
        if result.returncode != 0:
            raise HarnessError(f"exim -qqff exited {result.returncode}: "
                               f"{result.stderr.decode(errors='replace')}\n{self.log()}")

    def queued(self) -> int:
        """Messages still in Exim's queue (-bpc)."""
        result = self._exim("-bpc")
        return int(result.stdout.decode().strip() or "0")

    def log(self) -> str:
        """Exim's main log: one line per arrival, delivery (=>), deferral (==) and completion."""
        path = self.logs / "mainlog"
        return path.read_text(errors="replace") if path.is_file() else ""
