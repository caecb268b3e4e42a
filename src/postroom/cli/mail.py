"""`postroom sendmail`, `send`, `fetch`, `trace` and `demo`: the user's tools and the story.

Their work is in postroom.client.sendmail/send/fetch/trace and postroom.demo,
imported only when run: they pull in asyncio, ssl and the protocol cores.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from postroom.cli.common import Context

if TYPE_CHECKING:
    from postroom.cli.common import Subparsers


# -- sendmail ----------------------------------------------------------------


def add_sendmail(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    # Sendmail's own options (-t, -f, -oi ...) are not argparse's: everything after
    # the word "sendmail" goes to postroom.client.sendmail unparsed ("+" matches none).
    p = sub.add_parser(
        "sendmail", prefix_chars="+", add_help=False,
        help="queue a message from standard input, like /usr/sbin/sendmail (-t, -f, -i)",
    )
    p.add_argument("argv", nargs=argparse.REMAINDER)
    p.set_defaults(func=_sendmail)


def _sendmail(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import sendmail

    return sendmail.main(
        list(args.argv), data_dir=ctx.data_dir, config_file=ctx.config_file,
        stdin=ctx.stdin.buffer if hasattr(ctx.stdin, "buffer") else None,
        stdout=ctx.stdout,
    )


# -- send and fetch ----------------------------------------------------------

def _client_options(p: argparse.ArgumentParser) -> None:
    """Connection options `send` and `fetch` share (client.connect.ServerOptions.from_args)."""
    p.add_argument("--password-file", metavar="FILE",
                   help="read the password from FILE's first line (otherwise from "
                   "$POSTROOM_PASSWORD, otherwise it is asked for on the terminal)")
    p.add_argument("--insecure", action="store_true",
                   help="accept any server certificate (self-signed test servers only)")
    p.add_argument("--cafile", metavar="FILE",
                   help="also trust the CA certificate(s) in FILE, e.g. a server's "
                   "self-signed certificate")
    p.add_argument("--timeout", type=float, default=120.0, metavar="SECONDS",
                   help="for the connection and each reply (default 120)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show the conversation with the server on standard error "
                   "(passwords hidden)")


def add_send(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "send", parents=[common],
        help="write a message and submit it to an SMTP server (TLS + AUTH)",
        description="Build a message (non-ASCII subjects and names, attachments, Bcc kept "
        "out of the headers) and submit it to a submission server with STARTTLS or "
        "implicit TLS and a login. The text comes from --body, --body-file or standard "
        "input. Exit status: 0 every recipient accepted, 1 some refused, 2 usage, "
        "69 unavailable (connection, TLS, login, refusal), 75 temporary failure.",
    )
    p.add_argument("--from", dest="sender", required=True, metavar="ADDRESS",
                   help='the sender, "user@host" or "Name <user@host>"')
    p.add_argument("--name", metavar="NAME", help="the sender's display name")
    p.add_argument("--to", action="append", metavar="ADDRESS", help="a recipient (repeatable)")
    p.add_argument("--cc", action="append", metavar="ADDRESS", help="a copy (repeatable)")
    p.add_argument("--bcc", action="append", metavar="ADDRESS",
                   help="a blind copy: in the envelope, never in the headers (repeatable)")
    p.add_argument("--subject", "-s", metavar="TEXT", default="", help="the subject")
    body = p.add_mutually_exclusive_group()
    body.add_argument("--body", metavar="TEXT", help="the message text")
    body.add_argument("--body-file", metavar="FILE",
                      help="read the message text (UTF-8) from FILE ('-': standard input)")
    p.add_argument("--attach", "-a", action="append", metavar="FILE",
                   help="attach a file (repeatable; its type is guessed from its name)")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   help="the submission server, e.g. smtp.isp.example:587")
    p.add_argument("--security", choices=("starttls", "tls"),
                   help="starttls (port 587 style) or tls (implicit, port 465 style); "
                   "default: tls on ports 465 and 2465, starttls elsewhere")
    p.add_argument("--user", metavar="NAME", help="the login name (default: the --from address)")
    _client_options(p)
    p.set_defaults(func=_send)


def _send(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import send

    return send.command(args, stdin=ctx.stdin, stdout=ctx.stdout, stderr=sys.stderr)


def add_fetch(sub: Subparsers, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "fetch", parents=[common],
        help="download mail from a POP3 server into a Maildir or an mbox file",
        description="Log on to a POP3 server (STLS or implicit TLS) and download every "
        "message into the Maildir DEST (or the mbox file DEST with --mbox), each one "
        "durable on disk before it is deleted on the server. With --keep, messages stay "
        "on the server and their UIDLs are remembered, so the next run fetches only new "
        "ones. A fetch that was interrupted, run again, loses and duplicates nothing. "
        "Exit status: 0 done, 2 usage, 69 unavailable (connection, TLS, login), "
        "75 temporary failure.",
    )
    p.add_argument("dest", metavar="DEST", help="the Maildir folder (made if missing), "
                   "or with --mbox the mbox file")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   help="the POP3 server, e.g. pop.isp.example:995")
    p.add_argument("--security", choices=("stls", "tls"),
                   help="stls (port 110 style) or tls (implicit, port 995 style); "
                   "default: tls on ports 995 and 2995, stls elsewhere")
    p.add_argument("--user", required=True, metavar="NAME", help="the login name")
    p.add_argument("--auth", choices=("auto", "plain", "user", "apop"), default="auto",
                   help="how to log on: auto (SASL PLAIN when offered, else USER/PASS), "
                   "plain, user (USER/PASS) or apop (the greeting must offer it)")
    p.add_argument("--keep", action="store_true",
                   help="leave the messages on the server; fetch only new ones next time")
    p.add_argument("--mbox", action="store_true", help="DEST is an mbox file (mboxrd)")
    p.add_argument("--crlf", action="store_true",
                   help="store messages with CRLF line ends as sent (default: LF)")
    p.add_argument("--state-file", metavar="FILE",
                   help="where the UIDLs of downloaded messages are kept "
                   "(default: DEST/.postroom-fetch-uidls)")
    p.add_argument("--progress", action="store_true",
                   help="show progress even when standard error is not a terminal")
    _client_options(p)
    p.set_defaults(func=_fetch)


def _fetch(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.client import fetch

    return fetch.command(args, stdout=ctx.stdout, stderr=sys.stderr)


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
    p.add_argument("--store", metavar="URL",
                   help="a PostgreSQL server (postgresql://...) where the receiving host "
                   "keeps its users and mail, in a database the demo makes for the run "
                   "(it needs CREATEDB) and drops at the end")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace, ctx: Context) -> int:
    from postroom.demo.run import run_demo

    return run_demo(keep_data=args.keep_data, out=ctx.stdout, store=args.store)
