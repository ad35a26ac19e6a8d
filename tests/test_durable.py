"""durable.py, the one home of durable files: locks across processes, atomic writes of one file
and of several that belong together, and the content hash stored in every library."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from piaa_index import durable
from piaa_index.durable import atomic_write, file_digest, file_lock, replace_all, stream_digest

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="flock")

FIXTURE = Path(__file__).parent / "fixtures" / "library-0.1.0"
_HOLDER = """
import sys
from piaa_index.durable import file_lock
with file_lock(sys.argv[1], shared=sys.argv[2] == "shared") as held:
    print("held" if held else "refused", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@contextmanager
def held_elsewhere(path: Path, mode: str = "exclusive") -> Iterator[None]:
    """`path` locked by another process for the duration of the block."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_lock_held_by_another_process_is_refused_without_waiting(tmp_path: Path) -> None:
    lock = tmp_path / "writer.lock"
    with held_elsewhere(lock):
        with file_lock(lock, blocking=False) as held:
            assert held is False
        with file_lock(lock, shared=True, blocking=False) as held:
            assert held is False
    with file_lock(lock, blocking=False) as held:  # released with the process
        assert held is True


def test_shared_locks_coexist_and_exclude_an_exclusive_one(tmp_path: Path) -> None:
    lock = tmp_path / "readers.lock"
    with held_elsewhere(lock, "shared"):
        with file_lock(lock, shared=True, blocking=False) as held:
            assert held is True
        with file_lock(lock, blocking=False) as held:
            assert held is False
    with file_lock(lock, shared=True) as first, file_lock(lock, shared=True) as second:
        assert first and second  # in one process too


def test_the_writers_keep_their_answers_to_a_taken_lock(tmp_path: Path) -> None:
    """An index run refuses at once (LockedError); the score writer, asked not to wait, is told
    False; vacuum's deletion waits for readers (tested by its shared/exclusive pair above)."""
    from piaa_index.vectors import scores
    from piaa_index.vectors.shards import LockedError, VectorStore

    identity = {"model": "m", "pretrained": "none", "front_end": "clip", "dim": 4, "grid": [1, 1]}
    vectors = VectorStore.open(tmp_path / "v", identity)
    with held_elsewhere(tmp_path / "v" / "writer.lock"):
        with pytest.raises(LockedError, match="another piaa process is indexing"):
            with vectors.writer_lock():
                pass
    root = scores.scores_root(tmp_path / "v")
    root.mkdir()
    with held_elsewhere(root / "writer.lock"):
        with scores.writer_lock(root, blocking=False) as held:
            assert held is False
    with scores.writer_lock(root, blocking=False) as held:
        assert held is True


def _write(folder: Path, version: str) -> list[tuple[Path, Path]]:
    pairs = []
    for name in ("data.bin", "held.npz", "meta.json"):
        (folder / f"{name}.tmp").write_text(f"{name} {version}")
        pairs.append((folder / f"{name}.tmp", folder / name))
    return pairs


def _fail_on(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    real = os.replace

    def replace(src, dst):  # type: ignore[no-untyped-def]
        if Path(dst).name == name:
            raise OSError(5, "crash before this rename")
        real(src, dst)

    monkeypatch.setattr(durable.os, "replace", replace)


def test_replace_all_moves_in_order_and_a_crash_before_the_last_keeps_the_old_last(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    replace_all(_write(tmp_path, "old"))
    assert (tmp_path / "meta.json").read_text() == "meta.json old"
    _fail_on(monkeypatch, "meta.json")
    with pytest.raises(OSError, match="crash"):
        replace_all(_write(tmp_path, "new"))
    # The data files moved; the last one was never touched: the previous one is still readable.
    assert (tmp_path / "data.bin").read_text() == "data.bin new"
    assert (tmp_path / "meta.json").read_text() == "meta.json old"


def test_replace_all_with_a_vouching_last_file_leaves_none_for_a_mix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The derived indexes' protocol: meta.json (their checksums) is removed before the first
    rename, so a crash in between leaves no meta.json vouching for new data with old held ids."""
    replace_all(_write(tmp_path, "old"), last_vouches=True)
    _fail_on(monkeypatch, "held.npz")
    with pytest.raises(OSError, match="crash"):
        replace_all(_write(tmp_path, "new"), last_vouches=True)
    assert (tmp_path / "data.bin").read_text() == "data.bin new"
    assert (tmp_path / "held.npz").read_text() == "held.npz old"
    assert not (tmp_path / "meta.json").exists()


def test_a_similar_index_saved_over_a_crash_is_rebuilt_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from piaa_index.vectors.similar import ClsIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((20, 8)).astype(np.float32)
    old = ClsIndex.build(8, np.arange(20), np.ones(20, np.int32), vectors)
    old.version = 1
    old.save(tmp_path)
    assert ClsIndex.load(tmp_path) is not None
    new = ClsIndex.build(8, np.arange(10), np.ones(10, np.int32), vectors[:10])
    new.version = 2
    _fail_on(monkeypatch, "held.npz")
    with pytest.raises(OSError, match="crash"):
        new.save(tmp_path)
    assert ClsIndex.load(tmp_path) is None  # no meta.json: rebuilt, not 10 vectors for 20 ids
    monkeypatch.undo()
    new.save(tmp_path)
    loaded = ClsIndex.load(tmp_path)
    assert loaded is not None and loaded.version == 2 and len(loaded.ids) == 10


def test_atomic_write_leaves_the_old_file_and_no_temporary_one_on_failure(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_bytes(b"old")
    path.chmod(0o640)
    with pytest.raises(RuntimeError):
        with atomic_write(path) as fh:
            fh.write(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [path]
    with atomic_write(path, keep_mode=True, sync_folder=True) as fh:
        fh.write(b"new")
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o640
    (tmp_path / "taken").write_bytes(b"")
    with pytest.raises(FileExistsError):  # a random temporary name is never reused
        with atomic_write(path, tmp=tmp_path / "taken", exclusive=True) as fh:
            fh.write(b"x")
    assert path.read_bytes() == b"new"


def test_one_hash_and_it_is_the_one_libraries_stored(tmp_path: Path) -> None:
    """blake2b-128 in every reader (images' content hash, thumbnails, checksums), across the
    1 MiB pieces it reads; and the checksums an earlier release wrote still match."""
    from piaa_index.ingest.images import file_hash

    data = os.urandom(durable.HASH_CHUNK * 2 + 12_345)
    path = tmp_path / "photo.jpg"
    path.write_bytes(data)
    expected = hashlib.blake2b(data, digest_size=16).hexdigest()
    assert file_digest(path) == file_hash(path) == durable.bytes_digest(data) == expected
    with open(path, "rb") as fh:
        assert stream_digest(fh) == expected
    (tmp_path / "empty").write_bytes(b"")
    assert file_digest(tmp_path / "empty") == "cae66941d9efbd404e4d88758ea67670"

    with tarfile.open(FIXTURE / "library.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    (folder,) = (tmp_path / "home" / "vectors").iterdir()
    sums = json.loads((folder / "000001.sum.json").read_text())
    for kind in ("cls", "patch"):
        assert file_digest(folder / f"000001.{kind}.faiss") == sums[kind]
    meta = json.loads((folder / "similar" / "meta.json").read_text())
    assert durable.damaged_files(folder / "similar", meta["sums"]) == []


def test_damaged_files_trusts_a_recorded_stamp_and_rereads_a_moved_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file still carrying the stamp recorded when it was hashed is not read again (the
    derived indexes' held ids, checked on every query); any rewrite moves the stamp, and the
    file is then hashed and its damage reported."""
    from piaa_index import durable

    data = bytes(range(256)) * 4096
    (tmp_path / "held.npz").write_bytes(data)
    sums = {"held.npz": durable.file_checksum(tmp_path / "held.npz")}
    stamps = {"held.npz": durable.content_stamp(tmp_path / "held.npz")}
    with monkeypatch.context() as patched:
        patched.setattr(durable, "file_checksum", lambda path: pytest.fail("read again"))
        assert durable.damaged_files(tmp_path, sums, stamps) == []
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    os.utime(tmp_path / "held.npz", ns=(0, 1))  # a different mtime than the one recorded
    (tmp_path / "held.npz").write_bytes(bytes(flipped))
    assert durable.damaged_files(tmp_path, sums, stamps) == ["held.npz"]
    assert durable.damaged_files(tmp_path, sums) == ["held.npz"]
    (tmp_path / "held.npz").unlink()
    assert durable.damaged_files(tmp_path, sums, stamps) == ["held.npz"]
