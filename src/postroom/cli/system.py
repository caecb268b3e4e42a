"""Running postroom as a system service: `init --system`, `systemd-unit` and `reload`."""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from postroom.cli.common import DATA_ENV, PROG, Context
from postroom.config import CONFIG_NAME, ConfigError, load_config, render_default_config
from postroom.control import RELOAD as RELOAD_REQUEST
from postroom.control import ControlError, tell_server
from postroom.store.atomic import atomic_write

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers

# Where a Linux service keeps its files (Filesystem Hierarchy Standard 3.0: /etc for
# configuration, /var/lib for state; the logs go to the journal).
SYSTEM_CONFIG = Path("/etc/postroom") / CONFIG_NAME
SYSTEM_DATA = Path("/var/lib/postroom")
SYSTEM_ACCOUNT = "postroom"
NOLOGIN_SHELLS = ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false")
# How long systemd waits for the drain after SIGTERM: the server's grace for
# transactions in progress (server.main.DRAIN_GRACE_SECONDS), and then some.
STOP_TIMEOUT_SECONDS = 60
# How long `postroom reload` waits for the answer: the server checks and builds the new
# config and starts its workers, and waits up to RETIRE_ACK_SECONDS for the old ones
# (server.supervisor) to stop accepting.
RELOAD_TIMEOUT_SECONDS = 60.0


# -- init --system -----------------------------------------------------------------


def add_system_options(p: argparse.ArgumentParser) -> None:
    """`postroom init --system [--user NAME]`: the options init gets from this module."""
    p.add_argument(
        "--system", action="store_true",
        help=f"prepare a system service (as root): config in {SYSTEM_CONFIG.parent}, data in "
        f"{SYSTEM_DATA} (unless --config/--data say otherwise), the user and group created "
        "if missing, the data folder given to them",
    )
    p.add_argument("--user", default=SYSTEM_ACCOUNT,
                   help=f"with --system: the account the server runs as (default {SYSTEM_ACCOUNT})")


def init_system(args: argparse.Namespace, ctx: Context) -> int:
    """Create the account, write the config, make and hand over the data folder; say each."""
    if os.geteuid() != 0:
        raise ConfigError("init --system must run as root: it creates the user "
                          f"{args.user!r} and gives the data folder to it")
    explicit_data = getattr(args, "data", None) or os.environ.get(DATA_ENV)
    data = (Path(explicit_data) if explicit_data else SYSTEM_DATA).absolute()
    config_path = (ctx.config_file or SYSTEM_CONFIG).absolute()
    user = args.user
    did: list[str] = []
    uid, gid = _ensure_account(user, data, did)
    # The config: root's, readable by the group (it may hold paths to secrets).
    if config_path.exists() and not args.force:
        did.append(f"kept {config_path} (it exists; --force writes it again)")
    else:
        text = render_default_config(hostname=args.hostname, domains=args.domains,
                                     postmaster=args.postmaster)
        text = _with_run_account(text, user)
        if not config_path.parent.exists():
            config_path.parent.mkdir(mode=0o755, parents=True)
            did.append(f"made {config_path.parent}")
        atomic_write(config_path, text.encode("utf-8"), mode=0o640)
        os.chown(config_path, 0, gid)
        did.append(f"wrote {config_path} (owner root:{user}, mode 0640), run.user = {user!r}")
    config = load_config(data, config_path)
    # The data folder and what is in it belong to the account.
    made = not data.exists()
    for folder in (data, config.mail_dir, config.spool_dir, config.queue_dir,
                   config.tls.cert.parent):
        folder.mkdir(mode=0o750 if folder == data else 0o700, parents=True, exist_ok=True)
    link = data / CONFIG_NAME
    if config_path != link and not link.exists() and not link.is_symlink():
        link.symlink_to(config_path)
        did.append(f"linked {link} -> {config_path} (commands given --data {data} read it)")
    changed = _give_tree(data, uid, gid)
    did.append(f"{'made' if made else 'kept'} {data} and its folders; {changed} file(s) and "
               f"folder(s) given to {user}:{grp.getgrgid(gid).gr_name}")
    from postroom.server import privileges
    from postroom.store.factory import open_store

    account = privileges.Account(user, uid, grp.getgrgid(gid).gr_name, gid)
    with privileges.acting_as(account):  # the user directory's files belong to the account
        users = open_store(config.store).users
        users.has_domain(config.hostname)  # opening the database makes it
        users.close()
    for line in did:
        ctx.say(line)
    ctx.say("logs: on standard error, which systemd hands to the journal "
            "(journalctl -u postroom)")
    ctx.say(f"next: {PROG} --data {data} domain add DOMAIN; {PROG} --data {data} user add "
            f"USER@DOMAIN; {PROG} --data {data} --config {config_path} systemd-unit > "
            "/etc/systemd/system/postroom.service; systemctl daemon-reload; "
            "systemctl enable --now postroom")
    return 0


def _ensure_account(user: str, home: Path, did: list[str]) -> tuple[int, int]:
    """The uid and gid of `user` (its group of the same name), both made if missing."""
    try:
        gid = grp.getgrnam(user).gr_gid
    except KeyError:
        _run(["groupadd", "--system", user])
        gid = grp.getgrnam(user).gr_gid
        did.append(f"created the system group {user} (gid {gid})")
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        shell = next((s for s in NOLOGIN_SHELLS if Path(s).exists()), "/bin/false")
        _run(["useradd", "--system", "--gid", user, "--home-dir", str(home), "--no-create-home",
              "--shell", shell, "--comment", "postroom mail server", user])
        uid = pwd.getpwnam(user).pw_uid
        did.append(f"created the system user {user} (uid {uid}, no login, home {home})")
    if uid == 0:
        raise ConfigError(f"--user: {user!r} is root (uid 0); name an unprivileged user")
    return uid, gid


