"""A read that hangs in the kernel (a dead NFS/SMB share) fails its file, never the run.

The hang here is a real blocking system call: `os.read` on a pipe nobody writes to blocks
inside the kernel exactly as a read from an unreachable share does, and no Python code can
interrupt it. Only the file it stands in for is simulated.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from piaa_index.catalog.schema import FAILED, INDEXED
from piaa_index.engines import indexer
from piaa_index.ingest.bounded import TimedOut, map_bounded
from piaa_index.library.core import Library, UserInputError
from tests.image_files import make_photo_folder
from tests.test_indexer import open_library


@pytest.fixture
def hung_read() -> Iterator[Callable[[], bytes]]:
    """A read that blocks in the kernel until the test ends (one byte is written then)."""
    r, w = os.pipe()
    yield lambda: os.read(r, 1)
    os.write(w, b"x" * 16)
    os.close(w)


def test_results_keep_their_order_over_thousands_of_items() -> None:
    items = list(range(5_000))

    def work(i: int) -> int:
        if i % 997 == 0:
            raise ValueError(f"bad {i}")
        return i * i

    out = map_bounded(work, items, workers=4, seconds=60)
    assert len(out) == len(items)
    for i, got in zip(items, out, strict=True):
        if i % 997 == 0:
            assert isinstance(got, ValueError) and str(got) == f"bad {i}"
        else:
            assert got == i * i


def test_a_hung_call_times_out_and_the_others_finish(hung_read: Callable[[], bytes]) -> None:
    def work(i: int) -> int:
        if i == 3:
            hung_read()
        return i

    out = map_bounded(work, list(range(2_000)), workers=2, seconds=0.5)
    assert isinstance(out[3], TimedOut) and "hung read" in str(out[3])
    assert [x for i, x in enumerate(out) if i != 3] == [i for i in range(2_000) if i != 3]


def test_many_hung_calls_give_up_on_the_rest() -> None:
    r, w = os.pipe()
    try:
        out = map_bounded(lambda _: os.read(r, 1), list(range(3_000)), 4, 0.3, max_stuck=4)
    finally:
        os.write(w, b"x" * 64)
        os.close(w)
    assert all(isinstance(x, TimedOut) for x in out)
    assert sum("not read" in str(x) for x in out) >= 3_000 - 8


@pytest.fixture
def library(piaa_home: Path, tiny_model_config: Path) -> Iterator[Library]:
    lib = open_library(piaa_home, tiny_model_config)
    yield lib
    lib.close()


@pytest.mark.parametrize("stage", ["hash", "decode"])
def test_a_file_on_a_hung_share_fails_alone_and_is_retried_next_run(
    stage: str,
    library: Library,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    hung_read: Callable[[], bytes],
) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=40)
    victim = str(photos.good[7])
    name = "file_hash" if stage == "hash" else "load_image"
    real = getattr(indexer, name)

    def sometimes_hangs(path: str, *args: object, **kw: object) -> object:
        if str(path) == victim:
            hung_read()
        return real(path, *args, **kw)

    monkeypatch.setattr(indexer, name, sometimes_hangs)
    report = library.index([photos.root], read_timeout=0.5)
    failed = {f["path"]: f["error"] for f in report.failed}
    assert "no answer after 0.5 s" in failed[victim]
    assert report.indexed == len(photos.good) - 1
    # Not recorded as a broken file: the next run (share back) indexes it.
    assert victim not in library.store.images_under([str(photos.root)])
    monkeypatch.setattr(indexer, name, real)
    again = library.index([photos.root])
    assert again.indexed == 1
    rows = library.store.images_under([str(photos.root)])
    assert rows[victim].status == INDEXED
    assert {rows[str(p)].status for p in photos.broken} == {FAILED}


def test_a_read_timeout_must_be_positive(library: Library, tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="read timeout"):
        library.index([tmp_path], read_timeout=0)
