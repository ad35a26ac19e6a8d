"""FAISS vector shards on disk: codecs, partial reads, streaming, identity and crash recovery."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from piaa_index.vectors.shards import MANIFEST, VectorStore, VectorStoreError

DIM, GRID = 32, (4, 4)
M = GRID[0] * GRID[1]
IDENTITY = {
    "model": "piaa-tiny-vit",
    "pretrained": "none",
    "front_end": "sclip",
    "dim": DIM,
    "grid": list(GRID),
}
# Worst-case absolute error per coordinate of unit-norm vectors after each patch codec.
TOLERANCE = {"fp32": 0.0, "fp16": 5e-4, "sq8": 1 / 255 + 1e-6}


def _unit(rng: np.random.Generator, *shape: int) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _data(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return _unit(rng, n, DIM), _unit(rng, n, M, DIM)


def _store(tmp_path: Path, codec: str = "fp16") -> VectorStore:
    return VectorStore.open(tmp_path / "vectors", IDENTITY, codec=codec)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "sq8"])
def test_round_trip_within_codec_error(tmp_path: Path, codec: str) -> None:
    """Vectors read back are the ones written, within the precision the codec promises."""
    vs = _store(tmp_path, codec)
    cls, patches = _data(12)
    ids = list(range(100, 112))
    vs.write_shard(1, ids, cls, patches)

    got = vs.read_shard(1)

    assert got.image_ids.tolist() == ids
    np.testing.assert_array_equal(got.cls, cls)  # [CLS] vectors are stored unquantised
    assert got.patches.shape == (12, M, DIM) and got.patches.dtype == np.float32
    err = float(np.abs(got.patches - patches).max())
    assert err <= TOLERANCE[codec]
    if codec == "fp32":
        np.testing.assert_array_equal(got.patches, patches)
    # Ranking by patch similarity survives quantisation (what tagging relies on).
    q = patches[3, 5]
    assert int(np.argmax(got.patches[3] @ q)) == 5


def test_codec_is_recorded_in_the_manifest(tmp_path: Path) -> None:
    """Reopening a folder keeps the codec it was created with."""
    _store(tmp_path, "sq8")
    reopened = VectorStore.open(tmp_path / "vectors", IDENTITY)
    assert reopened.codec == "sq8"
    assert (tmp_path / "vectors" / MANIFEST).is_file()


def test_read_subset_of_rows(tmp_path: Path) -> None:
    """Reading some rows (non-contiguous, out of runs) returns exactly those images."""
    vs = _store(tmp_path, "fp32")
    cls, patches = _data(10)
    vs.write_shard(1, list(range(10)), cls, patches)
    rows = [0, 2, 3, 4, 8]

    got = vs.read_shard(1, rows)

    assert got.image_ids.tolist() == rows
    np.testing.assert_array_equal(got.cls, cls[rows])
    np.testing.assert_array_equal(got.patches, patches[rows])


def test_vectors_for_one_image_checks_the_id(tmp_path: Path) -> None:
    """Reuse of an identical file's vectors fetches the right row, and refuses a wrong id."""
    vs = _store(tmp_path, "fp32")
    cls, patches = _data(4)
    vs.write_shard(1, [7, 8, 9, 10], cls, patches)
    c, p = vs.vectors_for(9, 1, 2)
    np.testing.assert_array_equal(c, cls[2])
    np.testing.assert_array_equal(p, patches[2])
    with pytest.raises(VectorStoreError, match="expected 8"):
        vs.vectors_for(8, 1, 2)


def test_iter_live_chunks_equal_full_read(tmp_path: Path) -> None:
    """Streaming only live rows in small chunks gives the same vectors as reading them whole."""
    vs = _store(tmp_path, "fp16")
    locations = []
    next_id = 1
    for shard, n in ((1, 7), (2, 5), (3, 9)):
        cls, patches = _data(n, seed=shard)
        ids = list(range(next_id, next_id + n))
        vs.write_shard(shard, ids, cls, patches)
        # Every third row is dead (removed or re-indexed): SQL does not point at it.
        locations += [(ids[r], shard, r) for r in range(n) if r % 3 != 1]
        next_id += n

    chunks = list(vs.iter_live(locations, max_images=3))

    assert all(len(c.image_ids) <= 3 for c in chunks)
    streamed_ids = np.concatenate([c.image_ids for c in chunks])
    assert sorted(streamed_ids.tolist()) == sorted(i for i, _, _ in locations)
    streamed = {int(i): (c.cls[k], c.patches[k]) for c in chunks for k, i in enumerate(c.image_ids)}
    for shard in (1, 2, 3):
        rows = [r for _, s, r in locations if s == shard]
        whole = vs.read_shard(shard, rows)
        for k, image_id in enumerate(whole.image_ids):
            np.testing.assert_array_equal(streamed[int(image_id)][0], whole.cls[k])
            np.testing.assert_array_equal(streamed[int(image_id)][1], whole.patches[k])


