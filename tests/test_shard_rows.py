"""Shard rows read with pread at offsets parsed without FAISS (vectors/shard_files.py): the
same bits FAISS reads, for every codec, and FAISS's path (or its error) wherever the parser
does not recognise a file."""

from __future__ import annotations

import os
from pathlib import Path

import faiss
import numpy as np
import pytest

from piaa_index.vectors import shard_files
from piaa_index.vectors.shards import CODECS, VectorStore, VectorStoreError
from tests.test_vectors import DIM, IDENTITY, M, _unit  # the same small store's shape

N = 700  # images per shard: enough patches to train every codec's quantiser on shard 1
NUMPY_CODECS = {"fp32", "fp16", "sq8", "sq4"}  # the ones read without FAISS


@pytest.fixture(scope="module", params=sorted(CODECS))
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> VectorStore:
    """Two shards per codec: the first trains the library's quantiser, the second uses it."""
    vs = VectorStore.open(tmp_path_factory.mktemp(request.param), IDENTITY, codec=request.param)
    rng = np.random.default_rng(1)
    for shard in (1, 2):
        ids = rng.permutation(100_000)[:N] + 1_000 * shard  # not in row order
        vs.write_shard(shard, ids.tolist(), _unit(rng, N, DIM), _unit(rng, N, M, DIM))
    return vs


def _faiss_store(vs: VectorStore) -> VectorStore:
    """The same folder read only through FAISS, as before shard_files existed."""
    other = VectorStore(vs.root, vs.identity, vs.codec)
    other._direct = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return other


def _parsed(path: Path, parse):  # type: ignore[no-untyped-def]
    with shard_files.opened(str(path)) as (fd, st):
        return parse(fd, st.st_size)


def test_cls_rows_and_ids_are_faiss_bits(store: VectorStore) -> None:
    for shard in (1, 2):
        path = store.root / f"{shard:06d}.cls.faiss"
        index = faiss.read_index(str(path))
        layout = _parsed(path, shard_files.parse_cls)
        assert layout is not None and (layout.dim, layout.ntotal) == (DIM, N)
        rows = np.arange(N)
        with shard_files.opened(str(path)) as (fd, _):
            cls = shard_files.read_rows(fd, layout.rows_at, 4 * DIM, rows).view(np.uint32)
            ids = shard_files.read_rows(fd, layout.ids_at, 8, rows).view(np.int64).reshape(-1)
        want = index.index.reconstruct_n(0, N)
        np.testing.assert_array_equal(cls, want.view(np.uint32))  # bit for bit
        np.testing.assert_array_equal(ids, faiss.vector_to_array(index.id_map))


def test_patch_codes_are_faiss_bits(store: VectorStore) -> None:
    """The numpy-decodable codecs' codes are where the parser says; PQ files are refused (FAISS
    reads them)."""
    for shard in (1, 2):
        path = store.root / f"{shard:06d}.patch.faiss"
        layout = _parsed(path, shard_files.parse_patch)
        if store.codec not in NUMPY_CODECS:
            assert layout is None
            continue
        owner = faiss.read_index(str(path))
        index = faiss.downcast_index(owner)  # (a view: `owner` keeps it alive)
        assert layout is not None and (layout.dim, layout.ntotal) == (DIM, N * M)
        assert layout.code_size == index.sa_code_size()
        with shard_files.opened(str(path)) as (fd, _):
            codes = shard_files.read_rows(fd, layout.codes_at, M * layout.code_size, np.arange(N))
        np.testing.assert_array_equal(codes.reshape(-1), faiss.vector_to_array(index.codes))
        if isinstance(index, faiss.IndexScalarQuantizer):
            assert layout.qtype == index.sq.qtype
            np.testing.assert_array_equal(layout.trained, faiss.vector_to_array(index.sq.trained))


def test_patch_maxima_and_reads_equal_the_faiss_path(store: VectorStore) -> None:
    """Same ids, same order, same values (the same arithmetic on the same bits), and a query
    maps no shard where the codec decodes with numpy."""
    rng = np.random.default_rng(2)
    ids2 = store.read_shard(2).image_ids
    rows = sorted(rng.choice(N, 40, replace=False).tolist())
    ids1 = store.read_shard(1, [5]).image_ids
    locations = [(int(ids2[r]), 2, r) for r in rows[::-1]] + [(int(ids1[0]), 1, 5)]
    q = rng.standard_normal(DIM).astype(np.float32)
    fresh = VectorStore(store.root, store.identity, store.codec)

    got = fresh.patch_maxima(locations, q)
    want = _faiss_store(store).patch_maxima(locations, q)

    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
    assert (fresh._mapped == {}) == (store.codec in NUMPY_CODECS)
    scattered = [rows[3], rows[0], rows[7], rows[7] + 1 if rows[7] + 1 < N else 0]
    for shard, these, patches in [(2, scattered, True), (1, None, False), (2, [4], True)]:
        a = fresh.read_shard(shard, these, with_patches=patches)
        b = _faiss_store(store).read_shard(shard, these, with_patches=patches)
        np.testing.assert_array_equal(a.image_ids, b.image_ids)
        np.testing.assert_array_equal(a.cls, b.cls)
        np.testing.assert_array_equal(a.patches, b.patches)