def _run(command: list[str]) -> None:
    program = shutil.which(command[0]) or next(
        (str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / command[0]).exists()), None)
    if program is None:
        raise ConfigError(f"{command[0]} is not installed (Debian: the passwd package); "
                          f"create the account by hand: {' '.join(command)}")
    result = subprocess.run([program, *command[1:]], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise ConfigError(f"{' '.join(command)} failed: {result.stderr.strip()}")


def _with_run_account(text: str, user: str) -> str:
    """The rendered config with [run] user and group set to `user`."""
    head, mark, run = text.partition("\n[run]\n")
    for key in ("user", "group"):
        run = run.replace(f'\n{key} = "postroom"', f'\n{key} = "{user}"', 1)
        if run.startswith(f'{key} = "postroom"'):
            run = f'{key} = "{user}"' + run[len(f'{key} = "postroom"'):]
    return head + mark + run


def _give_tree(root: Path, uid: int, gid: int) -> int:
    """chown -R without following symlinks; how many entries changed."""
    changed = 0
    for folder, dirs, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, n) for n in (*dirs, *files))]:
            st = os.lstat(name)
            if (st.st_uid, st.st_gid) != (uid, gid):
                os.chown(name, uid, gid, follow_symlinks=False)
                changed += 1
    return changed


# -- systemd-unit --------------------------------------------------------------------


def add_systemd_unit(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "systemd-unit", parents=[common],
        help="print a systemd service unit for this installation",
        description="Print a systemd unit (Type=notify, sandboxed) that runs `postroom serve` "
        "with this --data and --config as an unprivileged user holding only "
        "CAP_NET_BIND_SERVICE. Install: postroom systemd-unit > "
        "/etc/systemd/system/postroom.service; systemctl daemon-reload; "
        "systemctl enable --now postroom",
    )
    p.add_argument("--user", default=SYSTEM_ACCOUNT,
                   help=f"the account the service runs as (default {SYSTEM_ACCOUNT})")
    p.set_defaults(func=_systemd_unit, stay_root=True)


def systemd_unit(python: str, data: Path, config: Path | None, user: str) -> str:
    """The unit's text; `python` runs postroom (this interpreter, so venvs and pipx work)."""
    where = f"--data {data}" + (f" --config {config}" if config else "")
    command = f"{python} -m postroom {where}"
    return f"""\
# postroom as a systemd service (written by `postroom systemd-unit`).
[Unit]
Description=postroom mail server (SMTP, submission, POP3)
After=network-online.target
Wants=network-online.target

[Service]
# READY=1 once every listener is bound; RELOADING=1/READY=1 around a reload;
# STOPPING=1 when the drain begins (sd_notify(3), server/notify.py).
Type=notify
NotifyAccess=main
ExecStart={command} serve
# Refused configs fail the reload with their one-line error; the old one stays.
ExecReload={command} reload
TimeoutStopSec={STOP_TIMEOUT_SECONDS}
Restart=on-failure
RestartSec=5s
# Never root: the ports below 1024 through this one capability, which the
# worker processes give up (server/privileges.py).
User={user}
Group={user}
AmbientCapabilities=CAP_NET_BIND_SERVICE
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
NoNewPrivileges=yes
# The whole file system read-only but the data folder; no home folders, a private
# /tmp and /dev, no kernel knobs.
ProtectSystem=strict
ReadWritePaths={data}
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
UMask=0077
# One descriptor per session (README: "Connection bursts and open files").
LimitNOFILE=65536
# The journal stamps each line; postroom then leaves out its own time.
SyslogIdentifier=postroom

[Install]
WantedBy=multi-user.target
"""


def _systemd_unit(args: argparse.Namespace, ctx: Context) -> int:
    data = ctx.data_dir.absolute() if (getattr(args, "data", None) or os.environ.get(DATA_ENV)) \
        else SYSTEM_DATA
    config = ctx.config_file.absolute() if ctx.config_file else None
    if config is None and data == SYSTEM_DATA and SYSTEM_CONFIG.exists():
        config = SYSTEM_CONFIG
    python = sys.executable
    for home in ("/root", "/home"):
        if python.startswith(home + "/"):
            print(f"{PROG}: warning: {python} is under {home}, which the unit hides "
                  "(ProtectHome) and its user cannot read: install postroom outside home "
                  "folders (README: Installing)", file=sys.stderr)
    ctx.say(systemd_unit(python, data, config, args.user).rstrip("\n"))
    return 0


# -- reload ---------------------------------------------------------------------------


def add_reload(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "reload", parents=[common],
        help="make the running server read its config again (as SIGHUP does)",
        description="Ask the server running on this data folder, through its control "
        "socket, to read its config, certificate, users, domains and aliases again. New "
        "connections get the new config; sessions in progress finish under theirs. A config "
        "with an error is refused with its one-line error, and the one in force stays.",
    )
    p.set_defaults(func=_reload)


def _reload(args: argparse.Namespace, ctx: Context) -> int:
    try:
        answer = tell_server(ctx.data_dir, RELOAD_TIMEOUT_SECONDS, request=RELOAD_REQUEST)
    except ControlError as exc:
        raise ConfigError(f"reload: {exc}") from None
    if answer is None:
        raise ConfigError(f"reload: no server is running on {ctx.data_dir}")
    if answer.stopping:
        raise ConfigError(f"reload: the server (pid {answer.pid}) is stopping")
    if answer.refused:
        raise ConfigError(f"reload refused, the configuration in force stays: {answer.refused}")
    ctx.say(f"reloaded: the server (pid {answer.pid}) serves new connections with the new "
            "configuration")
    return 0
