"""The saved [CLS] index searched without FAISS (vectors/similar_files.py): the same ids and
the same scores, bit for bit, as `ClsIndex.search` through FAISS, for both kinds, at widths
128 and 512, ties at the cut included; FAISS's path wherever the parser does not recognise a
file. FAISS runs on one thread here: on several it scans 10,000 vectors or more with BLAS,
whose sums differ in the last bits (similar_files' docstring)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest

from piaa_index.vectors import similar, similar_files
from piaa_index.vectors.similar import ClsIndex, exact_search

pytestmark = pytest.mark.skipif(
    not similar_files.supported(128), reason="FAISS's kernel is not reproduced on this CPU"
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def _vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    """Unit rows, 2% of them exact copies of others (ties)."""
    v = rng.standard_normal((n, dim)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    copies = rng.choice(n, size=n // 50, replace=False)
    v[copies] = v[rng.choice(n, size=len(copies))]
    return v


def _saved(folder: Path, n: int, dim: int, seed: int, drop: float = 0.0) -> np.ndarray:
    """Build, thin out by `drop` and save a ClsIndex; returns its vectors (the queries)."""
    rng = np.random.default_rng(seed)
    vecs = _vectors(rng, n, dim)
    ids = rng.permutation(10 * n)[:n].astype(np.int64) + 1  # not in row order
    index = ClsIndex.build(dim, ids, np.ones(n, np.int32), vecs)
    if drop:
        index.remove(rng.random(n) < drop)
    index.version = 1
    index.save(folder)
    return vecs


def _pair(folder: Path, kind: str) -> tuple[ClsIndex, ClsIndex]:
    """(through FAISS, without FAISS) of the index saved in `folder`."""
    through = ClsIndex.load(folder)
    free = ClsIndex.load(folder, mapped=True)
    assert through is not None and free is not None
    assert through.kind == free.kind == kind
    expected = similar_files.SavedFlat if kind == "flat" else similar_files.SavedIVF
    assert isinstance(free.parts.parts[0].index, expected)
    return through, free


def _same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> None:
    np.testing.assert_array_equal(a[0], b[0])
    assert a[1].dtype == b[1].dtype == np.float32
    np.testing.assert_array_equal(a[1].view(np.uint32), b[1].view(np.uint32))  # to the bit


def _compare(folder: Path, kind: str, vecs: np.ndarray, ks: list[int]) -> None:
    through, free = _pair(folder, kind)
    rng = np.random.default_rng(7)
    queries = [vecs[i] for i in rng.choice(len(vecs), 6, replace=False)]
    queries.append(rng.standard_normal(vecs.shape[1]).astype(np.float32))  # not unit
    n = len(through.ids)
    for q in queries:
        for k in [*ks, n - 1, n, n + 5]:
            _same(through.search(q, k), free.search(q, k))
        if kind == "ivf":
            for nprobe in (1, 3, 64):
                _same(through.search(q, 50, nprobe), free.search(q, 50, nprobe))


@pytest.mark.parametrize("dim", [128, 512])
def test_flat_answers_are_faiss_bits(tmp_path: Path, dim: int) -> None:
    n = 5_000 if dim == 128 else 2_000
    vecs = _saved(tmp_path, n, dim, seed=dim)
    _compare(tmp_path, "flat", vecs, [1, 2, 5, 20, 29, 100, 101, 250, 1_000])


def test_small_flat_and_thinned_flat(tmp_path: Path) -> None:
    vecs = _saved(tmp_path / "small", 300, 128, seed=3)  # scored exactly, no BLAS pre-pass
    _compare(tmp_path / "small", "flat", vecs, [1, 10, 40])
    vecs = _saved(tmp_path / "thin", 3_000, 128, seed=4, drop=0.3)  # removed rows compacted
    _compare(tmp_path / "thin", "flat", vecs, [1, 10, 40, 200])


@pytest.mark.parametrize("dim", [128, 512])
def test_ivf_answers_are_faiss_bits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dim: int
) -> None:
    monkeypatch.setattr(similar, "MAX_FLAT_CELLS", 0)
    n = 5_000 if dim == 128 else 3_000
    vecs = _saved(tmp_path, n, dim, seed=dim + 1, drop=0.05)
    through, free = _pair(tmp_path, "ivf")
    biggest = int(np.max(free.parts.parts[0].index._sizes))
    assert free.parts.parts[0].index.nlist == through.parts.nlist and biggest < 100
    # k beyond a probed list, beyond the probed lists together, and everything
    _compare(tmp_path, "ivf", vecs, [1, 5, 20, 29, biggest + 1, 100, 101, 400, 2_000])


def test_sparse_inverted_lists(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fewer than half the lists hold vectors: FAISS writes the sizes as (list, size) pairs."""
    monkeypatch.setattr(similar, "MAX_FLAT_CELLS", 0)
    vecs = _saved(tmp_path, 1_000, 128, seed=9, drop=0.995)
    raw = (tmp_path / "cls.faiss").read_bytes()
    assert b"sprs" in raw
    _compare(tmp_path, "ivf", vecs, [1, 2, 3, 10])


