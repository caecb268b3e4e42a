"""The layers' arrows (DESIGN.md, "Arrows a test checks"), read from the source with `ast`.

A rule is one row of RULES: nothing in a package may import a forbidden module
or anything below it. Every import under src/postroom counts wherever it
stands (inside functions and `if TYPE_CHECKING:` blocks too), relative imports
are resolved, `from a import b` counts as importing both `a` and `a.b` (b may
be a module), and `importlib.import_module("a")` or `__import__("a")` with a
literal name count as well. A row whose package does not exist fails, so a
rename cannot switch a rule off unnoticed.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
IMPORT_CALLS = ("importlib.import_module", "import_module", "__import__")

SANS_IO = "the protocol cores do no I/O and read no clock or config: the server layer does"
BELOW_SERVER = "data flows down: the layers under the asyncio shell never call back up into it"
VALUES = "it gets values (an options dataclass, paths), never the whole config"
CLIENTS_APART = ("the relay and the user's tools share their SMTP client connection through "
                 "postroom.net, not through each other")
NET_BELOW_CLIENTS = ("postroom.net holds the client connections both the relay and the user's "
                     "tools use: it sits under them and reads no config")

# (package, forbidden, why): no module of `package` imports `forbidden` or below it.
RULES: list[tuple[str, str, str]] = [
    ("postroom.client", "postroom.server",
     "the user's tools reach servers over the wire only; the demo, which starts "
     "servers in-process, is postroom.demo"),
    *[("postroom.protocol", name, SANS_IO)
      for name in ("asyncio", "socket", "ssl", "time", "postroom.config")],
    ("postroom.store", "postroom.config",
     "the store gets values (store.api.StoreSettings), so that it serves any caller and "
     "a second backend is chosen from the same values"),
    *[(package, "postroom.server", BELOW_SERVER)
      for package in ("postroom.protocol", "postroom.policy", "postroom.queue",
                      "postroom.delivery", "postroom.store", "postroom.milter")],
    ("postroom.milter", "postroom.config", VALUES),
    *[(package, "postroom.config", VALUES)
      for package in ("postroom.queue", "postroom.delivery", "postroom.tlscert")],
    ("postroom.queue", "postroom.delivery",
     "the queue calls the couriers it is given; they get an open content stream and its "
     "size, and the result type is the queue's (postroom.queue.result)"),
    ("postroom.client", "postroom.delivery", CLIENTS_APART),
    ("postroom.delivery", "postroom.client", CLIENTS_APART),
    *[("postroom.net", name, NET_BELOW_CLIENTS)
      for name in ("postroom.client", "postroom.delivery", "postroom.demo", "postroom.server",
                   "postroom.queue", "postroom.store", "postroom.policy", "postroom.config")],
]


def module_name(path: Path, root: Path = SRC) -> str:
    """`postroom.client.send` for src/postroom/client/send.py; a package for its __init__."""
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(package: str, module: str | None, level: int) -> str:
    """The absolute name `from <level dots><module> import ...` means inside `package`."""
    if not level:
        return module or ""
    anchor = package.split(".")[: len(package.split(".")) - (level - 1)]
    return ".".join([*anchor, module] if module else anchor)


def imports_of(path: Path, root: Path = SRC) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, at any depth."""
    module = module_name(path, root)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(package, node.module, node.level)
            yield node.lineno, base
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}"
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and ast.unparse(node.func) in IMPORT_CALLS):
            yield node.lineno, node.args[0].value


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def violations(package: str, forbidden: str, root: Path = SRC) -> list[str]:
    """Where `package` imports `forbidden`, as "path:line imports name"."""
    folder = root.joinpath(*package.split("."))
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    found: dict[tuple[str, int], str] = {}
    for path in files:
        for line, name in imports_of(path, root):
            if _within(name, forbidden):
                found.setdefault((str(path.relative_to(root)), line), name)
    return [f"{where}:{line} imports {name}" for (where, line), name in sorted(found.items())]


@pytest.mark.parametrize(("package", "forbidden", "why"), RULES,
                         ids=[f"{p} -/-> {f}" for p, f, _ in RULES])
def test_layer_rule(package: str, forbidden: str, why: str) -> None:
    folder = SRC.joinpath(*package.split("."))
    assert folder.is_dir() or folder.with_suffix(".py").is_file(), f"no package {package}"
    found = violations(package, forbidden)
    assert not found, f"{package} must not import {forbidden} ({why}):\n" + "\n".join(found)


def test_every_kind_of_import_is_seen(tmp_path: Path) -> None:
    folder = tmp_path / "postroom" / "client"
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("from ..server import main\n")
    (folder / "tool.py").write_text(
        "from __future__ import annotations\n"
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from postroom.server.main import Running\n"
        "def later():\n"
        "    from postroom import server\n"
        "    from . import send\n"
        "    import postroom.server.smtp as smtp\n"
        "    import_module('postroom.server.relay')\n"
        "    return importlib.import_module('postroom.server.pop3')\n"
    )
    assert set(imports_of(folder / "tool.py", tmp_path)) >= {
        (2, "os.path"), (5, "postroom.server.main"), (7, "postroom.server"),
        (8, "postroom.client.send"), (9, "postroom.server.smtp"), (10, "postroom.server.relay"),
        (11, "postroom.server.pop3")}
    found = violations("postroom.client", "postroom.server", tmp_path)
    assert [v.split(" ")[0] for v in found] == [
        "postroom/client/__init__.py:1", "postroom/client/tool.py:5", "postroom/client/tool.py:7",
        "postroom/client/tool.py:9", "postroom/client/tool.py:10", "postroom/client/tool.py:11"]
    assert violations("postroom.client", "postroom.serve", tmp_path) == []  # whole names only
