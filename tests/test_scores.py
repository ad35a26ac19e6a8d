"""The score matrix store and the compiled search, on synthetic libraries of thousands of images
written through the index path (real SQLite, real FAISS shards, real score files)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from piaa_index.library.core import Library
from piaa_index.method import fusion
from piaa_index.query.engine import compile_query, top_k
from piaa_index.query.language import And, Label, Node, Not, Or, parse
from tools import scale

N_LABELS = 12
N_IMAGES = 3000


@pytest.fixture(scope="module")
def world() -> scale.World:
    return scale.World.make(N_LABELS, seed=1)


@pytest.fixture
def lib(tmp_path: Path, world: scale.World) -> Iterator[Library]:
    library = scale.open_library(tmp_path / "home", world)
    scale.add_images(library, world, N_IMAGES)
    library.set_vocabulary(scale.label_names(N_LABELS))
    library.fit()
    yield library
    library.close()


def _segments(lib: Library) -> tuple[Path, list[str]]:
    row = lib.store.latest_classifier()
    assert row is not None and row.scores_key
    return lib.tagger.scores_dir / row.scores_key, list(row.score_segments or [])


def _sparse_count(lib: Library) -> int:
    return sum(lib.store.tag_counts().values())


# -- crash ordering ---------------------------------------------------------------------------


def test_uncommitted_scores_are_removed_on_open(
    lib: Library, world: scale.World, tmp_path: Path
) -> None:
    """Score files SQL does not point at (a fit or a scoring pass cut short before its commit)
    are deleted when the library is next opened; the committed ones stay and still answer."""
    folder, segments = _segments(lib)
    before = lib.search("l000 AND l001", limit=50)
    # A fit that wrote its (durable) files and died before the SQL commit:
    fitted = lib.tagger.fitted_for(lib.store.latest_classifier())
    locations = lib.store.live_locations()[:500]
    pair = (fitted.classifier, fitted.text_protos)
    lib.tagger._write_segment(
        "deadbeef" * 4, "seg000001", N_LABELS, pair, locations, None, False, "x"
    )
    # ... and an append that died the same way, plus a torn temporary file.
    lib.tagger._write_segment(folder.name, "seg000002", N_LABELS, pair, locations, None, False, "x")
    (folder / "seg000003.S.npy.tmp").write_bytes(b"torn")
    assert (lib.tagger.scores_dir / ("deadbeef" * 4)).is_dir()
    lib.close()

    again = scale.open_library(lib.settings.home, world)
    try:
        assert again.vectors is not None  # opening reconciles vectors and scores with SQL
        assert not (again.tagger.scores_dir / ("deadbeef" * 4)).exists()
        assert sorted({p.name.split(".")[0] for p in folder.glob("seg*")}) == segments
        assert again.search("l000 AND l001", limit=50) == before
    finally:
        again.close()


def test_refit_replaces_the_score_folder(lib: Library) -> None:
    old, _ = _segments(lib)
    lib.fit()
    new, segments = _segments(lib)
    assert new != old and not old.exists() and segments == ["seg000001"]


# -- incremental ------------------------------------------------------------------------------


def test_new_images_are_appended_as_a_segment(lib: Library, world: scale.World) -> None:
    """Images indexed after a fit are scored into a new segment at the next query; the first
    segment's files are not rewritten and the classifier stays."""
    folder, segments = _segments(lib)
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("seg000001.*")}
    version = lib.status()["classifier"]["version"]
    scale.add_images(lib, world, 1500, start=N_IMAGES)

    rows = lib.search("l000", limit=None, include_absent=True)

    assert len(rows) == N_IMAGES + 1500
    folder2, segments2 = _segments(lib)
    assert folder2 == folder and segments2 == segments + ["seg000002"]
    assert {
        p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("seg000001.*")
    } == first
    assert lib.status()["classifier"]["version"] == version
    # SQL's sparse tags and the matrix agree on what is present.
    assert _sparse_count(lib) == sum(lib.status()["classifier"]["tagged"].values())
    newest = f"/synthetic/0000/{N_IMAGES + 1499:08d}.jpg"
    assert {r["label"] for r in lib.tags(newest)} == set(scale.label_names(N_LABELS))
    # Rows read across both segments (a fit carrying kept labels over) are the columns' rows.
    view = lib.tagger.state().view
    picked = np.random.default_rng(0).choice(len(view.ids), 700)
    for kind in ("S", "E", "C", "U", "present"):
        np.testing.assert_array_equal(view.take(kind, 3, picked), view.column(kind, 3)[picked])


