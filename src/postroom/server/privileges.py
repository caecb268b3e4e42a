"""Who the server runs as: started as root, it binds its listeners and then becomes [run] user.

Ports below 1024 need root or CAP_NET_BIND_SERVICE (capabilities(7)). As
Postfix's master and Dovecot do, `postroom serve` started as root binds every
listener first and then switches for good to the unprivileged account of
`[run] user` / `group` (setgroups, setgid, setuid: no way back), before it
forks its workers and before it reads or writes any mail. Only the primary
keeps CAP_NET_BIND_SERVICE (nothing else of root), so that a reload can open a
new listener on a standard port; the workers drop it too. A process started
by another user with CAP_NET_BIND_SERVICE (systemd's AmbientCapabilities=,
`setpriv --ambient-caps`) binds the same ports and switches to nobody.

Root stays root only when told to (`run.user = "root"` or `serve --user
root`). A switch that cannot work stops the start with one line that says
what to do: an account that does not exist, a data folder, queue or Maildir
that belongs to someone else, a TLS key the account cannot read.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import grp
import logging
import os
import pwd
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from postroom.config import Config, ConfigError

log = logging.getLogger("postroom.master")

ROOT = "root"
# The environment's stand-in for `serve --user` (as POSTROOM_DATA is for --data).
USER_ENV = "POSTROOM_RUN_USER"

# linux/prctl.h and linux/capability.h
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
CAP_NET_BIND_SERVICE = 10
LINUX_CAPABILITY_VERSION_3 = 0x20080522
# How deep below the mail folder ownership is checked: DOMAIN/USER/{cur,new,tmp}.
MAIL_CHECK_DEPTH = 3
# Problems named in the one-line error; the rest are counted.
PROBLEMS_SHOWN = 1


@dataclass(frozen=True)
class Account:
    """The unprivileged user and group the server switches to."""

    user: str
    uid: int
    group: str
    gid: int

    @property
    def owner(self) -> str:
        return f"{self.user}:{self.group}"


def wanted_user(config: Config, override: str | None) -> tuple[str, str]:
    """The user name to run as and where it was set (for error messages)."""
    if override:
        return override, "--user"
    from_env = os.environ.get(USER_ENV, "").strip()
    if from_env:
        return from_env, USER_ENV
    return config.run.user, f"{config.source}: run.user"


def lookup(user: str, group: str, where: str, group_where: str) -> Account:
    """The account named `user` and `group` (names or numbers); ConfigError naming the key."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(
            f"{where}: there is no user {user!r} on this system; create it (`postroom init "
            f"--system` does), or set it to \"root\" to keep running as root"
        ) from None
    if pw.pw_uid == 0:
        raise ConfigError(f"{where}: {user!r} is root (uid 0); name an unprivileged user")
    try:
        gr = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
    except KeyError:
        raise ConfigError(
            f"{group_where}: there is no group {group!r} on this system; create it "
            "(`postroom init --system` does)"
        ) from None
    if gr.gr_gid == 0:
        raise ConfigError(f"{group_where}: {group!r} is root's group (gid 0); name another")
    return Account(pw.pw_name, pw.pw_uid, gr.gr_name, gr.gr_gid)


def resolve(config: Config, override: str | None = None) -> Account | None:
    """The account to switch to after binding, or None: not started as root, or told to
    stay root. ConfigError when the account does not exist or is root under another name."""
    if os.geteuid() != 0:
        return None
    user, where = wanted_user(config, override)
    if user in (ROOT, "0"):
        return None
    group, group_where = config.run.group, f"{config.source}: run.group"
    if where in ("--user", USER_ENV):  # the user named there, in its own login group
        with contextlib.suppress(KeyError, ValueError):
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
            group, group_where = str(pw.pw_gid), where
    return lookup(user, group, where, group_where)


# -- making and checking what the account owns ---------------------------------------


def make_folders(folders: Iterable[Path], account: Account | None) -> None:
    """mkdir -p each folder (mode 0700); what this makes belongs to `account`."""
    for folder in folders:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if account is not None:
            for path in missing:
                os.chown(path, account.uid, account.gid)


