"""The derived indexes kept as parts (vectors/parts.py): a writer changes only the parts it
must, so an index run holds about one part in memory whatever the library's size (issue 23).
Split into many parts, an index answers as the same index in one part does (same training,
same changes), through FAISS and, for [CLS], through the FAISS-free reader; a sync rewrites
only the parts it changes; `db check` checks every part's file."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from piaa_index.durable import content_stamp
from piaa_index.library.core import Library
from piaa_index.vectors import parts as parts_mod
from piaa_index.vectors import similar, similar_files
from piaa_index.vectors import text_search as ts
from piaa_index.vectors.similar import ClsIndex
from piaa_index.vectors.text_search import PatchIndex
from tools import scale

N_IMAGES = 4000


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _cls_pair(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n: int, dim: int
) -> tuple[ClsIndex, ClsIndex, np.ndarray]:
    """The same [CLS] IVF built whole (one part) and in parts of ~1,000 vectors, saved."""
    rng = np.random.default_rng(7)
    centres = _unit(rng.standard_normal((40, dim)))
    vecs = _unit(centres[rng.integers(0, 40, n)] + 0.4 * rng.standard_normal((n, dim)))
    ids = rng.permutation(np.arange(10, 10 + 3 * n, 3)).astype(np.int64)
    shards = (np.arange(n) // 500 + 1).astype(np.int32)
    monkeypatch.setattr(similar, "MAX_FLAT_CELLS", 0)  # an IVF at this size
    one = ClsIndex.build(dim, ids, shards, vecs, tmp_path / "one")
    one.save(tmp_path / "one")
    monkeypatch.setattr(parts_mod, "PART_BYTES", 1000 * (4 * dim + 8))
    many = ClsIndex.build(dim, ids, shards, vecs, tmp_path / "many")
    many.save(tmp_path / "many")
    return one, many, vecs


def _same_answers(a: ClsIndex, b: ClsIndex, queries: np.ndarray, ks: list[int]) -> None:
    for q in queries:
        for k in ks:
            for nprobe in (None, 4, 64):
                ia, sa = a.search(q, k, nprobe)
                ib, sb = b.search(q, k, nprobe)
                np.testing.assert_array_equal(ia, ib)
                np.testing.assert_array_equal(sa, sb)


def test_cls_parts_answer_as_one_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    n, dim = 12_000, 128
    one, many, vecs = _cls_pair(tmp_path, monkeypatch, n, dim)
    assert len(one.parts.parts) == 1 and len(many.parts.parts) == 12
    assert np.bincount(many.part_of).max() == 1000
    queries = vecs[::1500]
    ks = [1, 20, 300, n]
    _same_answers(one, many, queries, ks)

    # Loaded back: through FAISS (mapped parts) and, where it can, without FAISS.
    loaded = ClsIndex.load(tmp_path / "many")
    free = ClsIndex.load(tmp_path / "many", mapped=True)
    assert loaded is not None and free is not None
    _same_answers(one, loaded, queries, ks)
    if similar_files.supported(dim):
        assert all(isinstance(p.index, similar_files.SavedIVF) for p in free.parts.parts)
        _same_answers(loaded, free, queries, ks)

    # The same changes to both: images dropped from several parts, new ones added.
    rng = np.random.default_rng(3)
    gone = one.ids[rng.permutation(n)[:700]]
    new = _unit(rng.standard_normal((2500, dim)))
    for index in (one, loaded):
        index.remove(np.isin(index.ids, gone))
        index.add(np.arange(10**6, 10**6 + 2500), np.full(2500, 99, np.int32), new)
    assert loaded.parts.ntotal == one.parts.ntotal == n - 700 + 2500
    _same_answers(one, loaded, queries, ks)


def test_cls_sync_rewrites_only_the_parts_it_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, _, _ = _cls_pair(tmp_path, monkeypatch, 12_000, 128)
    folder = tmp_path / "many"
    index = ClsIndex.load(folder)
    assert index is not None
    before = {p.name: content_stamp(folder / p.name) for p in index.parts.parts}
    # Drop half of part 3's images, and add a few (the parts are full: to a new part)
    index.remove((index.part_of == 3) & (np.arange(len(index.ids)) % 2 == 0))
    index.add(np.arange(10**6, 10**6 + 50), np.full(50, 99, np.int32), _unit(np.ones((50, 128))))
    index.save(folder)
    after = {name: content_stamp(folder / name) for name in before}
    changed = sorted(name for name in before if before[name] != after[name])
    assert changed == [parts_mod.part_name("cls", 3)]
    assert index.parts.names == [*before, parts_mod.part_name("cls", 12)]
    again = ClsIndex.load(folder)
    assert again is not None and again.parts.ntotal == len(again.ids) == len(index.ids)
    assert (again.part_of == 3).sum() == 500 and again.parts.parts[3].index.ntotal == 500


@pytest.fixture
def lib(tmp_path: Path) -> Iterator[Library]:
    world = scale.World.make(16, seed=4)
    library = scale.open_library(tmp_path / "home", world)
    scale.add_images(library, world, N_IMAGES, group=500)
    yield library
    library.close()


def test_patch_parts_answer_as_one_index(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """The patch index in parts of ~300 images against the same index in one part, before and
    after the same sync (added images, removed and re-encoded ones): the same candidates."""
    live = lib.store.live_locations()
    one = PatchIndex.build(lib.vectors, live, folder=lib.settings.home / "one")
    one.save(lib.settings.home / "one")
    code = one.parts.parts[0].index.code_size
    monkeypatch.setattr(parts_mod, "PART_BYTES", 300 * lib.vectors.n_patches * (code + 8))
    many = PatchIndex.build(lib.vectors, live, folder=lib.settings.home / "many")
    many.save(lib.settings.home / "many")
    assert len(one.parts.parts) == 1 and len(many.parts.parts) >= 10
    rng = np.random.default_rng(0)
    queries = _unit(rng.standard_normal((12, lib.vectors.dim)))

    def same(a: PatchIndex, b: PatchIndex) -> None:
        for q in queries:
            for hits, images in ((64, 10), (4096, 200), (100_000, N_IMAGES)):
                np.testing.assert_array_equal(
                    a.best_images(q, hits, images), b.best_images(q, hits, images)
                )

    same(one, many)
    # Changes: 300 images added, 40 removed (spread over the parts), then the same sync.
    world = scale.World.make(16, seed=4)
    scale.add_images(lib, world, 300, start=N_IMAGES)
    lib.store.remove_images([int(i) for i in rng.choice(one.ids, 40, replace=False)])
    loaded = PatchIndex.load(lib.settings.home / "many")
    assert loaded is not None
    for index in (one, loaded):
        stale, new = lib.store.changes_since(index.ids, index.shards, index.max_shard)
        index.remove(stale)
        index.add(lib.vectors, new)
    assert len(one.ids) == len(loaded.ids) == N_IMAGES + 300 - 40
    same(one, loaded)
    loaded.save(lib.settings.home / "many")
    again = PatchIndex.load(lib.settings.home / "many")
    assert again is not None
    same(one, again)


def test_library_sync_in_parts_and_db_check(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """`update_indexes` (the writers' step) with parts: a later run rewrites the last part
    only; text search answers as the exact scan with a pool covering the library; a flipped
    byte in a later part is found by `db check` and the index rebuilt."""
    code = ts._pq_m(lib.vectors.dim)  # bytes of a patch's PQ code
    per_part = 450  # 8 full parts and 400 images in the ninth
    monkeypatch.setattr(parts_mod, "PART_BYTES", per_part * lib.vectors.n_patches * (code + 8))
    lib.update_indexes()
    text = lib.vectors_dir / "text"
    names = lib.searcher._text_index.parts.names
    assert len(names) == 9
    stamps = {n: content_stamp(text / n) for n in names}
    world = scale.World.make(16, seed=4)
    scale.add_images(lib, world, 100, start=N_IMAGES)
    lib.update_indexes()
    now = lib.searcher._text_index.parts.names
    moved = [n for n in names if content_stamp(text / n) != stamps[n]]
    assert moved == [names[-1]] and now[: len(names)] == names

    lib.set_vocabulary(scale.label_names(16))
    monkeypatch.setattr(ts, "EXACT_BELOW", 0)
    everything = ts.Budget(patch_hits=10, from_patches=10, from_cls=N_IMAGES + 100)
    monkeypatch.setattr(
        ts.Budget, "for_limit", classmethod(lambda cls, limit, images=0: everything)
    )
    got = lib.text_search("l003", limit=20)
    monkeypatch.setattr(ts, "EXACT_BELOW", 10**12)
    assert got == lib.text_search("l003", limit=20)

    damaged = text / names[2]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    report = lib.check()
    assert report["ok"] is False
    (item,) = report["derived_damaged"]
    assert item["index"] == "text" and item["files"] == [names[2]]
    assert not (text / "meta.json").exists()  # removed: the next writer builds it again
    monkeypatch.setattr(ts, "EXACT_BELOW", 0)
    lib.update_indexes()
    assert (text / "meta.json").exists() and lib.searcher._text_index.parts.names == now
    assert lib.text_search("l003", limit=20) == got
    assert lib.text_search("l003", limit=20) == got


def test_emptied_parts_are_dropped_and_a_thinned_index_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Re-encoding a whole library must not leave a trail of empty parts: parts emptied by
    removals are dropped when saved (the others keep their files and answers); an index
    thinned out into many more parts than its vectors need reports itself for a rebuild."""
    one, _, vecs = _cls_pair(tmp_path, monkeypatch, 12_000, 128)
    folder = tmp_path / "many"
    index = ClsIndex.load(folder)
    assert index is not None and not index.parts.needs_rebuild
    gone = index.ids[np.isin(index.part_of, [0, 1, 2, 5])]
    for each in (index, one):
        each.remove(np.isin(each.ids, gone))
    kept = [n for i, n in enumerate(index.parts.names) if i not in (0, 1, 2, 5)]
    index.save(folder)
    assert index.parts.names == kept and not (folder / "cls.faiss").exists()
    counts = np.bincount(index.part_of, minlength=len(kept))
    assert counts.tolist() == [int(p.index.ntotal) for p in index.parts.parts]
    again = ClsIndex.load(folder)
    assert again is not None
    _same_answers(one, again, vecs[::2000], [1, 20, 8_000])
    # New parts (the last one is full) take the first free names.
    again.add(np.arange(10**6, 10**6 + 1500), np.full(1500, 9, np.int32), vecs[:1500])
    assert again.parts.names == [*kept, "cls.faiss", "cls-1.faiss"]

    rng = np.random.default_rng(1)
    again.remove(rng.random(len(again.ids)) < 0.85)
    assert again.parts.needs_rebuild  # 9 parts for ~1,400 vectors of 1,000 a part