def test_reencoded_image_shows_its_new_scores_only(lib: Library, world: scale.World) -> None:
    """An image re-encoded into a new shard (same id) is scored again; its old row never
    answers a query, and removed images drop out."""
    path = "/synthetic/0000/00000007.jpg"
    image_id = lib.image_id(path)
    old = {r["label"]: r["score"] for r in lib.tags(path)}
    cls, patches, _ = world.images(1, np.random.default_rng(99))
    shard = lib.vectors.next_shard_id()
    lib.vectors.write_shard(shard, [image_id], cls, patches)
    scale.commit_indexed(lib.store, [image_id], shard, [1])

    rows = lib.tags(path)

    fitted = lib.tagger.fitted_for(lib.store.latest_classifier())
    stored_cls, stored_patches = lib.vectors.vectors_for(image_id, shard, 0)  # as quantised
    fresh = fusion.score_images(
        stored_cls[None], stored_patches[None], fitted.text_protos, fitted.classifier
    )
    want = fitted.decisions.apply(fresh.patch, fresh.cls, fresh.support)[0][0]
    got = {r["label"]: r["score"] for r in rows}
    names = scale.label_names(N_LABELS)
    assert np.allclose([got[n] for n in names], want, atol=1e-6)
    assert got != old
    everything = lib.search("l000 OR NOT l000", limit=None, include_absent=True)
    assert [r["path"] for r in everything].count(path) == 1
    assert len(everything) == N_IMAGES

    lib.store.remove_images([image_id])
    everything = lib.search("l000 OR NOT l000", limit=None, include_absent=True)
    assert path not in {r["path"] for r in everything} and len(everything) == N_IMAGES - 1
    assert lib.status()["images"]["indexed"] == N_IMAGES - 1
    assert _sparse_count(lib) == sum(lib.status()["classifier"]["tagged"].values())


def test_lost_score_files_are_rebuilt_without_refit(lib: Library) -> None:
    """A classifier whose score folder is gone (or predates score matrices, after migration
    0003) is re-scored with the stored classifier; no new fit."""
    import shutil

    folder, _ = _segments(lib)
    before = lib.search("l002 AND NOT l003", limit=30)
    version = lib.status()["classifier"]["version"]
    shutil.rmtree(folder)
    lib.tagger._cache = None
    assert lib.search("l002 AND NOT l003", limit=30) == before
    assert lib.status()["classifier"]["version"] == version


def test_the_fits_scores_are_those_of_each_image_scored_again(lib: Library) -> None:
    """The fit's re-tag takes the text support its pass kept (chunk by chunk, from a file) and
    calibrates label by label; scoring every image again from its vectors with the stored
    classifier and rule gives the same matrix, bit for bit."""
    folder, segments = _segments(lib)
    kinds = ("ids", "shard", "S", "E", "C", "U", "present")
    fitted = {k: np.load(folder / f"{segments[0]}.{k}.npy") for k in kinds}
    shutil.rmtree(folder)
    lib.tagger._cache = None
    lib.search("l002")  # rescored with the stored classifier and rule
    again, names = _segments(lib)
    assert again != folder and names == segments
    for kind in kinds:
        np.testing.assert_array_equal(np.load(again / f"{names[0]}.{kind}.npy"), fitted[kind])