def test_write_rejects_wrong_shapes(tmp_path: Path) -> None:
    """A shard whose vectors do not match the model's dim/grid is never written."""
    vs = _store(tmp_path)
    cls, patches = _data(3)
    with pytest.raises(ValueError, match="do not match"):
        vs.write_shard(1, [1, 2, 3], cls[:, :16], patches)
    with pytest.raises(ValueError, match="do not match"):
        vs.write_shard(1, [1, 2], cls, patches)
    assert vs.shard_ids() == set()


def test_identity_mismatch_is_refused(tmp_path: Path) -> None:
    """Vectors made by one model are never mixed with another model's."""
    _store(tmp_path)
    other = dict(IDENTITY, model="ViT-B-32", dim=512, grid=[7, 7])
    with pytest.raises(VectorStoreError) as err:
        VectorStore.open(tmp_path / "vectors", other)
    message = str(err.value)
    assert "piaa-tiny-vit" in message and "ViT-B-32" in message


def test_damaged_manifest_is_reported(tmp_path: Path) -> None:
    """A corrupt manifest gives a clear error rather than a JSON traceback."""
    _store(tmp_path)
    (tmp_path / "vectors" / MANIFEST).write_text("{not json")
    with pytest.raises(VectorStoreError, match="damaged vector manifest"):
        VectorStore.open(tmp_path / "vectors", IDENTITY)


def test_reconcile_deletes_orphans_and_temp_files_and_reports_missing(tmp_path: Path) -> None:
    """After a crash: uncommitted shards and temp files go, lost shards are reported."""
    vs = _store(tmp_path)
    for shard in (1, 2, 3):
        vs.write_shard(shard, [shard * 10], *_data(1, seed=shard))
    root = tmp_path / "vectors"
    (root / "000004.cls.faiss.tmp").write_bytes(b"half written")
    # A write cut between the patch file and the cls file leaves a lone patch file.
    (root / "000005.patch.faiss").write_bytes(b"half a shard")
    (root / "000006.sum.json").write_bytes(b"{}")  # cut after the checksums, before cls

    orphans, missing = vs.reconcile(referenced={1, 3, 7})

    assert orphans == [2]
    assert missing == [7]
    names = sorted(p.name for p in root.iterdir())
    assert names == [
        "000001.cls.faiss",
        "000001.patch.faiss",
        "000001.sum.json",
        "000003.cls.faiss",
        "000003.patch.faiss",
        "000003.sum.json",
        MANIFEST,
    ]
    assert vs.read_shard(3).image_ids.tolist() == [30]
    with pytest.raises(VectorStoreError, match="missing"):
        vs.read_shard(2)


def test_next_shard_id_and_no_temp_files_left(tmp_path: Path) -> None:
    """Shard ids grow, and a finished write leaves no temporary files behind."""
    vs = _store(tmp_path)
    assert vs.next_shard_id() == 1
    vs.write_shard(vs.next_shard_id(), [1], *_data(1))
    vs.write_shard(vs.next_shard_id(), [2], *_data(1))
    assert vs.shard_ids() == {1, 2}
    assert vs.next_shard_id() == 3
    assert not list((tmp_path / "vectors").glob("*.tmp"))
    assert vs.disk_bytes() > 0


def test_reconcile_reports_a_shard_whose_patch_file_is_lost(tmp_path: Path) -> None:
    """A shard with only its [CLS] file cannot be tagged from: its images must be re-indexed."""
    vs = _store(tmp_path)
    vs.write_shard(1, [1, 2], *_data(2))
    vs.write_shard(2, [3], *_data(1, seed=2))
    (tmp_path / "vectors" / "000001.patch.faiss").unlink()

    orphans, missing = vs.reconcile(referenced={1, 2})

    assert (orphans, missing) == ([], [1])


