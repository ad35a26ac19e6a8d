"""The Ray engine on a real two-node Ray cluster started by the test (`ray start --head` plus a
second node, one CPU each, on this machine), with the shipped ShapesWorld model: the same
images, vectors and tags as the local engine; a killed worker or driver loses nothing.

`make test-ray` runs them (marked slow + ray); without Ray installed they skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from piaa_index.library.core import Library
from piaa_index.shapes.dataset import generate_dataset
from piaa_index.shapes.world import CLASSES
from tests.image_files import make_photo_folder

RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
LABELS = CLASSES[:8]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants(pids: list[int]) -> set[int]:
    """Every process below `pids` (Ray's workers and actors sit in process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out: set[int] = set()
    todo = list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _stop(procs: list[subprocess.Popen]) -> None:
    """Stop the `ray start --block` processes we started and every process below them."""
    below = _descendants([p.pid for p in procs])
    for proc in reversed(procs):
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    time.sleep(2)
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict]:
    """A head node and a second node on this machine: 2 CPUs, 2 nodes. Yields its address,
    the environment drivers need, and the node processes' group ids."""
    pytest.importorskip("ray")
    ray_bin = Path(sys.executable).with_name("ray")
    env = dict(os.environ, **RAY_ENV)
    temp = tempfile.mkdtemp(prefix="piaa-ray-", dir="/tmp")  # short: Ray's socket paths
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--num-cpus=1", "--object-store-memory=300000000"]
    logs = Path(temp) / "logs-piaa"
    logs.mkdir()
    procs = []
    try:
        head = [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            "--include-dashboard=false",
            f"--temp-dir={temp}",
            *common,
        ]
        procs.append(_start(head, env, logs / "head.log"))
        _wait_nodes(address, env, 1)
        procs.append(
            _start([str(ray_bin), "start", f"--address={address}", *common], env, logs / "node.log")
        )
        _wait_nodes(address, env, 2)
        old = {k: os.environ.get(k) for k in RAY_ENV}
        os.environ.update(RAY_ENV)
        try:
            yield {"address": address, "env": env, "groups": [p.pid for p in procs]}
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    finally:
        _stop(procs)


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    with open(log, "wb") as fh:
        return subprocess.Popen(
            cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_nodes(address: str, env: dict, n: int) -> None:
    code = (
        "import ray,sys; ray.init(address=sys.argv[1], logging_level='ERROR');"
        "print(sum(1 for x in ray.nodes() if x['Alive']))"
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", code, address], env=env, capture_output=True, text=True
        )
        if out.returncode == 0 and out.stdout.strip() and int(out.stdout.split()[-1]) >= n:
            return
        time.sleep(2)
    raise RuntimeError(f"Ray cluster at {address} did not reach {n} nodes")


def open_library(home: Path) -> Library:
    return Library.open(
        home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model="shapesworld", device="cpu"
    )


def stored(lib: Library) -> dict[str, tuple]:
    """path -> (width, height, [CLS], patches) of every indexed image."""
    locations = lib.store.live_locations()
    paths = lib.store.paths([loc[0] for loc in locations])
    out = {}
    for chunk in lib.vectors.iter_live(locations):
        for k, image_id in enumerate(chunk.image_ids):
            row = lib.store.image_by_path(paths[int(image_id)])
            assert row is not None
            out[row.path] = (row.width, row.height, chunk.cls[k], chunk.patches[k])
    return out


def counts(report) -> tuple:  # type: ignore[no-untyped-def]
    d = report.as_dict()
    return d["indexed"], d["reused"], d["unchanged"], sorted(f["path"] for f in d["failed"])


@pytest.mark.slow
@pytest.mark.ray
def test_ray_engine_gives_the_local_engine_s_images_vectors_and_tags(
    ray_cluster: dict, tmp_path: Path
) -> None:
    photos = make_photo_folder(tmp_path / "photos", n=60)
    address = ray_cluster["address"]
    local, remote = open_library(tmp_path / "local"), open_library(tmp_path / "ray")
    with local, remote:
        first_local = local.index([photos.root])
        # Commit groups of 16: several shards, written by workers on both nodes.
        first_ray = remote.index([photos.root], engine="ray", address=address, commit_every=16)
        assert counts(first_ray) == counts(first_local)
        assert first_ray.indexed == photos.n_good and len(first_ray.failed) == len(photos.broken)

        a, b = stored(local), stored(remote)
        assert sorted(a) == sorted(b) == sorted(str(p) for p in photos.good)
        for path, (w, h, cls, patches) in a.items():
            w2, h2, cls2, patches2 = b[path]
            assert (w, h) == (w2, h2)  # EXIF-rotated and HEIC sizes too
            np.testing.assert_allclose(cls2, cls, atol=2e-3)  # fp16 storage tolerance
            np.testing.assert_allclose(patches2, patches, atol=2e-3)

        # Incremental and hash reuse decide the same way: a copy reuses, the rest is unchanged.
        copy = photos.root / "copy-of-first.jpg"
        jpeg = next(p for p in photos.good if p.suffix == ".jpg")
        copy.write_bytes(jpeg.read_bytes())
        again_local = local.index([photos.root])
        again_ray = remote.index([photos.root], engine="ray", address=address)
        assert counts(again_ray) == counts(again_local)
        assert again_ray.reused == 1 and again_ray.unchanged == photos.n_good

        # Re-tag after a vocabulary change: the scoring pass as Ray tasks, the same tags.
        for lib in (local, remote):
            lib.set_vocabulary(LABELS)
        local.fit()
        fit_ray = remote.fit(engine="ray", address=address)
        assert fit_ray.n_images == photos.n_good + 1
        tags_local, tags_ray = local.present_tags(), remote.present_tags()
        assert sorted(tags_ray) == sorted(tags_local)
        for path, tags in tags_local.items():
            assert [t for t, _ in tags_ray[path]] == [t for t, _ in tags]
            np.testing.assert_allclose(
                [s for _, s in tags_ray[path]], [s for _, s in tags], atol=2e-3
            )


@pytest.mark.slow
@pytest.mark.ray
def test_ray_retag_matches_the_local_scoring_pass_exactly(
    ray_cluster: dict, tmp_path: Path
) -> None:
    """Same library, same classifier input: the Ray scoring pass writes the same scores."""
    sw = generate_dataset(tmp_path / "sw", 120, seed=5, size=96, progress=False)
    lib = open_library(tmp_path / "home")
    with lib:
        lib.index([sw / "images"])
        lib.set_vocabulary(LABELS)
        local = lib.fit()
        tags_local = lib.present_tags()
        lib.set_vocabulary(list(reversed(LABELS)))
        lib.set_vocabulary(LABELS)
        remote = lib.fit(engine="ray", address=ray_cluster["address"])
        assert remote.thresholds == local.thresholds
        assert remote.tagged_present == local.tagged_present
        assert lib.present_tags() == tags_local
        assert sum(local.tagged_present.values()) > 0


@pytest.mark.slow
@pytest.mark.ray
def test_same_photos_give_the_same_search_results_on_either_engine(
    ray_cluster: dict, tmp_path: Path
) -> None:
    """Issue 19: the Ray engine trains the library's 4-bit patch quantiser on the same first
    commit group as the local engine, so the stored patches, the fit and `car OR sun` agree
    exactly (before: "car" on 45 vs 14 of 600 images)."""
    sw = generate_dataset(tmp_path / "sw", 640, seed=2469, size=96, progress=False)
    local, remote = open_library(tmp_path / "local"), open_library(tmp_path / "ray")
    with local, remote:
        # Five commit groups of 128 images, each enough to train the quantiser on: before, the
        # Ray group written first trained it, not always the local engine's first group.
        local.index([sw / "images"], commit_every=128)
        remote.index(
            [sw / "images"], engine="ray", address=ray_cluster["address"], commit_every=128
        )
        quantizers = [
            sorted(p.name for p in lib.vectors.root.glob("patch-quantizer.*.faiss"))
            for lib in (local, remote)
        ]
        assert quantizers[0] == quantizers[1] and len(quantizers[0]) == 1
        for lib in (local, remote):
            lib.set_vocabulary(["car", "house", "sun", "mug"])
        local.fit()
        remote.fit(engine="ray", address=ray_cluster["address"])
        rows = [
            [(Path(r["path"]).name, r["score"]) for r in lib.search("car OR sun", limit=None)]
            for lib in (local, remote)
        ]
        assert rows[0] == rows[1] and len(rows[0]) > 20


# -- crashes ------------------------------------------------------------------------------------


def _driver(
    home: Path, images: Path, cluster: dict, commit_every: int = 8, batch_size: int = 32
) -> subprocess.Popen:
    env = {k: v for k, v in cluster["env"].items() if not k.startswith("PIAA_")}
    env.update(PIAA_HOME=str(home), PIAA_MODEL="shapesworld", PIAA_DEVICE="cpu")
    cmd = [sys.executable, "-m", "piaa_index", "index", str(images), "--engine", "ray"]
    cmd += ["--address", cluster["address"], "--commit-every", str(commit_every), "--json"]
    cmd += ["--batch-size", str(batch_size)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _indexed(home: Path) -> int:
    db = home / "piaa.sqlite3"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return int(
                conn.execute("SELECT count(*) FROM images WHERE status='indexed'").fetchone()[0]
            )
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for_commits(home: Path, driver: subprocess.Popen, at_least: int) -> int:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None:
        n = _indexed(home)
        if n >= at_least:
            return n
        time.sleep(0.3)
    raise AssertionError(
        f"no commit seen; driver: {driver.poll()} {driver.stderr and driver.stderr.read()}"
    )


def _cluster_workers(cluster: dict, name: str) -> list[int]:
    """Pids of this cluster's worker processes titled `ray::NAME…` (children of our raylets)."""
    ours = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in cluster["groups"]:
                    ours.add(int(entry.name))
            except OSError:
                continue
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmd.startswith(f"ray::{name}") and ppid in ours:
            found.append(int(entry.name))
    return found


def assert_complete(home: Path, images: list[Path]) -> None:
    """0 lost, 0 duplicated, 0 orphaned shards, read from the files themselves (no Library
    open: its reconcile would hide orphans)."""
    from piaa_index.catalog.store import Store
    from piaa_index.vectors.shards import VectorStore

    store = Store.open(f"sqlite:///{home / 'piaa.sqlite3'}")
    try:
        with sqlite3.connect(home / "piaa.sqlite3") as conn:
            rows = conn.execute("SELECT path, status, id, shard, shard_row FROM images").fetchall()
        assert sorted(r[0] for r in rows) == sorted(str(p) for p in images)  # one row each
        assert {r[1] for r in rows} == {"indexed"}  # 0 lost
        root = home / "vectors" / store.store_id
        vectors = VectorStore(root, json.loads((root / "manifest.json").read_text())["identity"])
        referenced = store.referenced_shards()
        assert vectors.shard_ids() == referenced  # 0 orphaned
        assert not list(root.glob("*.tmp"))
        ids = []
        for shard in sorted(referenced):
            assert vectors.verify_shard(shard) is None
            ids.extend(int(i) for i in vectors.read_shard(shard, with_patches=False).image_ids)
        assert sorted(ids) == sorted(r[2] for r in rows)  # 0 duplicated, not even dead rows
        for _path, _status, image_id, shard, row in rows:
            got = vectors.read_shard(shard, [row], with_patches=False).image_ids[0]
            assert int(got) == image_id
    finally:
        store.close()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = generate_dataset(tmp_path_factory.mktemp("scenes"), 240, seed=7, size=96, progress=False)
    return sorted((out / "images").iterdir())


@pytest.mark.slow
@pytest.mark.ray
def test_a_worker_killed_mid_run_loses_and_duplicates_nothing(
    ray_cluster: dict, scenes: list[Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    # Small encoder batches keep the encoder actors busy while the first shards commit (on an
    # idle machine, batches of 32 encoded all 240 scenes before the first commit was seen).
    driver = _driver(home, scenes[0].parent, ray_cluster, batch_size=2)
    killed: list[int] = []
    done_before = 0
    deadline = time.monotonic() + 300
    while not killed and time.monotonic() < deadline and driver.poll() is None:
        actors = _cluster_workers(ray_cluster, "MapWorker")  # the encoder actors
        done_before = _indexed(home)
        if actors and done_before >= 8:  # encoding still going, and shards committed
            killed = actors
        time.sleep(0.1)
    assert killed, f"no encoder actor found while the run went on ({done_before} committed)"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    assert done_before < len(scenes)  # the kill came mid-run
    out, err = driver.communicate(timeout=600)
    if driver.returncode != 0:  # the run may fail; the rerun must finish the job
        rerun = _driver(home, scenes[0].parent, ray_cluster)
        out, err = rerun.communicate(timeout=600)
        assert rerun.returncode == 0, err
    assert "Traceback" not in err
    assert_complete(home, scenes)


@pytest.mark.slow
@pytest.mark.ray
def test_a_killed_driver_is_resumed_by_the_next_run(
    ray_cluster: dict, scenes: list[Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    driver = _driver(home, scenes[0].parent, ray_cluster)
    _wait_for_commits(home, driver, 16)
    driver.kill()
    driver.communicate()
    committed = _indexed(home)
    assert 0 < committed < len(scenes)
    time.sleep(3)  # Ray ends the dead job's workers
    rerun = _driver(home, scenes[0].parent, ray_cluster)
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err
    report = json.loads(out)
    # Resumed: only what was not committed is encoded again.
    assert report["unchanged"] == committed
    assert report["indexed"] == len(scenes) - committed
    assert_complete(home, scenes)


@pytest.mark.slow
@pytest.mark.ray
def test_a_node_local_home_is_refused_on_a_cluster_of_two_nodes(
    ray_cluster: dict, tmp_path: Path
) -> None:
    from piaa_index.engines.ray_engine import fs_type

    if not Path("/dev/shm").is_dir() or fs_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    photos = make_photo_folder(tmp_path / "photos", n=6)
    home = Path(tempfile.mkdtemp(prefix="piaa-home-", dir="/dev/shm"))
    try:
        env = {k: v for k, v in ray_cluster["env"].items() if not k.startswith("PIAA_")}
        env.update(PIAA_HOME=str(home), PIAA_MODEL="shapesworld", PIAA_DEVICE="cpu")
        cmd = [sys.executable, "-m", "piaa_index", "index", str(photos.root), "--engine", "ray"]
        run = subprocess.run(
            cmd + ["--address", ray_cluster["address"]], env=env, capture_output=True, text=True
        )
        assert run.returncode == 2
        assert "is on tmpfs" in run.stderr and "shared file system" in run.stderr
        assert "Traceback" not in run.stderr
    finally:
        import shutil

        shutil.rmtree(home, ignore_errors=True)


def test_without_ray_the_engine_names_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from piaa_index.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    photos = make_photo_folder(tmp_path / "photos", n=6)
    args = ["--home", str(tmp_path / "home"), "--model", "shapesworld", "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", ["piaa", *args, "index", str(photos.root), "--engine", "ray"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert err.strip().splitlines() == [
        "Error: the Ray engine needs Ray: pip install 'piaa-index[ray]'"
    ]


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.postgres
def test_ray_engine_with_metadata_on_postgres(
    ray_cluster: dict, postgres_database, tmp_path: Path
) -> None:
    """The cluster layout the issue asks for: metadata on Postgres, vectors on shared storage."""
    photos = make_photo_folder(tmp_path / "photos", n=30)
    local = open_library(tmp_path / "local")
    remote = Library.open(
        home=tmp_path / "ray", db=postgres_database(), model="shapesworld", device="cpu"
    )
    with local, remote:
        report_local = local.index([photos.root])
        report_ray = remote.index(
            [photos.root], engine="ray", address=ray_cluster["address"], commit_every=8
        )
        assert counts(report_ray) == counts(report_local)
        a, b = stored(local), stored(remote)
        assert sorted(a) == sorted(b)
        for path, (w, h, cls, patches) in a.items():
            assert b[path][:2] == (w, h)
            np.testing.assert_allclose(b[path][2], cls, atol=2e-3)
            np.testing.assert_allclose(b[path][3], patches, atol=2e-3)


def test_a_failure_on_the_cluster_is_one_line_naming_the_worker_s_error() -> None:
    """Ray wraps a worker's exception (RayTaskError, UserCodeException); the user sees the
    worker's own message, never Ray's traceback."""
    from piaa_index.engines.ray_engine import RayRunError, one_line_failures
    from piaa_index.errors import PiaaError
    from piaa_index.vectors.shards import VectorStoreError

    def wrapped(inner: BaseException) -> RuntimeError:
        try:
            try:
                raise inner
            except BaseException as exc:
                raise RuntimeError(
                    "ray::Map(_prepare)() (pid=1, ip=10.0.0.2)\n  Traceback…"
                ) from exc
        except RuntimeError as outer:
            return outer

    with pytest.raises(RayRunError) as got:
        with one_line_failures("indexing", "; run again"):
            raise wrapped(MemoryError("out of memory on node 2\nmore"))
    assert str(got.value) == (
        "indexing stopped on the Ray cluster (MemoryError: out of memory on node 2); run again"
    )
    with pytest.raises(PiaaError, match="^a Ray worker loads model X$"):
        with one_line_failures("indexing"):
            raise wrapped(VectorStoreError("a Ray worker loads model X"))
