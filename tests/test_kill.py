"""Kill at random: `index`, `fit` and `db vacuum` killed with SIGKILL at a random moment (seeded),
then run again, lose nothing, duplicate nothing and leave nothing orphaned, and the tags are those
of a run that was never interrupted. SQLite and Postgres.

Every step is a real `piaa` process on the shipped shapesworld model (deterministic weights)
over ShapesWorld scenes, so that the tags compared are real ones.
The index runs commit every 16 images here (the CLI's default is 256) so that a kill lands
between commits as well as inside one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.piaa_processes import PiaaProcesses

pytestmark = [pytest.mark.slow, pytest.mark.reliability]

ROUNDS = int(os.environ.get("PIAA_KILL_ROUNDS", "1"))  # each: kills index, fit, vacuum
N_IMAGES = 96

# `piaa index` as the library runs it, with small commit groups.
INDEX_DRIVER = """
import sys
from piaa_index.engines.indexer import Indexer
from piaa_index.library.core import Library
lib = Library.open()
Indexer(lib.store, lib.vectors, lambda: lib.encoder, batch_size=8, commit_every=16).run(
    sys.argv[1:], prune=True, progress=False
)
"""


class Piaa(PiaaProcesses):
    """One library driven by processes; `index` runs with small commit groups."""

    timeout = 300

    def __init__(self, home: Path, db_url: str | None, photos: Path):
        super().__init__(home, db_url)
        self.photos = photos

    def command(self, step: str) -> list[str]:
        if step == "index":
            return [sys.executable, "-c", INDEX_DRIVER, str(self.photos)]
        args = {"fit": ["fit"], "vacuum": ["db", "vacuum"]}[step]
        return [sys.executable, "-m", "piaa_index", *args]

    def step(self, step: str) -> float:
        started = time.monotonic()
        result = subprocess.run(
            self.command(step), env=self.env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, (step, result.stderr[-2000:])
        return time.monotonic() - started

    def killed(self, step: str, after: float) -> bool:
        """Start `step`, SIGKILL it `after` seconds in; True when it was still running."""
        proc = subprocess.Popen(
            self.command(step),
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=after)
            return False
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True


def assert_consistent(home: Path, db_url: str | None, n_images: int) -> None:
    """0 lost, 0 duplicated, 0 orphaned: SQL rows against the vector shards on disk."""
    from piaa_index.catalog.schema import INDEXED
    from piaa_index.library.core import Library

    with Library.open(home=home, db=db_url, model="shapesworld") as lib:
        counts = lib.store.image_counts()
        assert counts == {INDEXED: n_images}, counts  # nothing lost, nothing left pending
        locations = lib.store.live_locations()
        ids = [i for i, _, _ in locations]
        assert len(ids) == len(set(ids)) == n_images  # nothing duplicated
        assert len({(s, r) for _, s, r in locations}) == len(locations)
        by_shard: dict[int, dict[int, int]] = {}
        for image_id, shard, row in locations:
            by_shard.setdefault(shard, {})[row] = image_id
        assert lib.vectors.shard_ids() == set(by_shard)  # no orphaned shard, none missing
        for shard, rows in by_shard.items():
            stored = lib.vectors.read_shard(shard, with_patches=False).image_ids
            for row, image_id in rows.items():
                assert int(stored[row]) == image_id  # each row holds its own image's vectors


def give_vacuum_work(lib: Piaa) -> None:
    """Work for vacuum: 3/4 of the images go (pruned: the first shard is mostly dead) and come
    back in two runs (two small shards to merge): it rewrites three shards."""
    doomed = sorted(lib.photos.iterdir())[: 3 * N_IMAGES // 4]
    saved = [(p, p.read_bytes()) for p in doomed]
    for p in doomed:
        p.unlink()
    lib.step("index")
    half = len(saved) // 2
    for part in (saved[:half], saved[half:]):
        for p, data in part:
            p.write_bytes(data)
        lib.step("index")


def kill_vacuum_mid_work(lib: Piaa, timing: dict[str, float], rng: random.Random) -> bool:
    """SIGKILL `db vacuum` after it has begun writing: its work is a fraction of a second after
    ~1 s of start-up, so kills step forward from the start-up time (measured on the reference)
    until one lands after new shard files appeared. Each kill is followed by the consistency
    check. True once a kill landed mid-work."""
    step = max(0.03, (timing["vacuum"] - timing["vacuum_start"]) / 4)
    after = timing["vacuum_start"] - 0.2 + rng.uniform(0, step)
    for _ in range(40):
        before = shard_files(lib.home)
        killed = lib.killed("vacuum", after)
        wrote = shard_files(lib.home) != before
        assert_consistent(lib.home, lib.env.get("PIAA_DB"), N_IMAGES)
        if killed and wrote:
            return True
        if not killed:  # finished: its work is done, make more and aim earlier, finer
            give_vacuum_work(lib)
            after, step = after - 2 * step, max(0.01, step / 2)
        after += step
    return False


def shard_files(home: Path) -> set[str]:
    return {p.name for p in home.rglob("*.faiss")}


def run_kill_rounds(tmp_path: Path, make_db: Callable[[], str | None], rounds: int) -> None:
    # The uninterrupted reference, which also times each step for the random kill moments.
    from piaa_index.shapes.dataset import generate_dataset

    scenes = generate_dataset(tmp_path / "scenes", N_IMAGES, seed=5, size=96, progress=False)
    photos = scenes / "images"
    labels = json.loads((scenes / "classes.json").read_text())
    ref = Piaa(tmp_path / "home-ref", make_db(), photos)
    timing = {"index": ref.step("index")}
    ref.run("vocab", "set", *labels)
    timing["fit"] = ref.step("fit")
    expected = ref.tags()
    assert expected and any(expected.values())
    # A vacuum's own work is a fraction of a second after ~1 s of start-up: time both (the
    # second vacuum has nothing left to do) and aim the kills between them.
    give_vacuum_work(ref)
    timing["vacuum"] = ref.step("vacuum")
    timing["vacuum_start"] = ref.step("vacuum")

    rng = random.Random(10)
    for round_no in range(rounds):
        lib = Piaa(tmp_path / f"home-{round_no}", make_db(), photos)
        moments = []
        # index: killed, then run again to completion
        moments.append(lib.killed("index", rng.uniform(0.3, 1.0) * timing["index"]))
        lib.step("index")
        assert_consistent(lib.home, lib.env.get("PIAA_DB"), N_IMAGES)
        lib.run("vocab", "set", *labels)
        # fit: killed, then again
        moments.append(lib.killed("fit", rng.uniform(0.3, 1.0) * timing["fit"]))
        lib.step("fit")
        assert lib.tags() == expected
        give_vacuum_work(lib)
        moments.append(kill_vacuum_mid_work(lib, timing, rng))
        lib.step("vacuum")
        assert_consistent(lib.home, lib.env.get("PIAA_DB"), N_IMAGES)
        assert lib.check()["ok"]
        print(f"round {round_no}: step seconds {timing}; killed while running: {moments}")
        assert moments[-1], "no vacuum kill landed while it was writing shards"


def test_kill_at_random_sqlite(tmp_path: Path) -> None:
    run_kill_rounds(tmp_path, lambda: None, ROUNDS)


@pytest.mark.postgres
def test_kill_at_random_postgres(tmp_path: Path, postgres_database: Callable[[], str]) -> None:
    run_kill_rounds(tmp_path, postgres_database, ROUNDS)