def test_exact_search_is_faiss_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(5)
    for n, dim in ((40, 128), (4_000, 128), (1_500, 512)):
        vecs = _vectors(rng, n, dim)
        ids = rng.permutation(5 * n)[:n].astype(np.int64)
        queries = [vecs[0], rng.standard_normal(dim).astype(np.float32)]
        for q in queries:
            for k in (1, 7, 100, 150, n, n + 3):
                free = exact_search(ids, vecs, q, k)
                with monkeypatch.context() as m:
                    m.setattr(similar_files, "supported", lambda dim: False)
                    through = exact_search(ids, vecs, q, k)
                np.testing.assert_array_equal(free[0], through[0])
                np.testing.assert_array_equal(free[1].view(np.uint32), through[1].view(np.uint32))


def test_inner_products_are_fvec_inner_product() -> None:
    rng = np.random.default_rng(11)
    for dim in (16, 128, 512, 768):
        vecs = rng.standard_normal((300, dim)).astype(np.float32)
        q = rng.standard_normal(dim).astype(np.float32)
        want = [faiss.fvec_inner_product(faiss.swig_ptr(q), faiss.swig_ptr(v), dim) for v in vecs]
        got = similar_files.inner_products(vecs, q)
        np.testing.assert_array_equal(
            got.view(np.uint32), np.asarray(want, np.float32).view(np.uint32)
        )


def test_ties_at_the_cut_are_faiss_choice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many exact copies: the k-th score is shared by dozens of rows, and which of them FAISS
    keeps depends on its heap."""
    rng = np.random.default_rng(2)
    base = _vectors(rng, 40, 128)
    vecs = base[rng.integers(0, 40, 3_000)]
    ids = rng.permutation(100_000)[:3_000].astype(np.int64)
    for kind, cells in (("flat", similar.MAX_FLAT_CELLS), ("ivf", 0)):
        monkeypatch.setattr(similar, "MAX_FLAT_CELLS", cells)
        folder = tmp_path / kind
        built = ClsIndex.build(128, ids, np.ones(len(ids), np.int32), vecs)
        built.save(folder)
        through, free = _pair(folder, kind)
        for q in (base[3], rng.standard_normal(128).astype(np.float32)):
            for k in (1, 10, 50, 77, 99):
                _same(through.search(q, k), free.search(q, k))


def _damaged(tmp_path: Path, kind: str, change) -> ClsIndex | None:  # type: ignore[no-untyped-def]
    path = tmp_path / "cls.faiss"
    good = path.read_bytes()
    path.write_bytes(change(bytearray(good)))
    try:
        assert similar_files.open_saved(str(path), kind) is None
        return ClsIndex.load(tmp_path, mapped=True)
    finally:
        path.write_bytes(good)


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_damage_falls_back_to_faiss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    if kind == "ivf":
        monkeypatch.setattr(similar, "MAX_FLAT_CELLS", 0)
    _saved(tmp_path, 2_000, 128, seed=13)
    path = str(tmp_path / "cls.faiss")
    assert similar_files.open_saved(path, kind) is not None
    assert similar_files.open_saved(path, "ivf" if kind == "flat" else "flat") is None
    assert similar_files.open_saved(str(tmp_path / "missing"), kind) is None

    def fourcc(b: bytearray) -> bytearray:
        b[0:4] = b"IxMp"
        return b

    def metric(b: bytearray) -> bytearray:
        b[4 + 29 : 4 + 33] = (1).to_bytes(4, "little")  # L2
        return b

    def list_size(b: bytearray) -> bytearray:  # one list longer than the file holds
        at = b.index(b"full") + 12
        one = int.from_bytes(b[at : at + 8], "little")
        b[at : at + 8] = (one + 1).to_bytes(8, "little")
        return b

    changes = [lambda b: b[:-1], lambda b: b[:-5_000], lambda b: b + b"\0", fourcc, metric]
    if kind == "ivf":
        changes.append(list_size)
    for change in changes:
        loaded = _damaged(tmp_path, kind, change)
        # FAISS read it (it reads what the parser does not: a size changed, an L2 metric) or
        # refused it: never an answer from a misread file
        assert loaded is None or not isinstance(
            loaded.parts.parts[0].index, (similar_files.SavedFlat, similar_files.SavedIVF)
        )


def test_scalar_quantizer_numbers_are_faiss_ones() -> None:
    """A [CLS]-only shard read decodes the patch header's qtype without importing FAISS."""
    from piaa_index.vectors import shard_files

    sq = faiss.ScalarQuantizer
    assert (sq.QT_8bit, sq.QT_4bit, sq.QT_8bit_uniform, sq.QT_4bit_uniform, sq.QT_fp16) == (
        shard_files.QT_8BIT,
        shard_files.QT_4BIT,
        shard_files.QT_8BIT_UNIFORM,
        shard_files.QT_4BIT_UNIFORM,
        shard_files.QT_FP16,
    )
