"""`postroom queue`: why each outgoing message waits, when it is tried next, and changes."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from postroom.cli.common import PROG, Context, group

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers
    from postroom.queue.envelope import Envelope
    from postroom.queue.store import QueueStore


# -- queue -------------------------------------------------------------------


def add_queue(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    action = group(sub, common, "queue", "inspect and manage the outgoing mail queue",
                   "Messages waiting for delivery to other hosts: why each waits and when it "
                   "is tried next. Changes reach a running server at once (through its "
                   "control socket, DATA/postroom.ctl).")
    listing = action("list", _queue_list, "one line per queued message",
                     description="One line per queued message, read from disk as it is "
                     "printed (in the folder's order, sorted by queue ID within each "
                     f"batch of {_LIST_BATCH}): the first line comes at once and memory "
                     "stays the same however long the queue.")
    listing.add_argument("--summary", action="store_true",
                         help="pending recipients by destination domain and by age in "
                         "minutes, like Postfix's qshape")
    listing.add_argument("--top", type=int, metavar="N",
                         help="with --summary: only the N busiest domains")
    action("show", _queue_show, "a message's envelope and recipients").add_argument(
        "queue_id", metavar="ID")
    action("flush", _queue_flush, "try a message (or every message) now").add_argument(
        "queue_id", metavar="ID", nargs="?")
    for name, help_text in (("delete", "remove a message without sending it or a bounce"),
                            ("hold", "keep a message from being tried until released"),
                            ("release", "let a held message be tried again")):
        a = action(name, _queue_change, help_text)
        a.add_argument("queue_id", metavar="ID")
        a.set_defaults(action=name)


def _queue_store(ctx: Context) -> QueueStore:
    from postroom.queue.store import QueueStore

    if ctx.config.store_config.url:  # the queue every node shares
        from postroom.queueopen import open_queue

        return open_queue(ctx.config)
    return QueueStore(ctx.config.queue_dir, create=False)


def _human_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size, smaller, smaller_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60),
                                              ("m", 60, "s", 1)):
        if seconds >= size:
            rest = (seconds % size) // smaller_size
            return f"{seconds // size}{unit}" + (f" {rest}{smaller}" if rest else "")
    return f"{seconds}s"


def _human_size(octets: int) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if octets >= size:
            return f"{octets / size:.1f}{unit}"
    return str(octets)


def _next_try(envelope: Envelope, now: float) -> str:
    if envelope.held:
        return "HELD"
    if envelope.next_attempt <= now:
        return "now"
    return f"in {_human_age(envelope.next_attempt - now)}"


# `queue list` columns: heading, width, and whether values are right-aligned
# (numbers). Widths are fixed, since lines are printed as they are read; a longer
# value pushes the rest of its line right.
_LIST_COLUMNS = (("QUEUE ID", 12, False), ("AGE", 7, True), ("SIZE", 6, True),
                 ("SENDER", 32, False), ("RECIPIENTS", 13, False), ("NEXT TRY", 10, False),
                 ("LAST ERROR", 0, False))
_LIST_ERROR_WIDTH = 60  # characters of the last error shown; `queue show` has it whole
# Queue files read (and sorted) before their lines are printed: a few milliseconds'
# work, so the first line comes at once and memory does not grow with the queue.
_LIST_BATCH = 1000


def _row(values: tuple[str, ...]) -> str:
    cells = [value.rjust(width) if right else value.ljust(width)
             for value, (_heading, width, right) in zip(values, _LIST_COLUMNS, strict=True)]
    return "  ".join(cells).rstrip()


def _list_line(env: Envelope, now: float) -> str:
    errors = [r.last_error for r in env.pending() if r.last_error]
    error = " ".join(errors[0].split()) if errors else ""
    if len(error) > _LIST_ERROR_WIDTH:
        error = error[:_LIST_ERROR_WIDTH - 3] + "..."
    return _row((env.queue_id, _human_age(now - env.created), _human_size(env.size),
                 f"<{env.sender}>", f"{len(env.pending())}/{len(env.recipients)} pending",
                 _next_try(env, now), f"({error})" if error else ""))


def _queue_list(args: argparse.Namespace, ctx: Context) -> int:
    import itertools
    import time

    store = _queue_store(ctx)
    now = time.time()
    if args.summary:
        return _queue_summary(ctx, store, now, args.top)
    names = store.scan_ids()
    count = 0
    while batch := sorted(itertools.islice(names, _LIST_BATCH)):
        lines = [_list_line(env, now) for env in map(store.try_load, batch) if env is not None]
        if lines and not count:
            ctx.say(_row(tuple(heading for heading, _width, _right in _LIST_COLUMNS)))
        count += len(lines)
        if lines:
            ctx.say("\n".join(lines))
    if not count:
        ctx.say("the queue is empty")
    return 0


def _queue_summary(ctx: Context, store: QueueStore, now: float, top: int | None) -> int:
    from postroom.queue.shape import shape_of

    shape = shape_of(store.scan(), now)
    if not shape.messages:
        ctx.say("the queue is empty")
        return 0
    table = shape.table(top)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        ctx.say(" ".join([line[0].rjust(widths[0])]
                         + [cell.rjust(width) for cell, width in zip(line[1:], widths[1:],
                                                                     strict=True)]))
    ctx.say(f"({shape.messages} message{'s' if shape.messages != 1 else ''}; pending "
            "recipients by destination domain and age in minutes)")
    return 0


def _queue_show(args: argparse.Namespace, ctx: Context) -> int:
    import email.utils
    import time

    env = _queue_store(ctx).load(args.queue_id)
    now = time.time()
    give_up = env.created + ctx.config.queue.give_up_after

    def when(t: float) -> str:
        return email.utils.formatdate(t, localtime=True)

    ctx.say(f"message {env.queue_id}")
    submitted = ", ".join(
        x for x in (f"by {env.auth_user}" if env.auth_user else "",
                    f"from {env.client}" if env.client else "") if x
    )
    ctx.say(f"  sender:    <{env.sender}>" + (f" ({submitted})" if submitted else ""))
    ctx.say(f"  arrived:   {when(env.created)} ({_human_age(now - env.created)} ago)")
    ctx.say(f"  size:      {env.size} octets")
    for label, value in (("envid", env.envid), ("ret", env.ret), ("body", env.body)):
        if value:
            ctx.say(f"  {label + ':':<10} {value}")
    if env.done:
        ctx.say("  status:    finished; removed at the server's next pass")
    elif env.held:
        ctx.say(f"  status:    HELD: not tried until `{PROG} queue release {env.queue_id}`")
    elif env.next_attempt <= now:
        ctx.say("  status:    due: tried as soon as the server gets to it")
    else:
        ctx.say(f"  status:    waiting: next try at {when(env.next_attempt)} "
                f"(in {_human_age(env.next_attempt - now)})")
    if not env.done:
        left = f"in {_human_age(give_up - now)}" if give_up > now else "after the next failure"
        then = "returns it to the sender" if env.sender else "drops it (it is a bounce)"
        ctx.say(f"  gives up:  {when(give_up)} ({left}), then {then}")
    ctx.say("  recipients:")
    for r in env.recipients:
        tries = f"{r.attempts} attempt{'s' if r.attempts != 1 else ''}"
        ctx.say(f"    <{r.address}>  {r.state}, {tries}"
                + (f", dsn={r.dsn_status}" if r.dsn_status else ""))
        if r.last_error:
            relay = f"{r.remote_mta}: " if r.remote_mta else ""
            ctx.say(f"        last answer: {relay}{' '.join(r.last_error.split())}")
    return 0


def _poke_server(ctx: Context, queue_id: str | None) -> str:
    """Tell the running server that message `queue_id` changed (None: flush them all)."""
    from postroom.control import FLUSH, tell_server_in_words, wake_request

    request = FLUSH if queue_id is None else wake_request(queue_id)
    return "; " + tell_server_in_words(ctx.config.data_dir, request)


class _Held(Exception):
    """A message to flush is held: nothing was changed."""


def _queue_flush(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.queue.store import NotQueued

    store = _queue_store(ctx)

    def now_please(env: Envelope) -> None:
        if env.held:  # flushing does not release it: `queue release` does
            raise _Held(env.queue_id)  # before the write: the envelope stays as it is
        env.next_attempt = 0.0

    told: str | None = None  # the running server took a flush of everything
    if args.queue_id:
        try:
            store.update(args.queue_id, now_please)
        except _Held:
            raise ValueError(f"{args.queue_id} is held: it is not tried until "
                             f"`{PROG} queue release {args.queue_id}`") from None
        what = args.queue_id
    else:
        told = _flush_running_server(ctx)
        count = held = 0
        for env in store.scan():  # skips (and logs) unreadable envelopes
            if told is not None:  # the server flushes in memory: only count
                held += env.held
                count += not env.held
                continue
            try:
                store.update(env.queue_id, now_please)
                count += 1
            except NotQueued:
                continue  # delivered meanwhile
            except _Held:
                held += 1
        what = f"{count} message{'s' if count != 1 else ''}"
        if held:
            what += (f" ({held} held, left alone: `{PROG} queue release ID` "
                     "lets one be tried)")
    words = f"; {told}" if told is not None else _poke_server(ctx, args.queue_id or None)
    ctx.say(f"flushed {what}{words}")
    return 0


def _flush_running_server(ctx: Context) -> str | None:
    """Ask the running server to try every message now, as `postqueue -f` asks Postfix's
    queue manager: it does so in memory, and nothing is written per message. None when
    no server took the request: the flush is then written into each envelope, for the
    next server to find."""
    from postroom.control import FLUSH, ControlError, tell_server

    try:
        answer = tell_server(ctx.config.data_dir, request=FLUSH)
    except ControlError:
        return None
    if answer is None or answer.stopping:
        return None
    return f"told the server (pid {answer.pid})"


def _queue_change(args: argparse.Namespace, ctx: Context) -> int:
    store = _queue_store(ctx)
    if args.action == "delete":
        store.remove(args.queue_id)
        ctx.say(f"deleted {args.queue_id}{_poke_server(ctx, args.queue_id)}")
        return 0
    held = args.action == "hold"

    def set_held(env: Envelope) -> None:
        env.held = held

    store.update(args.queue_id, set_held)
    ctx.say(f"{'held' if held else 'released'} {args.queue_id}"
            f"{_poke_server(ctx, args.queue_id)}")
    return 0
