"""`postroom fetch`: POP3 mail into a Maildir or mbox, deleted on the server only once safe.

`fetch` runs one POP3 session (`client.pop3_session`: STLS or implicit TLS,
CAPA, a SASL PLAIN, USER/PASS or APOP login, STAT, LIST and UIDL) into a sink
(`client.sinks`: a Maildir or an mbox file), keeping the UIDLs it downloaded.
Each new message is streamed into a local file (never whole in memory) and
made durable before anything else happens to it:

1. RETR n, written to DEST/tmp (or appended to the mbox), its data synced,
   renamed into DEST/new and the folder synced (postroom.store.durable);
2. its UIDL recorded in the state file (rewritten atomically);
3. without --keep, DELE n. The server removes marked messages only when QUIT
   ends the session (RFC 1939 6), so a session that drops deletes nothing.

A run that was interrupted therefore loses nothing, and run again duplicates
nothing: a message whose UIDL is recorded is not stored again (with --keep it
is left alone; without it is deleted now, its earlier DELE having been lost).
Once QUIT succeeded, the UIDLs of deleted messages are dropped from the state
file, and with --keep those the server no longer lists.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import TextIO

from postroom.client import pop3_session
from postroom.client.connect import EX_OK, ClientError, read_password, report
from postroom.client.pop3_session import FetchOptions, FetchResult, human_size
from postroom.client.sinks import STATE_NAME, MaildirSink, MboxSink, SeenUIDLs, Sink

__all__ = ["FetchError", "FetchOptions", "FetchResult", "command", "fetch", "summary"]


class FetchError(ClientError):
    """The fetch failed; `result` says what was done before (messages already safe)."""

    def __init__(self, text: str, *, kind: str, temporary: bool = False) -> None:
        super().__init__(text, kind=kind, temporary=temporary)
        self.result: FetchResult | None = None


def summary(result: FetchResult, *, keep: bool) -> str:
    """One line: "3 messages (14 KiB) downloaded, 3 deleted on the server"."""
    count = result.downloaded
    if count:
        size = human_size(result.octets)
        text = f"{count} message{'s' if count != 1 else ''} ({size}) downloaded"
    else:
        text = "no new messages"
    if result.skipped:
        text += f", {result.skipped} already downloaded before"
    if result.failed:
        text += f", {result.failed} the server would not give"
    if result.deleted:
        text += f", {result.deleted} deleted on the server"
    elif keep and count:
        text += ", kept on the server"
    return text


async def fetch(options: FetchOptions) -> FetchResult:
    """Download every new message as `options` say; see the module docstring.

    Raises FetchError, carrying the partial result.
    """
    dest = Path(options.dest)
    state_file = options.state_file
    if state_file is None:  # beside the mbox file, inside the Maildir
        state_file = dest.parent / f".{dest.name}{STATE_NAME}" if options.mbox else (
            dest / STATE_NAME)
    result = FetchResult()
    try:
        state = SeenUIDLs(Path(state_file), f"pop3://{options.user}@{options.host}")
        state.load()
        store: Sink = (MboxSink if options.mbox else MaildirSink)(dest, crlf=options.crlf)
        context = options.tls_context()
        store.open()
    except ClientError as exc:
        raise _failed(exc, result) from None
    try:
        await pop3_session.run(options, context, store, state, result)
    except ClientError as exc:
        raise _failed(exc, result) from None
    except OSError as exc:  # writing the local copy: a full disk, a lost folder
        text = f"cannot store the messages: {exc.strerror or exc}"
        if exc.filename:
            text += f": {exc.filename}"
        raise _failed(ClientError(text, kind="local", temporary=True), result) from None
    finally:
        store.close()
    return result


def _failed(exc: ClientError, result: FetchResult) -> FetchError:
    """`exc` as the FetchError that carries what was done; nothing counts as deleted."""
    error = exc if isinstance(exc, FetchError) else FetchError(
        exc.text, kind=exc.kind, temporary=exc.temporary)
    result.deleted = 0
    error.result = result
    return error


# --- The command line -----------------------------------------------------------------------


def command(
    args: argparse.Namespace,
    *,
    stdout: TextIO,
    stderr: TextIO,
    environ: dict[str, str] | None = None,
) -> int:
    """`postroom fetch` with the arguments cli.add_fetch defines; returns the exit status."""
    try:
        server = FetchOptions.from_args(args, stderr)
        password = read_password(user=args.user, password_file=args.password_file,
                                 stderr=stderr, environ=environ)
        options = FetchOptions(
            **server, user=args.user, password=password, dest=Path(args.dest), keep=args.keep,
            auth=args.auth, state_file=Path(args.state_file) if args.state_file else None,
            progress=args.progress or stderr.isatty(), progress_stream=stderr,
            mbox=args.mbox, crlf=args.crlf)
        result = asyncio.run(fetch(options))
    except (ClientError, OSError, ValueError) as exc:
        partial = getattr(exc, "result", None)
        if partial is not None and (partial.downloaded or partial.skipped):
            print(f"postroom fetch: {summary(partial, keep=args.keep)} before:", file=stderr)
        return report("postroom fetch", exc, stderr)
    print(summary(result, keep=args.keep), file=stdout)
    return EX_OK
