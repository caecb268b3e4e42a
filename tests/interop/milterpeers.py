"""Real filters (milters) from Debian as private instances: rspamd's proxy worker, OpenDKIM,
OpenDMARC. Each runs in the foreground as a child of the test, on free loopback ports,
with a config of its own in a temp folder, and stops by its PID.
"""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from mailharness import LOOPBACK, HarnessError, free_ports

# rspamd compiles its regular expressions (hyperscan) into its DB folder on the
# first start (~20 s); later starts that find them take under a second. Kept
# across test runs, outside any one test's folder.
RSPAMD_DB = Path(tempfile.gettempdir()) / "postroom-tests-rspamd-db"
# Modules that need Redis or the Internet (PEERS.md), off.
RSPAMD_OFF = ("fuzzy_check", "rbl", "asn", "greylist", "ratelimit", "replies", "neural",
              "history_redis", "url_redirector", "reputation", "metadata_exporter", "phishing",
              "emails", "surbl", "dkim_signing", "arc", "mx_check", "external_services")
# Subjects that make the test rules fire, each with its action.
SOFT_REJECT, ADD_HEADER, REWRITE_SUBJECT = "please-soft-reject", "please-add-header", \
    "please-rewrite"
GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def port_open(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


class Daemon:
    """A foreground child process, stopped by its PID."""

    process: subprocess.Popen[bytes] | None = None
    log_path: Path

    def _spawn(self, command: list[str]) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                            stderr=subprocess.STDOUT)

    def _wait(self, ready: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        assert callable(ready)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise HarnessError(f"{what} exited ({self.process.returncode})\n"
                                   f"{_tail(self.log_path)}")
            if ready():
                return
            time.sleep(0.1)
        self.stop()
        raise HarnessError(f"{what} not ready after {timeout:g}s\n{_tail(self.log_path)}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class Rspamd(Daemon):
    """rspamd with its proxy worker in milter mode; test rules act on the Subject."""

    def __init__(self, root: Path, dns_port: int) -> None:
        self.root = Path(root)
        self.dns_port = dns_port
        self.normal, self.controller, self.proxy = free_ports(3)
        self.log_path = self.root / "rspamd.out"

    def configure(self) -> None:
        local = self.root / "local"
        for sub in ("local.d", "override.d"):
            (local / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("run", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        RSPAMD_DB.mkdir(exist_ok=True)
        override = local / "override.d"
        (override / "worker-normal.inc").write_text(f'bind_socket = "{LOOPBACK}:{self.normal}";\n')
        (override / "worker-controller.inc").write_text(
            f'bind_socket = "{LOOPBACK}:{self.controller}";\n')
        (override / "worker-proxy.inc").write_text(
            f'bind_socket = "{LOOPBACK}:{self.proxy}";\nmilter = yes;\ntimeout = 120s;\n'
            f'upstream "local" {{ default = yes; self_scan = no; '
            f'hosts = "{LOOPBACK}:{self.normal}"; }}\n')
        d = local / "local.d"
        (d / "options.inc").write_text(
            f'dns {{ nameserver = ["{LOOPBACK}:{self.dns_port}"]; timeout = 1s; '
            "retransmits = 1; }\n")
        for module in RSPAMD_OFF:
            (d / f"{module}.conf").write_text("enabled = false;\n")
        # Loopback clients are "local": headers are added for them too.
        (d / "milter_headers.conf").write_text(
            'use = ["authentication-results", "x-spamd-result"];\n'
            "skip_local = false;\nskip_authenticated = false;\n")
        rules = []
        for name, subject, action in (("SOFT", SOFT_REJECT, "soft reject"),
                                      ("ADD", ADD_HEADER, "add header"),
                                      ("REWRITE", REWRITE_SUBJECT, "rewrite subject")):
            (local / f"{name.lower()}.map").write_text(f"/{subject}/\n")
            rules.append(f'TEST_{name} {{ type = "header"; header = "Subject"; regexp = true; '
                         f'map = "${{LOCAL_CONFDIR}}/{name.lower()}.map"; action = "{action}"; '
                         'message = "Try again later"; }')
        (d / "multimap.conf").write_text("\n".join(rules) + "\n")

    def start(self, timeout: float = 240.0) -> None:
        self.configure()
        r = self.root
        self._spawn(["rspamd", "-f", "-i", "-u", "root", "-g", "root", "-c",
                     "/etc/rspamd/rspamd.conf", f"--var=LOCAL_CONFDIR={r / 'local'}",
                     f"--var=DBDIR={RSPAMD_DB}", f"--var=RUNDIR={r / 'run'}",
                     f"--var=LOGDIR={r / 'log'}"])
        self._wait(self._ready, "rspamd", timeout)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{self.normal}/ping", timeout=1) as r:
                if r.read().strip() != b"pong":
                    return False
        except OSError:
            return False
        return port_open(self.proxy)

    @property
    def socket(self) -> str:
        return f"inet:{LOOPBACK}:{self.proxy}"


class OpenDKIM(Daemon):
    """OpenDKIM as a milter: signs for `domain` (mail from InternalHosts or an
    authenticated client), verifies the rest, and adds Authentication-Results."""

    def __init__(self, root: Path, dns_port: int, domain: str, selector: str, key: Path,
                 extra: str = "") -> None:
        self.root = Path(root)
        self.dns_port = dns_port
        self.domain = domain
        self.selector = selector
        self.key = key
        self.extra = extra
        (self.port,) = free_ports(1)
        self.log_path = self.root / "opendkim.out"
        self.conf = self.root / "opendkim.conf"

    def configure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        unbound = self.root / "unbound.conf"
        unbound.write_text(
            "server:\n  do-not-query-localhost: no\n  local-zone: \"test.\" nodefault\n"
            f'forward-zone:\n  name: "."\n  forward-addr: {LOOPBACK}@{self.dns_port}\n')
        self.conf.write_text(
            f"Mode sv\nSocket inet:{self.port}@{LOOPBACK}\nBackground no\nSyslog no\n"
            f"Domain {self.domain}\nSelector {self.selector}\nKeyFile {self.key}\n"
            f"RequireSafeKeys no\nAlwaysAddARHeader yes\nAuthservID mx.corp.example\n"
            f"ResolverConfiguration {unbound}\nPidFile {self.root / 'opendkim.pid'}\n"
            f"UserID root\n{self.extra}")

    def start(self, timeout: float = 30.0) -> None:
        self.configure()
        self._spawn(["opendkim", "-f", "-x", str(self.conf)])
        self._wait(lambda: port_open(self.port), "opendkim", timeout)

    @property
    def socket(self) -> str:
        return f"inet:{LOOPBACK}:{self.port}"


class Port53DNS(Daemon):
    """dnsmasq on port 53 of a loopback address of its own (127.X.Y.Z), for a program that
    reads only /etc/resolv.conf (OpenDMARC): see `OpenDMARC`."""

    def __init__(self, root: Path, *options: str) -> None:
        self.root = Path(root)
        self.options = options
        self.address = ""
        self.log_path = self.root / "dns53.out"

    def start(self, timeout: float = 10.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            self.address = f"127.{random.randint(1, 254)}.{random.randint(0, 255)}." \
                f"{random.randint(1, 254)}"
            self._spawn(["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                         "--conf-file=/dev/null", "--pid-file=", "--port=53",
                         f"--listen-address={self.address}", "--bind-interfaces",
                         "--log-facility=-", *self.options])
            try:
                self._wait(self._answers, "dnsmasq on port 53", timeout)
                return
            except HarnessError:
                continue  # the address was taken: another one
        raise HarnessError(f"dnsmasq did not start on port 53\n{_tail(self.log_path)}")

    def _answers(self) -> bool:
        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            probe.settimeout(0.3)
            # A query for "." NS: any answer (even a refusal) proves it listens.
            probe.sendto(bytes.fromhex("abcd01000001000000000000000002" "0001"),
                         (self.address, 53))
            probe.recv(512)
            return True
        except OSError:
            return False
        finally:
            probe.close()


class OpenDMARC(Daemon):
    """OpenDMARC as a milter on the MX: adds its Authentication-Results.

    It resolves only through /etc/resolv.conf (port 53, no setting for another
    server), so it runs in a mount namespace of its own (unshare(1), as root)
    where that file names `nameserver` (a Port53DNS) and nothing else changes.
    """

    def __init__(self, root: Path, authserv: str, nameserver: str) -> None:
        self.root = Path(root)
        self.authserv = authserv
        self.nameserver = nameserver
        (self.port,) = free_ports(1)
        self.log_path = self.root / "opendmarc.out"
        self.conf = self.root / "opendmarc.conf"

    def configure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            f"Socket inet:{self.port}@{LOOPBACK}\nBackground false\nSyslog false\n"
            f"AuthservID {self.authserv}\nTrustedAuthservIDs {self.authserv}\n"
            f"PidFile {self.root / 'opendmarc.pid'}\nIgnoreHosts /dev/null\n"
            "SPFIgnoreResults false\nSPFSelfValidate true\nUserID root\n")

    def start(self, timeout: float = 30.0) -> None:
        self.configure()
        resolv = self.root / "resolv.conf"
        resolv.write_text(f"nameserver {self.nameserver}\n")
        script = (f'mount --bind "{resolv}" /etc/resolv.conf && '
                  f'exec opendmarc -f -c "{self.conf}"')
        self._spawn(["unshare", "--mount", "--propagation", "private", "sh", "-c", script])
        self._wait(lambda: port_open(self.port), "opendmarc", timeout)

    @property
    def socket(self) -> str:
        return f"inet:{LOOPBACK}:{self.port}"
