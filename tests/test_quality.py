"""The code passes its linters: ruff on src, tests and bench; mypy (strict for the protocol cores).

Both run as subprocesses with the configuration in pyproject.toml, from the
repository root, so the test checks exactly what a developer's command line does.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def _report(result: subprocess.CompletedProcess[str]) -> str:
    return f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"


def test_ruff(require_peer: Callable[..., str]) -> None:
    require_peer("ruff", module=True)
    folders = [name for name in ("src", "tests", "bench") if (REPO / name).is_dir()]
    result = _run(["ruff", "check", *folders])
    assert result.returncode == 0, _report(result)


@pytest.mark.timeout(600)
def test_mypy(require_peer: Callable[..., str]) -> None:
    require_peer("mypy", module=True)
    # Files and per-module strictness come from [tool.mypy] in pyproject.toml.
    result = _run(["mypy"])
    assert result.returncode == 0, _report(result)
