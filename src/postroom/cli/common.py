"""What every `postroom` subcommand shares: the handler's Context and the parser helpers."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from postroom.config import DEFAULT_DATA_DIR, Config, load_config
from postroom.store.api import UserDirectory
from postroom.store.factory import open_store

PROG = "postroom"
EXIT_USAGE = 2  # argparse's status for usage errors; used for every user-fixable error
DATA_ENV = "POSTROOM_DATA"

Handler = Callable[[argparse.Namespace, "Context"], int]
if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]


class Context:
    """What a handler may need, each part made on first use (so `init` needs no config)."""

    def __init__(self, args: argparse.Namespace) -> None:
        data = getattr(args, "data", None) or os.environ.get(DATA_ENV) or str(DEFAULT_DATA_DIR)
        config = getattr(args, "config", None)
        self.data_dir = Path(data)
        self.config_file = Path(config) if config else None
        self.stdin: TextIO = sys.stdin
        self.stdout: TextIO = sys.stdout

    @cached_property
    def config(self) -> Config:
        return load_config(self.data_dir, self.config_file)

    @cached_property
    def directory(self) -> UserDirectory:
        return open_store(self.config.store).users

    def say(self, text: str) -> None:
        print(text, file=self.stdout)


def subparsers(parser: argparse.ArgumentParser, title: str) -> Subparsers:
    return parser.add_subparsers(title=title, metavar="COMMAND")


def group(sub: Subparsers, common: argparse.ArgumentParser, name: str, help: str,
          description: str) -> Callable[..., argparse.ArgumentParser]:
    """A command made of actions (`postroom user add ...`), which prints its help when run
    without one; returns `action(name, func, help, **parser_options)`, which adds an
    action that runs `func` and returns its parser, for its arguments."""
    p = sub.add_parser(name, parents=[common], help=help, description=description)
    p.set_defaults(func=help_of(p))
    actions = subparsers(p, "actions")

    def action(name: str, func: Handler, help: str, **options: Any) -> argparse.ArgumentParser:
        a = actions.add_parser(name, parents=[common], help=help, **options)
        a.set_defaults(func=func)
        return a

    return action


def help_of(parser: argparse.ArgumentParser) -> Handler:
    """Handler for a command group run without its action: print the group's help."""

    def show(args: argparse.Namespace, ctx: Context) -> int:
        parser.print_help(ctx.stdout)
        return 0

    return show
