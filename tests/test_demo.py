"""`piaa demo`: the README's first command, on a small sample so it runs in the test suite."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.model.encoder import SHAPESWORLD_DIR

pytestmark = pytest.mark.skipif(
    not (SHAPESWORLD_DIR / "shapesworld.safetensors").is_file(),
    reason="the shipped shapesworld checkpoint is not in this checkout",
)


def test_demo_runs_offline_and_prints_the_ablation(tmp_path):
    """Generate, index with the shipped model, fit, tag, search, ablation: all offline."""
    result = CliRunner().invoke(
        cli,
        ["-q", "demo", "--dir", str(tmp_path), "--images", "40", "--fit-images", "40"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "| method | mAP | CF1 | OF1 |" in out
    for method in ("cls", "patch-text", "pvcl", "piaa"):
        assert f"| {method} |" in out
    # The library it built is a normal one: the CLI can query it afterwards.
    again = CliRunner().invoke(
        cli, ["--home", str(tmp_path / "index"), "status", "--json"], catch_exceptions=False
    )
    assert again.exit_code == 0 and '"indexed": 80' in again.output
