"""Our own commented examples in conf/ (SPEC §2): each one loads cleanly."""

from __future__ import annotations

from pathlib import Path

import pytest

from wmproxy_tw.config import load_config

CONF = Path(__file__).parents[2] / "conf"
EXAMPLES = sorted(p for p in CONF.iterdir() if p.suffix in (".toml", ".yaml", ".yml")) if CONF.is_dir() else []


def test_conf_has_examples() -> None:
    """conf/ ships at least one example configuration."""
    assert EXAMPLES, f"no .toml/.yaml/.yml files in {CONF}"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_conf_example_loads_without_warnings(path: Path) -> None:
    """Every example in conf/ loads with no errors and no unknown-key warnings."""
    loaded = load_config(str(path))
    assert loaded.warnings == ()
    assert any(s is not None for s in (loaded.config.proxy, loaded.config.http, loaded.config.stream))