# -- compiled search --------------------------------------------------------------------------

NAMES = [f"x{i}" for i in range(6)]


def _nodes() -> st.SearchStrategy[Node]:
    leaves = st.sampled_from(NAMES).map(Label)
    return st.recursive(
        leaves,
        lambda kids: st.one_of(
            kids.map(Not),
            st.lists(kids, min_size=2, max_size=3).map(lambda c: And(tuple(c))),
            st.lists(kids, min_size=2, max_size=3).map(lambda c: Or(tuple(c))),
        ),
        max_leaves=8,
    )


@settings(max_examples=60, deadline=None)
@given(node=_nodes(), seed=st.integers(0, 2**16), k=st.sampled_from([1, 7, 50, None]))
def test_compiled_query_equals_the_per_image_evaluator(node: Node, seed: int, k: int | None):
    """Match, score and top-k ranking equal Node.evaluate / Node.score row by row."""
    rng = np.random.default_rng(seed)
    n = 2500
    present = {name: rng.random(n) < rng.uniform(0.05, 0.6) for name in NAMES}
    # Coarse values make ties common, so the id tie-break is exercised.
    scores = {name: np.round(rng.random(n), 2).astype(np.float32) for name in NAMES}
    ids = rng.permutation(n).astype(np.int64) * 3 + 1

    match, score = compile_query(node).run(present, scores)

    ref_match, ref_score = [], []
    for r in range(n):
        ref_match.append(node.evaluate({x: bool(present[x][r]) for x in NAMES}))
        unit = {x: min(1.0, max(0.0, float(scores[x][r]))) for x in NAMES}
        ref_score.append(node.score(unit))
    assert match.tolist() == ref_match
    assert score.tolist() == ref_score
    rows = np.nonzero(match)[0]
    got = [int(ids[rows][i]) for i in top_k(ids[rows], score[rows], k)]
    ref = sorted((-ref_score[r], int(ids[r])) for r in rows)
    assert got == [i for _, i in ref][: (len(ref) if k is None else k)]


def test_search_equals_brute_force_over_the_matrix(lib: Library) -> None:
    """Library.search ranks exactly as the per-image Python evaluation of the same scores."""
    folder, segments = _segments(lib)
    seg = np.load(folder / f"{segments[0]}.ids.npy")
    S = np.load(folder / f"{segments[0]}.S.npy")
    P = np.load(folder / f"{segments[0]}.present.npy")
    names = scale.label_names(N_LABELS)
    paths = lib.store.paths([int(i) for i in seg])
    for expression in ["l000 AND l001", "(l002 OR l004) AND NOT l000", "NOT l001"]:
        node = parse(expression)
        cols = [names.index(x) for x in sorted(node.labels())]
        ref = []
        for r, image_id in enumerate(seg):
            pres = {names[c]: bool(P[c, r]) for c in cols}
            unit = {names[c]: min(1.0, max(0.0, float(S[c, r]))) for c in cols}
            ref.append((not node.evaluate(pres), -node.score(unit), int(image_id)))
        ref.sort()
        got = lib.search(expression, limit=None, include_absent=True)
        assert [r["path"] for r in got] == [paths[i] for _, _, i in ref]
        top = lib.search(expression, limit=25)
        assert [r["path"] for r in top] == [paths[i] for m, _, i in ref if not m][:25]


# -- similar ----------------------------------------------------------------------------------


def _same_neighbours(got: list[dict], want: list[dict]) -> None:
    """The same ranking up to float rounding: equal scores rank by rank, and images whose
    scores differ by less than the rounding may come in either order (FAISS sums in another
    order than numpy), also at the cut-off of a limited list."""
    tol = 1e-5
    assert len(got) == len(want)
    assert np.allclose([r["score"] for r in got], [r["score"] for r in want], atol=tol)
    exact = {r["path"]: r["score"] for r in want}
    cut = want[-1]["score"] if want else 0.0
    for r in got:
        if r["path"] in exact:
            assert abs(r["score"] - exact[r["path"]]) <= tol
        else:  # only a near-tie at the cut-off may swap in
            assert abs(r["score"] - cut) <= tol


