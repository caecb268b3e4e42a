"""README.md stays true: its config reference loads, and its quick start names the real commands."""

import re
from pathlib import Path

from postroom.config import load_config, render_default_config

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_in_readme_loads_and_matches_init(tmp_path: Path) -> None:
    text = README.read_text()
    # The reference is the block that starts with `postroom init`'s header.
    (block,) = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S)
                if b.startswith("# postroom configuration")]
    (tmp_path / "postroom.toml").write_text(block)
    config = load_config(tmp_path)
    assert config.hostname == "mx.corp.example"
    expected = render_default_config(hostname="mx.corp.example", domains=["corp.example"])
    assert block.strip() == expected.strip()


def test_quick_start_test_command_is_what_ci_runs() -> None:
    command = "python3 -m pip install -e '.[test]' && python3 -m pytest -q"
    assert command in README.read_text()
    assert command in (README.parent / ".ci" / "run").read_text()