def give(paths: Iterable[Path], account: Account) -> None:
    """chown what the server made as root before the switch (its pid file, control socket,
    a new self-signed certificate) to the account."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.chown(path, account.uid, account.gid, follow_symlinks=False)


@contextlib.contextmanager
def acting_as(account: Account | None) -> Iterator[None]:
    """Root, for a while, as `account` (effective IDs only): the files made meanwhile (the
    user directory's database, a certificate) belong to it. Nothing when None."""
    if account is None:
        yield
        return
    os.setegid(account.gid)
    os.seteuid(account.uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def become_data_owner(data_dir: Path) -> Account | None:
    """A command run by root on a data folder that belongs to another user (a system
    layout) becomes that user for good, so that what it writes (users, queue files,
    Maildirs) stays readable and writable by the server. None when nothing changed."""
    if os.geteuid() != 0:
        return None
    try:
        st = data_dir.stat()
    except OSError:
        return None
    if st.st_uid == 0:
        return None
    try:
        name = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        return None  # an owner with no account: leave the command as it is
    account = Account(name, st.st_uid, str(st.st_gid), st.st_gid)
    drop(account, keep_bind=False)
    return account


def _walk(folder: Path, depth: int) -> Iterator[Path]:
    """`folder` and the folders below it, `depth` levels deep."""
    yield folder
    if depth <= 0:
        return
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(Path(entry.path), depth - 1)


def problems(config: Config, account: Account) -> list[str]:
    """What keeps `account` from running this data folder, each as a few words; run as
    that account (after `drop`, or within `acting_as`), so that access(2) answers for it."""
    found: list[str] = []
    folders: list[Path] = [config.data_dir, config.queue_dir, config.spool_dir]
    if config.mail_dir.exists():
        folders += _walk(config.mail_dir, MAIL_CHECK_DEPTH)
    for folder in folders:
        try:
            st = folder.stat()
        except FileNotFoundError:
            continue
        except OSError as exc:
            found.append(f"{folder}: {exc.strerror}")
            continue
        if st.st_uid != account.uid:
            found.append(f"{folder} belongs to {_user_name(st.st_uid)}, not {account.user}")
        elif not os.access(folder, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
            found.append(f"{folder}: {account.user} may not write in it")
    db = config.users_db
    for path in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        if path.exists() and not os.access(path, os.R_OK | os.W_OK, effective_ids=True):
            found.append(f"{path}: {account.user} may not write it")
    for path in (config.tls.cert, config.tls.key):
        if path.exists() and not os.access(path, os.R_OK, effective_ids=True):
            found.append(f"{path}: {account.user} may not read it")
    return found


def check(config: Config, account: Account) -> None:
    """ConfigError, one line, when the account cannot run the data folder (see problems)."""
    found = problems(config, account)
    if not found:
        return
    more = f" (and {len(found) - PROBLEMS_SHOWN} more)" if len(found) > PROBLEMS_SHOWN else ""
    raise ConfigError(
        f"{'; '.join(found[:PROBLEMS_SHOWN])}{more}: postroom serve runs as {account.user} "
        f"(run.user), which must own the data folder: chown -R {account.owner} "
        f"{config.data_dir} (postroom init --system prepares it)"
    )


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


# -- the switch ----------------------------------------------------------------------


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _prctl(option: int, value: int) -> None:
    if _libc().prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def set_capabilities(capabilities: Iterable[int]) -> None:
    """This thread's capabilities become exactly `capabilities`, effective and permitted
    (none inheritable, so none ambient: capabilities(7))."""
    mask = [0, 0]
    for cap in capabilities:
        mask[cap // 32] |= 1 << (cap % 32)
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)(*(_CapData(m, m, 0) for m in mask))
    if _libc().capset(ctypes.byref(header), data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset: {os.strerror(err)}")


def has_capability(cap: int) -> bool:
    """Whether `cap` is in this process's effective set (/proc/self/status CapEff)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def drop(account: Account, *, keep_bind: bool = True) -> None:
    """Become `account` for good: its groups, its gid, its uid (real, effective, saved).

    With `keep_bind`, CAP_NET_BIND_SERVICE stays (and no other capability): a reload
    can then still bind a port below 1024. Raises OSError if any step fails, or if
    root could be taken back.
    """
    with contextlib.suppress(PermissionError, KeyError):
        os.initgroups(account.user, account.gid)
    if keep_bind:
        _prctl(PR_SET_KEEPCAPS, 1)  # keep the permitted set across setuid
    os.setgid(account.gid)
    os.setuid(account.uid)
    if keep_bind:
        _prctl(PR_SET_KEEPCAPS, 0)
        set_capabilities([CAP_NET_BIND_SERVICE])
    # setuid made the process undumpable, which hands its /proc files to root: the
    # server could no longer list its own descriptors (/proc/self/fd). It holds
    # nothing its account cannot read anyway.
    _prctl(PR_SET_DUMPABLE, 1)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (account.uid,) * 2 + (
            account.gid,) * 2:
        raise OSError(f"could not become {account.owner}")
    try:
        os.setuid(0)
    except PermissionError:
        return
    raise OSError(f"still able to become root after switching to {account.user}")


def drop_bind_capability() -> None:
    """In a worker: give up CAP_NET_BIND_SERVICE (it binds nothing; the primary does)."""
    if has_capability(CAP_NET_BIND_SERVICE) and os.geteuid() != 0:
        try:
            set_capabilities([])
        except OSError as exc:
            log.warning("could not drop CAP_NET_BIND_SERVICE in a worker: %s", exc)
