"""The read-only search of a fresh process (piaa_index/catalog/readonly.py): the same rows as
`Library.search`, without SQLAlchemy, and None (the full path) whenever answering would need a
write. Real SQLite libraries of thousands of synthetic images written through the index path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from piaa_index.catalog import readonly as store_readonly
from piaa_index.catalog.readonly import ReadOnlyStore
from piaa_index.config import Settings
from piaa_index.errors import UserInputError
from piaa_index.library.core import Library
from tools import scale

N_LABELS = 10
N_IMAGES = 3000
QUERIES = ["l000 AND l001", "(l002 OR l003) AND NOT l000", "NOT l004", "l009"]


@pytest.fixture(scope="module")
def world() -> scale.World:
    return scale.World.make(N_LABELS, seed=3)


@pytest.fixture
def lib(tmp_path: Path, world: scale.World) -> Iterator[Library]:
    library = scale.open_library(tmp_path / "home", world)
    scale.add_images(library, world, N_IMAGES)
    library.set_vocabulary(scale.label_names(N_LABELS))
    library.fit()
    yield library
    library.close()


def _settings(lib: Library, **asked: str) -> Settings:
    return Settings.resolve(home=lib.settings.home, db=lib.settings.db_url, **asked)


def _cli_without_sqlalchemy(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`piaa ARGS` in a fresh process, asserting it succeeded and never imported SQLAlchemy."""
    probe = (
        "import sys\n"
        "from piaa_index.cli import main\n"
        "try:\n"
        "    main()\n"
        "finally:\n"
        "    print('sqlalchemy' in sys.modules, file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "False"
    return done


def test_rows_equal_the_library_search(lib: Library) -> None:
    """Every query shape, every limit, with and without the non-matching images: the same
    rows, scores and order as `Library.search`."""
    settings = _settings(lib)
    for query in QUERIES:
        for limit in (1, 20, None):
            for include_absent in (False, True):
                want = lib.search(query, limit=limit, include_absent=include_absent)
                got = store_readonly.search(settings, query, limit, include_absent)
                assert got == want, (query, limit, include_absent)
    everything = store_readonly.search(settings, "l000 OR NOT l000", None)
    assert everything is not None and len(everything) == N_IMAGES


def test_a_bad_query_names_the_problem_as_the_library_does(lib: Library) -> None:
    settings = _settings(lib)
    for bad in ("l000 AND", "nosuchlabel"):
        with pytest.raises(UserInputError) as full:
            lib.search(bad)
        with pytest.raises(UserInputError) as quick:
            store_readonly.search(settings, bad, 20)
        assert str(quick.value) == str(full.value)


def test_answers_alike_to_the_store(lib: Library, world: scale.World) -> None:
    """The mirrored SELECTs: vocabulary, newest classifier, indexed count, newer shards and
    paths of thousands of ids, a non-UTF-8 file name included."""
    odd = os.fsdecode(b"/synthetic/caf\xe9")  # Latin-1 bytes: a lone surrogate in Python
    scale.add_images(lib, world, 1, start=N_IMAGES, prefix=odd)
    store = ReadOnlyStore.open(lib.settings.db_url)
    assert store is not None
    try:
        with store.snapshot():
            vocab = lib.store.vocabulary()
            assert vocab is not None
            assert store.vocabulary() == (vocab.id, vocab.names)
            row = lib.store.latest_classifier()
            assert row is not None
            assert store.latest_classifier() == (
                row.id,
                row.vocabulary_id,
                row.scores_key,
                list(row.score_segments or []),
            )
            assert store.indexed_count() == lib.store.indexed_count() == N_IMAGES + 1
            ids = [loc[0] for loc in lib.store.live_locations()]
            assert store.paths(ids) == lib.store.paths(ids)
            assert any(p.startswith(odd) for p in store.paths(ids).values())
            newest = max(loc[1] for loc in lib.store.live_locations())
            assert store.has_indexed_after(newest - 1)
            assert not store.has_indexed_after(newest)
            assert store.get_setting("store_id") == lib.store.get_setting("store_id")
    finally:
        store.close()


def test_takes_the_full_path_whenever_an_answer_needs_a_write(
    lib: Library, world: scale.World
) -> None:
    """None (the caller opens the Library) for images not scored yet, images gone, a stale
    vocabulary, another model asked for, lost score files, Postgres and a missing database."""
    settings = _settings(lib)
    assert store_readonly.search(settings, "l000", 5) is not None

    scale.add_images(lib, world, 1000, start=N_IMAGES, seed=1)  # indexed, not scored yet
    assert store_readonly.search(settings, "l000", 5) is None
    lib.search("l000")  # scores them as a new segment
    assert store_readonly.search(settings, "l000", 5) == lib.search("l000", limit=5)

    gone = [loc[0] for loc in lib.store.live_locations()[:10]]
    lib.store.remove_images(gone)  # as `index --prune` does
    assert store_readonly.search(settings, "l000", None) is None
    # The library's next query writes their tombstones; from then on both agree again.
    assert len(lib.search("l000 OR NOT l000", limit=None)) == N_IMAGES + 1000 - 10
    everything = store_readonly.search(settings, "l000 OR NOT l000", None, True)
    assert everything == lib.search("l000 OR NOT l000", limit=None, include_absent=True)
    assert not set(lib.store.paths(gone).values()) & {r["path"] for r in everything}
    reopened = lib.reopen()  # a fresh process: masks them from the files alone
    try:
        assert reopened.search("l000", limit=None) == lib.search("l000", limit=None)
    finally:
        reopened.close()

    assert store_readonly.search(_settings(lib, model="ViT-B-16"), "l000", 5) is None
    assert store_readonly.search(_settings(lib, pretrained="other.pt"), "l000", 5) is None
    record = lib.store.get_setting("model")
    assert record is not None
    same = _settings(lib, model=record["model"], front_end=record["front_end"])
    assert store_readonly.search(same, "l000", 5) is not None

    pg = Settings.resolve(home=lib.settings.home, db="postgresql://127.0.0.1/nowhere")
    assert store_readonly.search(pg, "l000", 5) is None
    nowhere = Settings.resolve(home=lib.settings.home / "none")
    assert store_readonly.search(nowhere, "l000", 5) is None
    assert not (lib.settings.home / "none").exists()  # looking created nothing

    lib.set_vocabulary(scale.label_names(N_LABELS)[:-1])  # a refit is due
    assert store_readonly.search(settings, "l000", 5) is None
    lib.fit()
    assert store_readonly.search(settings, "l000", 5) == lib.search("l000", limit=5)

    row = lib.store.latest_classifier()
    assert row is not None and row.score_segments
    folder = lib.tagger.scores_dir / str(row.scores_key)
    for f in folder.glob(f"{row.score_segments[0]}.S.npy"):
        f.write_bytes(b"not a matrix")
    assert store_readonly.search(settings, "l000", 5) is None


def test_the_cli_answers_without_importing_sqlalchemy(lib: Library) -> None:
    """`piaa search` in a fresh process prints the library's rows, and SQLAlchemy (a third of
    its start-up) stays unimported."""
    want = lib.search("l000 AND l001", limit=7)
    home = str(lib.settings.home)
    args = ["--home", home, "search", "l000 AND l001", "--limit", "7", "--json"]
    done = _cli_without_sqlalchemy(args)
    assert json.loads(done.stdout) == want
    assert np.all([r["match"] for r in want])


def test_tags_rows_equal_the_library_tags(lib: Library, world: scale.World) -> None:
    """`piaa tags` of a fresh process (issue 23): the same rows as `Library.tags` for images
    across the library, and None (the full path, which explains) for a path not indexed, an
    image not scored yet and a refit that is due."""
    settings = _settings(lib)
    paths = lib.store.paths([loc[0] for loc in lib.store.live_locations()])
    for image_id in sorted(paths)[:: N_IMAGES // 25]:
        assert store_readonly.tags(settings, paths[image_id]) == lib.tags(paths[image_id])
    assert store_readonly.tags(settings, "/synthetic/not/indexed.jpg") is None
    with pytest.raises(UserInputError):
        lib.tags("/synthetic/not/indexed.jpg")

    scale.add_images(lib, world, 10, start=N_IMAGES, seed=2)  # indexed, not scored yet
    newest = lib.store.paths([lib.store.live_locations()[-1][0]])
    assert store_readonly.tags(settings, next(iter(newest.values()))) is None
    lib.search("l000")  # scores them
    some = paths[min(paths)]
    assert store_readonly.tags(settings, some) == lib.tags(some)
    lib.set_vocabulary(scale.label_names(N_LABELS)[:-1])  # a refit is due
    assert store_readonly.tags(settings, some) is None


def test_the_cli_tags_without_importing_sqlalchemy(lib: Library) -> None:
    """`piaa tags IMG --json` in a fresh process prints the library's rows without SQLAlchemy."""
    some = lib.store.paths([lib.store.live_locations()[7][0]])
    path = next(iter(some.values()))
    want = lib.tags(path)
    args = ["--home", str(lib.settings.home), "tags", path, "--json"]
    done = _cli_without_sqlalchemy(args)
    assert json.loads(done.stdout) == want


def test_vocab_list_reads_without_sqlalchemy(lib: Library, tmp_path: Path) -> None:
    """`piaa vocab list --json` of a fresh process: the library's vocabulary, read-only."""
    vocab = lib.vocabulary()
    assert vocab is not None
    want = {"version": vocab.id, "labels": vocab.names, "templates": vocab.templates}
    assert store_readonly.vocabulary_listing(_settings(lib)) == want
    lib.set_vocabulary(["Straße", "l001"], templates=["a photo of {}."])
    vocab = lib.vocabulary()
    assert vocab is not None
    want = {"version": vocab.id, "labels": vocab.names, "templates": vocab.templates}
    assert store_readonly.vocabulary_listing(_settings(lib)) == want
    assert store_readonly.vocabulary_listing(Settings.resolve(home=tmp_path / "none")) is None
    args = ["--home", str(lib.settings.home), "vocab", "list", "--json"]
    done = _cli_without_sqlalchemy(args)
    assert json.loads(done.stdout) == want