def test_rows_are_read_in_few_syscalls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows close together are read with one pread, the gap between them dropped."""
    path = tmp_path / "rows"
    data = np.arange(1000 * 64, dtype=np.uint8).reshape(1000, 64)
    path.write_bytes(b"head" + data.tobytes())
    calls = []
    for name in ("pread", "preadv"):
        if hasattr(os, name):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda *a, _real=real: calls.append(a) or _real(*a))
    rows = np.array([3, 3, 5, 6, 7, 90, 91, 800])
    with shard_files.opened(str(path)) as (fd, _):
        got = shard_files.read_rows(fd, 4, 64, rows)
    np.testing.assert_array_equal(got, data[rows])
    assert len(calls) == 2  # 3..91 within the gap, 800 alone


def _outcome(call):  # type: ignore[no-untyped-def]
    try:
        return [np.asarray(x).tolist() for x in call()]
    except VectorStoreError as exc:
        return str(exc)


@pytest.mark.parametrize("kind", ["cls", "patch"])
@pytest.mark.parametrize("damage", ["truncated", "garbled header", "cut at the end"])
def test_damaged_files_answer_as_the_faiss_path(tmp_path: Path, kind: str, damage: str) -> None:
    """A damaged file is not a layout the parser accepts (even after its header was cached):
    FAISS reads it and raises `_damaged`'s message, or reads what it reads today (a mapped
    IndexIDMap2 does not notice a cut in its id map)."""
    vs = VectorStore.open(tmp_path / "v", IDENTITY, codec="fp16")
    rng = np.random.default_rng(3)
    vs.write_shard(1, list(range(10)), _unit(rng, 10, DIM), _unit(rng, 10, M, DIM))
    q = rng.standard_normal(DIM).astype(np.float32)
    vs.patch_maxima([(3, 1, 3)], q)  # headers parsed and cached first
    path = vs.root / f"000001.{kind}.faiss"
    data = path.read_bytes()
    if damage == "truncated":
        data = data[:100]
    elif damage == "garbled header":
        data = data[:4] + b"\xff" * 12 + data[16:]
    else:
        data = data[: len(data) - 7]
    path.write_bytes(data)
    old = _faiss_store(vs)
    for call, before in [
        (lambda: vs.patch_maxima([(3, 1, 3)], q), lambda: old.patch_maxima([(3, 1, 3)], q)),
        (lambda: _fields(vs.read_shard(1, [3])), lambda: _fields(old.read_shard(1, [3]))),
    ]:
        got = _outcome(call)
        assert got == _outcome(before)
        if damage != "cut at the end" or kind == "patch":
            assert isinstance(got, str) and "shard 1" in got and "piaa db check" in got


def _fields(got):  # type: ignore[no-untyped-def]
    return got.image_ids, got.cls, got.patches


def test_a_replaced_shard_is_read_again(tmp_path: Path) -> None:
    """Cached headers are keyed by the files' (inode, size, mtime): a shard rewritten under the
    same number (vacuum) is parsed again."""
    vs = VectorStore.open(tmp_path / "v", IDENTITY, codec="fp16")
    rng = np.random.default_rng(4)
    vs.write_shard(1, list(range(10)), _unit(rng, 10, DIM), _unit(rng, 10, M, DIM))
    assert vs.read_shard(1, [2]).image_ids.tolist() == [2]
    cls, patches = _unit(rng, 4, DIM), _unit(rng, 4, M, DIM)
    vs.write_shard(1, [50, 51, 52, 53], cls, patches)
    got = vs.read_shard(1, [2])
    assert got.image_ids.tolist() == [52]
    np.testing.assert_array_equal(got.cls[0], cls[2])
    with pytest.raises(VectorStoreError, match="missing"):
        vs.delete_shard(1)
        vs.read_shard(1, [0])


@pytest.mark.parametrize("codec", ["sq4", "sq8"])
def test_wide_quantisers_are_parsed(tmp_path: Path, codec: str) -> None:
    """At ViT-B/16's width (512) a scalar quantiser's trained ranges (4 KB) run past the first
    read of the header: still parsed, still FAISS's bits (a 100k ViT-B/16 library fell back
    to mapping every shard, 4.4 GB resident per text query)."""
    dim, n = 512, 520  # 520 × 16 patches: enough to train the library's quantiser
    identity = {**IDENTITY, "dim": dim}
    vs = VectorStore.open(tmp_path / codec, identity, codec=codec)
    rng = np.random.default_rng(2)
    vs.write_shard(1, list(range(n)), _unit(rng, n, dim), _unit(rng, n, M, dim))
    path = vs.root / "000001.patch.faiss"
    layout = _parsed(path, shard_files.parse_patch)
    assert layout is not None and layout.trained.size == 2 * dim
    index = faiss.downcast_index(owner := faiss.read_index(str(path)))
    assert owner is not None and layout.qtype == index.sq.qtype
    np.testing.assert_array_equal(layout.trained, faiss.vector_to_array(index.sq.trained))
    with shard_files.opened(str(path)) as (fd, _):
        codes = shard_files.read_rows(fd, layout.codes_at, M * layout.code_size, np.arange(n))
    np.testing.assert_array_equal(codes.reshape(-1), faiss.vector_to_array(index.codes))
    q = _unit(rng, dim)
    locations = [(i, 1, i) for i in range(0, n, 7)]
    got, want = vs.patch_maxima(locations, q), _faiss_store(vs).patch_maxima(locations, q)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
