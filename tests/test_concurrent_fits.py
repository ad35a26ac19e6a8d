"""Two `piaa fit` processes at once, and a search that refits while a fit runs, on SQLite and
Postgres: every process ends cleanly (exit 0, no traceback) and the library holds exactly the
tags of one uninterrupted fit. Real processes on the shipped shapesworld model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.reliability]  # ~1 min of real processes

N_IMAGES = 160


def _env(home: Path, db_url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(home), PIAA_MODEL="shapesworld", PIAA_DEVICE="cpu")
    env["HF_HUB_OFFLINE"] = "1"
    if db_url:
        env["PIAA_DB"] = db_url
    return env


def _piaa(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "piaa_index", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (args, result.stderr[-2000:])
    return result.stdout


def _together(env: dict[str, str], *commands: list[str]) -> None:
    """Start every command at once; each must exit 0 without a traceback."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "piaa_index", *cmd],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for cmd in commands
    ]
    for cmd, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (cmd, err[-2000:])
        assert "Traceback" not in err, (cmd, err[-2000:])


def _tags(env: dict[str, str], home: Path) -> dict[str, list[str]]:
    out = home / "tags.json"
    _piaa(env, "export", "json", "--output", str(out))
    return {
        item["path"]: sorted(x["label"] for x in item["labels"])
        for item in json.loads(out.read_text())
    }


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    from piaa_index.shapes.dataset import generate_dataset

    root = generate_dataset(
        tmp_path_factory.mktemp("scenes"), N_IMAGES, seed=21, size=96, progress=False
    )
    return root / "images", json.loads((root / "classes.json").read_text())


def run_concurrent_fits(tmp_path: Path, make_db: Callable[[], str | None], scenes) -> None:
    photos, labels = scenes
    ref_home, home = tmp_path / "ref", tmp_path / "lib"
    ref, env = _env(ref_home, make_db()), _env(home, make_db())
    for e in (ref, env):
        _piaa(e, "index", str(photos))
        _piaa(e, "vocab", "set", *labels)
    _piaa(ref, "fit")
    expected = _tags(ref, ref_home)
    assert any(expected.values())

    _together(env, ["fit"], ["fit"])
    assert _tags(env, home) == expected
    # A vocabulary change makes the tags stale: a search refits while a fit runs.
    for e in (ref, env):
        _piaa(e, "vocab", "set", *labels[: len(labels) // 2])
    _piaa(ref, "fit")
    _together(env, ["fit"], ["search", labels[0], "--json"])
    assert _tags(env, home) == _tags(ref, ref_home)
    assert json.loads(_piaa(env, "db", "check", "--json"))["ok"]


def test_two_fits_at_once_on_sqlite(tmp_path: Path, scenes) -> None:
    run_concurrent_fits(tmp_path, lambda: None, scenes)


@pytest.mark.postgres
def test_two_fits_at_once_on_postgres(
    tmp_path: Path, postgres_database: Callable[[], str], scenes
) -> None:
    run_concurrent_fits(tmp_path, postgres_database, scenes)
