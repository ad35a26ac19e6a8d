"""The `Engine` protocol (piaa_index/engines/): an index run described by an `IndexJob` of plain
collaborators (a store, a vector store, an encoder factory, values), run by the engine a name
picks, with no `Library` anywhere; and the one shard/id allocation both engines use."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from piaa_index.catalog.schema import FAILED, INDEXED
from piaa_index.catalog.store import Store
from piaa_index.config import ModelSpec, default_front_end
from piaa_index.engines import engine_for
from piaa_index.engines.base import Engine, IndexJob, IndexReport
from piaa_index.errors import UserInputError
from piaa_index.vectors.shards import RESERVED, VectorStore
from tests.shapes_library import SHAPESWORLD_DIR

N_SCENES = 240
COMMIT_EVERY = 64

SPEC = ModelSpec("shapesworld", "default", default_front_end("shapesworld"))


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """240 generated ShapesWorld scenes (JPEG, 96 px), read only: copy to change."""
    from piaa_index.shapes.dataset import generate_dataset

    root = generate_dataset(
        tmp_path_factory.mktemp("engines") / "scenes", N_SCENES, seed=20, size=96, progress=False
    )
    return root / "images"


@pytest.fixture(scope="module")
def encoder() -> object:
    if not (SHAPESWORLD_DIR / "shapesworld.safetensors").is_file():
        pytest.skip("the shipped shapesworld checkpoint is not in this checkout")
    from piaa_index.model.encoder import Encoder

    return Encoder(SPEC, device="cpu")


class Loads:
    """An encoder factory that counts its calls (the model must load only when needed)."""

    def __init__(self, encoder: object):
        self.encoder = encoder
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        return self.encoder


@pytest.fixture
def parts(tmp_path: Path, encoder: object) -> Iterator[tuple[Store, VectorStore, str]]:
    """A real SQLite store and vector store, as a program with no `Library` makes them."""
    url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    store = Store.open(url)
    vectors = VectorStore.open(tmp_path / "vectors", encoder.identity())  # type: ignore[attr-defined]
    yield store, vectors, url
    store.close()


def job_for(
    paths: list[Path], store: Store, vectors: VectorStore, url: str, load: Callable[[], object]
) -> IndexJob:
    return IndexJob(
        paths=tuple(paths),
        store=store,
        vectors=lambda: vectors,
        encoder=load,  # type: ignore[arg-type]
        spec=SPEC,
        db_url=url,
        batch_size=32,
        commit_every=COMMIT_EVERY,
        workers=2,
    )


def test_the_local_engine_runs_a_job_built_without_a_library(
    scenes: Path, parts: tuple[Store, VectorStore, str], encoder: object, tmp_path: Path
) -> None:
    store, vectors, url = parts
    photos = tmp_path / "photos"
    shutil.copytree(scenes, photos)
    (photos / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
    engine: Engine = engine_for("local")
    load = Loads(encoder)

    report = engine.run(job_for([photos], store, vectors, url, load))

    assert isinstance(report, IndexReport)
    assert (report.indexed, report.reused, report.unchanged, report.removed) == (N_SCENES, 0, 0, 0)
    assert [f["path"] for f in report.failed] == [str(photos / "zz-broken.jpg")]
    assert load.calls == 1
    # The rows: every scene indexed, the broken file recorded as failed.
    assert store.image_counts() == {INDEXED: N_SCENES, FAILED: 1}
    assert dict(store.failed_images()).keys() == {str(photos / "zz-broken.jpg")}
    locations = store.live_locations()
    paths = store.paths([loc[0] for loc in locations])
    assert sorted(paths.values()) == sorted(
        str(p) for p in photos.iterdir() if p.name != "zz-broken.jpg"
    )
    # One shard per commit group of COMMIT_EVERY files (the failed one counts in its group),
    # numbered from 1; each SQL row points at its own image's row of its shard.
    groups = -(-(N_SCENES + 1) // COMMIT_EVERY)
    assert store.referenced_shards() == set(range(1, groups + 1))
    seen = 0
    for chunk in vectors.iter_live(locations):
        assert chunk.cls.shape == (len(chunk.image_ids), vectors.dim)
        assert np.allclose(np.linalg.norm(chunk.cls, axis=1), 1.0, atol=1e-3)
        seen += len(chunk.image_ids)
    assert seen == N_SCENES
    assert [loc[0] for loc in locations] == [
        int(i) for c in vectors.iter_live(locations) for i in c.image_ids
    ]
    assert not (vectors.root / RESERVED).exists()  # the local engine records no reservation

    # A second run: nothing to encode, so the model is never loaded; a copy reuses vectors.
    shutil.copy(photos / sorted(p.name for p in scenes.iterdir())[0], photos / "zz-copy.jpg")
    again = Loads(encoder)
    second = engine.run(job_for([photos], store, vectors, url, again))
    assert (second.indexed, second.reused, second.unchanged, second.still_failing) == (
        0,
        1,
        N_SCENES,
        1,
    )
    assert again.calls == 0
    assert store.image_counts() == {INDEXED: N_SCENES + 1, FAILED: 1}


def test_allocation_is_one_function_for_both_engines(
    parts: tuple[Store, VectorStore, str], tmp_path: Path
) -> None:
    """Each group's shard id and image ids; recorded (the Ray engine's) or not (the local)."""
    from piaa_index.engines.indexer import allocate
    from piaa_index.ingest.scan import FileInfo

    store, vectors, _ = parts
    infos = [FileInfo(str(tmp_path / f"{k}.jpg"), 10, 1.0) for k in range(5)]
    known: dict = {}
    given = allocate(store, vectors, [infos[:2], infos[2:4], infos[4:]], known, record=True)
    assert [shard for shard, _ in given] == [1, 2, 3]
    ids = [i for _, group in given for i in group]
    assert ids == [known[f.path].id for f in infos] and len(set(ids)) == 5
    assert store.image_counts() == {"pending": 5}
    assert (vectors.root / RESERVED).read_text() == "4"  # no later run reuses 1..3
    # The local engine's allocation of one group: the next id after the recorded ones.
    ((shard, again),) = allocate(store, vectors, [infos[:1]], known)
    assert (shard, again) == (4, ids[:1])
    assert (vectors.root / RESERVED).read_text() == "4"


def test_an_unknown_engine_is_the_user_s_mistake(piaa_home: Path, tiny_model_config: Path) -> None:
    message = "unknown engine 'spark'; choose local or ray"
    with pytest.raises(UserInputError) as raised:
        engine_for("spark")
    assert str(raised.value) == message

    from piaa_index.library.core import Library

    with Library.open(model=str(tiny_model_config), pretrained="none", device="cpu") as lib:
        with pytest.raises(UserInputError) as raised:
            lib.index([piaa_home], engine="spark")
        assert str(raised.value) == message
        assert not lib.vectors_dir.exists()  # refused before anything was opened


def test_a_job_refuses_bad_options_with_the_library_s_messages(
    parts: tuple[Store, VectorStore, str],
) -> None:
    store, vectors, url = parts
    base = job_for([], store, vectors, url, lambda: None)
    from dataclasses import replace

    for change, message in [
        ({"batch_size": 0}, "batch size must be at least 1, not 0"),
        ({"commit_every": 0}, "commit group must be at least 1 image, not 0"),
        ({"read_timeout": 0.0}, "read timeout must be positive, not 0.0"),
    ]:
        with pytest.raises(UserInputError) as raised:
            replace(base, **change)
        assert str(raised.value) == message
