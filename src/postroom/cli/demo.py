"""`postroom trace` and `postroom demo`: a message's path, told from headers or shown live."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from postroom.cli.common import Context

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers


# -- trace -------------------------------------------------------------------


def add_trace(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "trace", parents=[common],
        help="show a message's path hop by hop, from its Received headers",
        description="Read the Received headers of a message (a file, or the message "
        "whose Received headers carry the queue ID, looked up in DIR/queue and the "
        "Maildirs under DIR/mail) and print each hop, oldest first: the sending and "
        "receiving host, the protocol (ESMTPSA = TLS + AUTH, RFC 3848), TLS version and "
        "cipher, queue ID, time, and the delay since the hop before.",
    )
    p.add_argument("target", metavar="FILE|QUEUE-ID")
    p.set_defaults(func=_trace)


def _trace(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client.trace import trace

    return trace(args.target, lambda: ctx.config, ctx.stdout)


# -- demo --------------------------------------------------------------------


def add_demo(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "demo", parents=[common],
        help="the whole path of one message on loopback, step by step",
        description="Start, in a temporary folder on free loopback ports, a provider "
        "host (mail.isp.example), a receiving host (mx.corp.example) and a small DNS "
        "server; then send one message from smith@isp.example to boss@corp.example and "
        "show every step: submission with STARTTLS and AUTH, the queue, the MX lookup "
        "and relay, delivery into the Maildir, and the POP3 download. Everything it "
        "started is stopped at the end. Exit status 0 when the message arrived intact. "
        "Ignores --data and --config.",
    )
    p.add_argument("--keep-data", action="store_true",
                   help="keep the temporary folder (configs, queue, mailboxes, the "
                   "servers' log in postroom.log) and print its path")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.demo.run import run_demo

    return run_demo(keep_data=args.keep_data, out=ctx.stdout)
