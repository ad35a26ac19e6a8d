"""Damage is noticed and repaired: a flipped byte or a truncated vector file is reported by
`piaa db check`, its images are re-encoded by the next index run, and reading a damaged file is
a clear error, never a faiss traceback or silently different results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from piaa_index.cli import cli
from piaa_index.library.core import Library
from piaa_index.vectors.shards import VectorStoreError
from tests.image_files import PhotoFolder, make_photo_folder


@pytest.fixture
def two_shards(
    tmp_path: Path, piaa_home: Path, tiny_model_config: Path
) -> tuple[Library, PhotoFolder, PhotoFolder]:
    a = make_photo_folder(tmp_path / "a", n=30, seed=1)
    b = make_photo_folder(tmp_path / "b", n=30, seed=2)
    lib = Library.open(home=piaa_home, model=str(tiny_model_config), pretrained="none")
    assert lib.index([a.root]).indexed == 30
    assert lib.index([b.root]).indexed == 30  # a second run: a second shard
    return lib, a, b


def shard_files(lib: Library, kind: str) -> list[Path]:
    return sorted(lib.vectors.root.glob(f"*.{kind}.faiss"))


def check(lib: Library) -> tuple[int, dict]:
    result = CliRunner().invoke(
        cli,
        ["db", "check", "--json", "--home", str(lib.settings.home), "--db", lib.settings.db_url],
    )
    return result.exit_code, json.loads(result.stdout)


def test_a_flipped_byte_is_found_and_repaired(
    two_shards: tuple[Library, PhotoFolder, PhotoFolder],
) -> None:
    lib, a, b = two_shards
    code, report = check(lib)
    assert code == 0 and report["ok"] and report["vectors"]["shards"] == 2

    patch = shard_files(lib, "patch")[0]
    data = bytearray(patch.read_bytes())
    data[len(data) // 2] ^= 0x40  # one bit, in the middle of the vectors
    patch.write_bytes(bytes(data))

    code, report = check(lib)
    assert code == 1 and not report["ok"]
    assert [d["shard"] for d in report["vectors"]["damaged"]] == [1]
    assert report["vectors"]["images_to_reencode"] == 30
    assert lib.status()["images"]["indexed"] == 30

    again = lib.index([a.root, b.root])
    assert (again.indexed, again.unchanged) == (30, 30)
    code, report = check(lib)
    assert code == 0 and report["ok"]


def test_db_check_waits_for_readers_before_deleting_a_damaged_shard(
    two_shards: tuple[Library, PhotoFolder, PhotoFolder],
) -> None:
    """A fit or search reading the shards keeps them on disk until it ends: `db check` removes
    a damaged shard only after it, as `vacuum` does (issue 20)."""
    import threading
    import time

    lib, _, _ = two_shards
    patch = shard_files(lib, "patch")[0]
    data = bytearray(patch.read_bytes())
    data[len(data) // 2] ^= 0x40
    patch.write_bytes(bytes(data))

    held, seen = threading.Event(), []

    def reader() -> None:
        with lib.vectors.reading():
            held.set()
            time.sleep(1.5)  # a pass over the shards; db check starts meanwhile
            seen.append(patch.exists())

    thread = threading.Thread(target=reader)
    thread.start()
    held.wait()
    code, report = check(lib)  # blocks on the reader, then deletes
    thread.join()
    assert seen == [True]
    assert code == 1 and [d["shard"] for d in report["vectors"]["damaged"]] == [1]
    assert not patch.exists()


def test_a_truncated_file_is_a_clear_error_then_repaired(
    two_shards: tuple[Library, PhotoFolder, PhotoFolder],
) -> None:
    lib, a, b = two_shards
    cls_file = shard_files(lib, "cls")[1]
    cls_file.write_bytes(cls_file.read_bytes()[:100])
    with pytest.raises(VectorStoreError, match="is damaged.*piaa db check"):
        lib.vectors.read_shard(2)
    code, report = check(lib)
    assert code == 1 and [d["shard"] for d in report["vectors"]["damaged"]] == [2]
    assert lib.index([a.root, b.root]).indexed == 30
    lib.set_vocabulary(["red circle", "blue circle"])
    assert lib.fit().n_images == 60


def test_a_damaged_sqlite_page_is_reported(tmp_path: Path, tiny_model_config: Path) -> None:
    home = tmp_path / "home"
    photos = make_photo_folder(tmp_path / "p", n=20)
    lib = Library.open(home=home, model=str(tiny_model_config), pretrained="none")
    lib.index([photos.root])
    lib.close()
    db = home / "piaa.sqlite3"
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[3 * page : 4 * page] = bytes(page)  # zero one page past the header
    db.write_bytes(bytes(data))
    result = subprocess.run(
        [sys.executable, "-m", "piaa_index", "db", "check", "--home", str(home)],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PIAA_")},
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr


def test_a_lost_sqlite_file_next_to_its_vectors_is_refused(tmp_path: Path) -> None:
    """Deleting (or moving) piaa.sqlite3 must not silently start a new, empty library beside the
    old vectors (issue 18): the CLI refuses and says how to go on; moving the folder away does."""
    import subprocess
    import sys

    from piaa_index.shapes.dataset import generate_dataset
    from tests.piaa_processes import piaa_env

    generate_dataset(tmp_path / "scenes", 12, seed=5, size=96, progress=False)
    home = tmp_path / "home"
    env = piaa_env(home, None)

    def piaa(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "piaa_index", *args],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    assert piaa("index", str(tmp_path / "scenes" / "images")).returncode == 0
    (home / "piaa.sqlite3").unlink()
    for suffix in ("-wal", "-shm"):
        (home / f"piaa.sqlite3{suffix}").unlink(missing_ok=True)
    refused = piaa("status")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "is missing, but its vectors are in" in refused.stderr
    assert "restore the database file from a backup" in refused.stderr
    assert not (home / "piaa.sqlite3").exists()  # nothing was created
    (folder,) = [p for p in (home / "vectors").iterdir() if p.is_dir()]
    folder.rename(tmp_path / "old-vectors")
    assert piaa("status").returncode == 0  # the way out: a new library


def test_damaged_derived_indexes_are_found_and_rebuilt(tmp_path: Path) -> None:
    """A flipped byte in the `similar` index's held ids (once a BadZipFile traceback) or in its
    FAISS file: queries answer alike (an exact scan; only `index`, `fit`, `vacuum` and
    `db check` build) instead of failing, and `db check` names the damage, exits 1, removes it
    and builds it again (issues 18 and 23)."""
    from piaa_index.shapes.dataset import generate_dataset
    from tests.piaa_processes import PiaaProcesses

    generate_dataset(tmp_path / "scenes", 40, seed=8, size=96, progress=False)
    lib = PiaaProcesses(tmp_path / "home", None)
    lib.run("index", str(tmp_path / "scenes" / "images"))
    first = sorted((tmp_path / "scenes" / "images").iterdir())[0]
    want = json.loads(lib.run("similar", str(first), "--json"))
    (folder,) = [p / "similar" for p in (tmp_path / "home" / "vectors").iterdir() if p.is_dir()]
    for name in ("held.npz", "cls.faiss"):
        data = bytearray((folder / name).read_bytes())
        data[len(data) // 2] ^= 0xFF
        (folder / name).write_bytes(bytes(data))
        if name == "held.npz":  # checked on every load: the query scans and answers alike
            assert json.loads(lib.run("similar", str(first), "--json")) == want
    result = subprocess.run(
        [sys.executable, "-m", "piaa_index", "db", "check", "--json"],
        env=lib.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert [d["index"] for d in report["derived_damaged"]] == ["similar"]
    assert (folder / "meta.json").is_file()  # removed, then built again from the shards
    assert json.loads(lib.run("similar", str(first), "--json")) == want
    assert json.loads(lib.run("db", "check", "--json"))["ok"] is True


LABELS = ("star", "wheel", "sun", "house", "car", "apple")


def _scenes(tmp_path: Path, name: str, n: int, seed: int) -> Path:
    from piaa_index.shapes.dataset import generate_dataset

    generate_dataset(tmp_path / name, n, seed=seed, size=96, progress=False)
    return tmp_path / name / "images"


def _answers(lib: Any, images: list[Path]) -> dict[str, Any]:
    """Every label's search and a few images' tags, as JSON."""
    out: dict[str, Any] = {
        label: json.loads(lib.run("search", label, "--json")) for label in LABELS
    }
    for image in images:
        out[str(image)] = json.loads(lib.run("tags", str(image), "--json"))
    return out


def _piaa(lib: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "piaa_index", *args],
        env=lib.env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def _flip(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str | None:
    """None (the home's SQLite file) or a fresh Postgres database (needs PIAA_TEST_PG)."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("postgres_database")())


def test_damaged_score_segments_are_scored_again(tmp_path: Path, db_url: str | None) -> None:
    """A flipped byte in a score segment (the fused scores S, the present bits) once changed
    answers silently: now the segment is left out with a warning, its images are scored again
    from the vectors (the same answers), and `db check` names it, exits 1 and removes it."""
    from tests.piaa_processes import PiaaProcesses

    a = _scenes(tmp_path, "a", 30, seed=3)
    b = _scenes(tmp_path, "b", 12, seed=4)
    lib = PiaaProcesses(tmp_path / "home", db_url)
    lib.run("index", str(a))
    lib.run("vocab", "set", *LABELS)
    images = sorted(a.iterdir())[:3] + sorted(b.iterdir())[:3]
    lib.run("search", "star")  # the fit: segment 1
    lib.run("index", str(b))
    before = _answers(lib, images)  # the new images: segment 2
    (folder,) = (tmp_path / "home" / "vectors").glob("*/scores/*/")
    assert (folder / "seg000002.S.npy").exists()
    assert lib.check()["scores"] == {"segments": 2, "without_checksum": 0, "damaged": []}

    _flip(folder / "seg000001.S.npy")
    _flip(folder / "seg000002.present.npy", 0.9)
    first = _piaa(lib, "search", LABELS[0], "--json")
    assert first.returncode == 0 and "Traceback" not in first.stderr, first.stderr
    assert "score segment seg000001" in first.stderr and "is damaged" in first.stderr
    assert "score segment seg000002" in first.stderr
    assert json.loads(first.stdout) == before[LABELS[0]]
    assert _answers(lib, images) == before

    result = _piaa(lib, "db", "check", "--json")
    assert result.returncode == 1, result.stderr
    damaged = json.loads(result.stdout)["scores"]["damaged"]
    assert sorted(d["segment"].split("/")[1] for d in damaged) == ["seg000001", "seg000002"]
    assert all("does not match its checksum" in d["problem"] for d in damaged)
    assert not (folder / "seg000001.S.npy").exists()
    text = _piaa(lib, "db", "check")
    assert text.returncode == 0 and "scores: " in text.stdout, text.stdout
    assert _answers(lib, images) == before
    assert lib.check()["ok"] is True

    # A segment whose checksum file was deleted is damaged too (it was written with one).
    segment = sorted(folder.glob("seg*.sum.json"))[-1].name.split(".")[0]
    (folder / f"{segment}.sum.json").unlink()
    _flip(folder / f"{segment}.S.npy")
    assert _answers(lib, images) == before
    report = json.loads(_piaa(lib, "db", "check", "--json").stdout)
    assert [d["problem"] for d in report["scores"]["damaged"]] == ["its checksum file is missing"]


def test_a_shard_without_its_checksum_file_is_damaged(
    two_shards: tuple[Library, PhotoFolder, PhotoFolder],
) -> None:
    """A deleted checksum file and a flipped [CLS] byte once passed as "without checksum":
    every shard of a library written since checksums exist has one, so it is damage (its
    images are re-encoded); a library from before keeps its old shards unchecked."""
    lib, a, b = two_shards
    root = lib.vectors.root
    (root / "000001.sum.json").unlink()
    _flip(shard_files(lib, "cls")[0], 0.8)
    code, report = check(lib)
    assert code == 1 and report["vectors"]["without_checksum"] == 0
    (damaged,) = report["vectors"]["damaged"]
    assert damaged["shard"] == 1 and "checksum file is missing" in damaged["problem"]
    assert report["vectors"]["images_to_reencode"] == 30
    assert lib.index([a.root, b.root]).indexed == 30
    assert check(lib)[0] == 0

    # A library written before checksum files: its manifest does not say where they start.
    shard = sorted(lib.vectors.shard_ids())[0]
    (root / f"{shard:06d}.sum.json").unlink()
    manifest = json.loads((root / "manifest.json").read_text())
    del manifest["checksums_from"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with lib.store.session() as s:
        from piaa_index.catalog.schema import Setting

        s.delete(s.get(Setting, "vectors_manifest"))
    code, report = check(lib)
    assert code == 0 and report["vectors"]["without_checksum"] == 1, report
    assert json.loads((root / "manifest.json").read_text())["checksums_from"] == shard + 1


def test_a_damaged_or_lost_manifest_is_a_clear_error_then_rebuilt(
    tmp_path: Path, db_url: str | None
) -> None:
    """manifest.json with another dimension (once a ValueError traceback in `search --text`
    and `tags --evidence`) or deleted (once "this database's vectors are not in …"): a
    one-line error naming the damage, exit 1; `db check` reports it, exits 1 and rebuilds it
    from the database's record, and the answers are the ones from before."""
    from tests.piaa_processes import PiaaProcesses

    images = _scenes(tmp_path, "a", 24, seed=6)
    lib = PiaaProcesses(tmp_path / "home", db_url)
    lib.run("index", str(images))
    lib.run("vocab", "set", *LABELS)
    first = str(sorted(images.iterdir())[0])
    text = ["search", "--text", "a star", "--json"]
    evidence = ["tags", first, "--evidence", "star", "--json"]
    want = (lib.run(*text), lib.run(*evidence))
    (path,) = (tmp_path / "home" / "vectors").glob("*/manifest.json")
    good = path.read_text()

    def damage_a() -> None:
        manifest = json.loads(good)
        manifest["identity"]["dim"] = 64
        path.write_text(json.dumps(manifest))

    for damage, says in ((damage_a, "dim 64, recorded 128"), (path.unlink, "is missing")):
        damage()
        for args in (text, evidence):
            result = _piaa(lib, *args)
            assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
            assert says in result.stderr and "`piaa db check` rebuilds it" in result.stderr
            assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        result = _piaa(lib, "db", "check", "--json")
        assert result.returncode == 1, result.stderr
        assert json.loads(result.stdout)["manifest"]["action"] == (
            "rebuilt from the database's record"
        )
        assert json.loads(path.read_text()) == json.loads(good)
        assert (lib.run(*text), lib.run(*evidence)) == want
        assert lib.check()["ok"] is True


def test_a_flipped_byte_in_the_sqlite_file_is_reported_with_the_way_out(tmp_path: Path) -> None:
    """A flipped byte in a table's b-tree page: `db check` once printed no report (the library
    failed to open first); now it prints SQLite's own integrity report and the way out, exits
    1, and queries fail with one line naming the damaged file, no traceback (issue 18)."""
    import shutil
    import sqlite3

    from tests.piaa_processes import PiaaProcesses

    images = _scenes(tmp_path, "a", 24, seed=7)
    lib = PiaaProcesses(tmp_path / "home", None)
    lib.run("index", str(images))
    lib.run("vocab", "set", *LABELS)
    found = {label: json.loads(lib.run("search", label, "--json")) for label in LABELS}
    label = max(LABELS, key=lambda name: len(found[name]))
    first = str(sorted(images.iterdir())[0])
    queries = (["search", label], ["tags", first], ["search", "--text", "a star"])
    before = [lib.run(*args) for args in queries]
    db = tmp_path / "home" / "piaa.sqlite3"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        roots = dict(conn.execute("SELECT name, rootpage FROM sqlite_master WHERE type='table'"))
    good = tmp_path / "good.sqlite3"
    shutil.copyfile(db, good)
    # The page-type byte of the images table's root page, the cell count of the classifiers',
    # a byte of the schema's text (once a UnicodeDecodeError traceback).
    schema = good.read_bytes().index(b"CREATE TABLE images") + 30
    offsets = {
        "images": (roots["images"] - 1) * page,
        "classifiers": (roots["classifiers"] - 1) * page + 3,
        "schema": schema,
    }
    for table, offset in offsets.items():
        shutil.copyfile(good, db)
        for suffix in ("-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        data = bytearray(db.read_bytes())
        data[offset] ^= 0xFF
        db.write_bytes(bytes(data))

        report = _piaa(lib, "db", "check")
        assert report.returncode == 1 and "Traceback" not in report.stderr, report.stderr
        assert "database: DAMAGED" in report.stdout, (table, report.stdout, report.stderr)
        assert "way out: restore the database file from a backup" in report.stdout
        assert ".recover" in report.stdout
        as_json = _piaa(lib, "db", "check", "--json")
        assert as_json.returncode == 1
        database = json.loads(as_json.stdout)["database"]
        assert database["ok"] is False and database["problems"] and database["way_out"]
        failed = 0
        for args, want in zip(queries, before, strict=True):
            result = _piaa(lib, *args)
            assert "Traceback" not in result.stderr, (table, args, result.stderr[-300:])
            if result.returncode == 0:  # the damaged page was not read: the same answer
                assert result.stdout == want, (table, args)
                continue
            failed += 1
            assert result.returncode == 1, (table, args, result.stderr)
            (line,) = result.stderr.strip().splitlines()
            assert line.startswith("Error: the database "), (table, line)
            assert "is damaged" in line and "piaa db check" in line, (table, line)
        assert failed, table
    shutil.copyfile(good, db)  # the way out: the backup
    assert lib.check()["ok"] is True


def test_db_check_verifies_the_text_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`db check` reads `text/patches.faiss` too (the issue found it never did): a flipped byte
    there is reported, and the index is built again from the shards, with the same answer."""
    from piaa_index.vectors import text_search as ts
    from tools import scale

    monkeypatch.setattr(ts, "EXACT_BELOW", 0)  # the ANN path, with its patch index
    world = scale.World.make(8, seed=2)
    lib = scale.open_library(tmp_path / "home", world)
    scale.add_images(lib, world, 600, group=300)
    lib.update_indexes()  # as `index` does at its end
    want = lib.text_search("l000", limit=20)
    patches = lib.vectors_dir / "text" / "patches.faiss"
    _flip(patches, 0.7)
    damaged = patches.read_bytes()
    report = lib.check()
    assert report["ok"] is False
    (item,) = report["derived_damaged"]
    assert item["index"] == "text" and item["files"] == ["patches.faiss"]
    assert patches.read_bytes() != damaged  # removed, then built again
    lib.close()
    again = scale.open_library(tmp_path / "home", world)
    try:
        assert again.text_search("l000", limit=20) == want
        assert patches.exists() and again.check()["ok"] is True
    finally:
        again.close()


def test_a_damaged_classifier_blob_is_found_and_fitted_again(tmp_path: Path) -> None:
    """A flipped byte inside the classifier's stored weights (a blob SQLite does not check):
    `tags` once died with a BadZipFile traceback and `db check` passed. Now `tags` answers from
    the sound score matrix, a query that needs the classifier says the data is damaged in one
    line, `db check` names the classifier, removes it and exits 1, and
    the next query fits the vocabulary again, with the answers from before."""
    import shutil
    import sqlite3

    from tests.piaa_processes import PiaaProcesses

    images = _scenes(tmp_path, "a", 24, seed=5)
    lib = PiaaProcesses(tmp_path / "home", None)
    lib.run("index", str(images))
    lib.run("vocab", "set", *LABELS)
    picked = sorted(images.iterdir())[:3]
    before = _answers(lib, picked)
    db = tmp_path / "home" / "piaa.sqlite3"
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("VACUUM")  # no stale copy of the blob left in free pages
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (weights,) = conn.execute("SELECT weights FROM classifiers").fetchone()
    data = bytearray(db.read_bytes())
    # A byte of the zipped classifier array's data, past its zip and npy headers (the blob
    # spans overflow pages: find a stretch of it that lies in one page).
    stretches = [bytes(weights[k : k + 64]) for k in range(1024, len(weights) - 64, 256)]
    at = next(data.index(x) for x in stretches if data.count(x) == 1)
    data[at + 32] ^= 0xFF
    shutil.copyfile(db, tmp_path / "before.sqlite3")
    db.write_bytes(bytes(data))

    # A fresh `tags` reads only the score matrix, which is sound: the same answer as before.
    result = _piaa(lib, "tags", str(picked[0]), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == before[str(picked[0])]
    # What needs the classifier itself (an evidence map: its patch probabilities) says the
    # data is damaged, in one line. (`status` answers read-only without the weights.)
    result = _piaa(lib, "tags", str(picked[0]), "--evidence", LABELS[0])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: stored data is damaged") and "piaa db check" in line
    result = _piaa(lib, "db", "check", "--json")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert report["database"]["ok"] is True  # SQLite's own check cannot see it
    assert "cannot be read" in report["classifier"]["problem"]
    assert _answers(lib, picked) == before
    assert lib.check()["ok"] is True