def test_a_second_writer_is_refused(tmp_path):
    """Two index runs on one library would race for shard ids: the second fails fast."""
    from piaa_index.vectors.shards import LockedError

    identity = {"model": "m", "pretrained": "none", "front_end": "clip", "dim": 4, "grid": [1, 1]}
    first = VectorStore.open(tmp_path, identity)
    second = VectorStore.open(tmp_path, identity)
    with first.writer_lock():
        with pytest.raises(LockedError, match="another piaa process"):
            with second.writer_lock():
                pass
    with second.writer_lock():  # released: the next run proceeds
        pass


def test_cls_only_reads_skip_the_patches(tmp_path):
    """`similar` reads [CLS] vectors only: same ids and vectors, no patch decoding."""
    identity = {"model": "m", "pretrained": "none", "front_end": "clip", "dim": 4, "grid": [2, 2]}
    store = VectorStore.open(tmp_path, identity)
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(3, 4)).astype(np.float32)
    store.write_shard(1, [7, 8, 9], cls, rng.normal(size=(3, 4, 4)).astype(np.float32))
    (tmp_path / "000001.patch.faiss").write_bytes(b"damaged")  # would fail if it were read
    got = store.read_shard(1, [0, 2], with_patches=False)
    assert got.image_ids.tolist() == [7, 9] and got.patches.shape == (2, 0, 4)
    assert np.array_equal(got.cls, cls[[0, 2]])


# Compact codecs on clustered patches (the synthetic world's, 128 dims): mean relative
# reconstruction error ||x - x'|| / ||x|| each must stay under (measured: sq4 0.13).
COMPACT_TOLERANCE = {"sq4": 0.2, "pq4": 0.4, "opq4": 0.4}


@pytest.mark.parametrize("codec", ["sq4", "pq4", "opq4"])
def test_compact_codecs_round_trip(tmp_path: Path, codec: str) -> None:
    """A shard of 700 images x 16 patches (enough to train PQ) reads back within the codec's
    error, ranks patches like the originals, and is smaller than fp16 by the promised factor."""
    from tools import scale

    # The synthetic world at 32 dims, 4x4 patches (PQ training stays fast): 700 images.
    big = scale.World.make(20, "shapesworld", seed=3)
    world = scale.World(big.means[:, :DIM], big.text[:, :DIM], big.bg[:, :DIM], grid=4)
    world.means /= np.linalg.norm(world.means, axis=-1, keepdims=True)
    cls, patches, _ = world.images(700, np.random.default_rng(4))
    ident = dict(IDENTITY, dim=world.dim, grid=[world.grid, world.grid])
    vs = VectorStore.open(tmp_path / "v", ident, codec=codec)
    ids = list(range(1000, 1700))
    vs.write_shard(1, ids, cls, patches)

    got = vs.read_shard(1)

    assert got.image_ids.tolist() == ids and got.patches.shape == patches.shape
    np.testing.assert_array_equal(got.cls, cls)
    rel = np.linalg.norm(got.patches - patches, axis=-1) / np.linalg.norm(patches, axis=-1)
    assert float(rel.mean()) <= COMPACT_TOLERANCE[codec]
    # Each image's best patch for a label prototype, chosen on the decoded patches, is within
    # 0.03 cosine of the original best on average (one object's patches are near-ties).
    q = world.means[0]
    best_true = (patches @ q).max(axis=1)
    best_got_true = np.take_along_axis(patches @ q, np.argmax(got.patches @ q, axis=1)[:, None], 1)
    assert float((best_true - best_got_true[:, 0]).mean()) <= 0.03
    size = vs._path(1, "patch").stat().st_size / patches[..., 0].size  # bytes per patch
    d = world.dim
    codebooks = {"sq4": 8 * d, "pq4": 256 * d * 4, "opq4": 256 * d * 4 + d * d * 4}[codec]
    per_patch = {"sq4": 0.5, "pq4": 0.25, "opq4": 0.25}[codec] * d
    assert size <= per_patch + (codebooks + 4096) / patches[..., 0].size


@pytest.mark.parametrize("codec", ["sq4", "pq4"])
def test_shards_before_the_quantiser_exists_are_lossless(tmp_path: Path, codec: str) -> None:
    """A first run of a few photos has too few patches to train a quantiser: its shard is
    stored fp16 (no loss) and no quantiser is made from so small a sample."""
    vs = _store(tmp_path, codec)
    cls, patches = _data(12)
    vs.write_shard(1, list(range(12)), cls, patches)
    got = vs.read_shard(1)
    assert float(np.abs(got.patches - patches).max()) <= TOLERANCE["fp16"]
    assert vs.patch_quantizer() is None