def test_similar_flat_index_equals_the_exact_scan(lib: Library, world: scale.World) -> None:
    """The FAISS flat index gives the exact scan's neighbours, and follows new, re-encoded and
    removed images without a rebuild: queries before the writers' sync answer alike."""
    probe = "/synthetic/0000/00000011.jpg"
    lib.update_indexes()  # as `index` does at its end
    _same_neighbours(lib.similar(probe, limit=20), scale.similar_exact(lib, probe, limit=20))
    assert lib.searcher._similar is not None and lib.searcher._similar.kind == "flat"
    built = lib.searcher._similar.parts

    scale.add_images(lib, world, 700, start=N_IMAGES)
    gone = lib.image_id("/synthetic/0000/00000012.jpg")
    lib.store.remove_images([gone])
    got = lib.similar(probe, limit=None)  # the index as saved, the 700 compared exactly
    _same_neighbours(got, scale.similar_exact(lib, probe, limit=None))
    assert len(got) == N_IMAGES + 700 - 2 and len(lib.searcher._similar.ids) == N_IMAGES
    lib.update_indexes()
    got = lib.similar(probe, limit=None)
    _same_neighbours(got, scale.similar_exact(lib, probe, limit=None))
    assert len(got) == N_IMAGES + 700 - 2 and lib.searcher._similar.parts is built

    # A fresh Library loads the persisted index instead of reading every [CLS] vector again.
    again = scale.open_library(lib.settings.home, world)
    try:
        _same_neighbours(again.similar(probe, limit=20), scale.similar_exact(lib, probe, limit=20))
        assert (
            again.searcher._similar is not None
            and len(again.searcher._similar.ids) == N_IMAGES + 700 - 1
        )
    finally:
        again.close()


def test_similar_ivf_index_recall(lib: Library, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beyond the flat size the index is IVF; probing every list it is exact, and with the
    default probes its recall@20 on clustered data stays high."""
    from piaa_index.vectors import similar

    monkeypatch.setattr(similar, "MAX_FLAT_CELLS", 0)
    shutil.rmtree(lib.vectors_dir / "similar", ignore_errors=True)  # the fit built a flat one
    lib.searcher._similar = None
    lib.update_indexes()
    probes = [f"/synthetic/0000/{i:08d}.jpg" for i in range(0, N_IMAGES, 150)]
    recall = []
    for probe in probes:
        got = {r["path"] for r in lib.similar(probe, limit=20)}
        want = {r["path"] for r in scale.similar_exact(lib, probe, limit=20)}
        recall.append(len(got & want) / 20)
    assert lib.searcher._similar is not None and lib.searcher._similar.kind == "ivf"
    assert np.mean(recall) >= 0.9
    _same_neighbours(lib.similar(probes[0], limit=None), scale.similar_exact(lib, probes[0], None))


def test_latest_rows_keeps_the_last_row_of_each_image() -> None:
    """The mask a view answers from, on thousands of rows: increasing ids (the shortcut), ids
    re-scored in later segments and shuffled ids give the last row of each id, as a dict
    walking the rows in order does."""
    from piaa_index.vectors.scores import latest_rows

    rng = np.random.default_rng(7)
    cases = [
        np.arange(5000, dtype=np.int64),
        np.concatenate([np.arange(5000), rng.choice(5000, 800, replace=False)]),
        rng.integers(0, 3000, 6000),
        np.zeros(0, np.int64),
    ]
    for ids in cases:
        last = {int(i): r for r, i in enumerate(ids)}
        want = np.zeros(len(ids), bool)
        want[list(last.values())] = True
        assert np.array_equal(latest_rows(np.asarray(ids, np.int64)), want)