def _world_shard(n: int, seed: int):  # type: ignore[no-untyped-def]
    from tools import scale

    big = scale.World.make(20, "shapesworld", seed=3)
    world = scale.World(big.means[:, :DIM], big.text[:, :DIM], big.bg[:, :DIM], grid=4)
    world.means /= np.linalg.norm(world.means, axis=-1, keepdims=True)
    cls, patches, _ = world.images(n, np.random.default_rng(seed))
    return dict(IDENTITY, dim=world.dim, grid=[world.grid, world.grid]), cls, patches


@pytest.mark.parametrize("codec", ["sq4", "pq4"])
def test_copied_patches_keep_their_codes(tmp_path: Path, codec: str) -> None:
    """Vacuum and the reuse of a copied file's vectors decode patches and write them into a new
    shard: with the library's one quantiser that is exact, however often it happens."""
    ident, cls, patches = _world_shard(700, 4)
    vs = VectorStore.open(tmp_path / "v", ident, codec=codec)
    vs.write_shard(1, list(range(700)), cls, patches)
    first = vs.read_shard(1)
    assert not np.allclose(first.patches, patches, atol=1e-3)  # really quantised
    _, cls2, patches2 = _world_shard(700, 5)
    vs.write_shard(2, list(range(700, 1400)), cls2, patches2)  # a later run, same quantiser

    vs.write_shard(3, list(range(700)), first.cls, first.patches)  # moved once
    moved = vs.read_shard(3)
    vs.write_shard(4, list(range(700)), moved.cls, moved.patches)  # and again

    np.testing.assert_array_equal(moved.patches, first.patches)
    np.testing.assert_array_equal(vs.read_shard(4).patches, first.patches)
    assert len(list((tmp_path / "v").glob("patch-quantizer.*.faiss"))) == 1


def test_a_damaged_quantiser_is_set_aside_and_shards_still_read(tmp_path: Path) -> None:
    """The quantiser file is only for encoding new shards; damage to it loses nothing."""
    ident, cls, patches = _world_shard(700, 4)
    vs = VectorStore.open(tmp_path / "v", ident, codec="sq4")
    vs.write_shard(1, list(range(700)), cls, patches)
    before = vs.read_shard(1).patches
    (path,) = (tmp_path / "v").glob("patch-quantizer.*.faiss")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    vs.write_shard(2, list(range(700, 1400)), cls, patches)

    assert (path.with_name(path.name + ".damaged")).exists()
    assert len(list((tmp_path / "v").glob("patch-quantizer.*.faiss"))) == 1
    np.testing.assert_array_equal(vs.read_shard(1).patches, before)
    assert vs.read_shard(2).patches.shape == patches.shape


@pytest.mark.parametrize("codec", ["fp32", "fp16", "sq8", "sq4", "pq4", "opq4"])
def test_patch_maxima_on_codes_equal_the_decoded_patches(tmp_path: Path, codec: str) -> None:
    """Text search pre-scores candidates on the stored codes (no decoding): each image's best
    patch similarity and [CLS] similarity must be what the decoded vectors give, for every
    codec, in the order the locations name no matter how they are spread over shards."""
    ident, cls, patches = _world_shard(700, 5)
    vs = VectorStore.open(tmp_path / "v", ident, codec=codec)
    vs.write_shard(1, list(range(1000, 1700)), cls, patches)
    vs.write_shard(2, list(range(2000, 2700)), cls, patches)
    rows = [0, 1, 2, 40, 41, 699, 300]
    locations = [(2000 + r, 2, r) for r in rows] + [(1000 + r, 1, r) for r in rows[:3]]
    q = np.random.default_rng(6).standard_normal(ident["dim"]).astype(np.float32)

    ids, best, cls_sim = vs.patch_maxima(locations, q)

    want = {}
    for shard in (1, 2):
        got = vs.read_shard(shard)
        for i, image_id in enumerate(got.image_ids.tolist()):
            want[image_id] = (float((got.patches[i] @ q).max()), float(got.cls[i] @ q))
    assert sorted(ids.tolist()) == sorted(i for i, _, _ in locations)
    for image_id, b, c in zip(ids.tolist(), best, cls_sim, strict=True):
        assert b == pytest.approx(want[image_id][0], abs=1e-4)
        assert c == pytest.approx(want[image_id][1], abs=1e-5)
    # A scattered subset decodes exactly as the whole shard does.
    some = vs.read_shard(2, rows=sorted(rows))
    np.testing.assert_allclose(some.patches, vs.read_shard(2).patches[sorted(rows)], atol=1e-6)
