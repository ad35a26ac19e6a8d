"""A client generated from the running server's `/openapi.json` by openapi-python-client (what a
DAM integrator does, issue 22) drives the API over real HTTP: a search with its typed query
parameters paged through `next_cursor`, typed errors, a fit job polled to completion, and the
change feed, on a real indexed library (the shipped shapesworld model)."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    sys.version_info < (3, 11), reason="openapi-python-client 0.29 needs Python 3.11"
)

KEY = "piaa_test-generated-client-key"
PACKAGE = "piaa_generated_client"
# openapi-python-client has no model for image/* bodies: it reads them as bytes (`File`).
CONFIG = """content_type_overrides:
  image/jpeg: application/octet-stream
  image/png: application/octet-stream
"""


@pytest.fixture(scope="module")
def server(shapes_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`create_app` on a copy of the shared 48-image ShapesWorld library (a fit job and a
    vocabulary change write to it), served by uvicorn on 127.0.0.1:PORT in a thread."""
    import uvicorn
    from piaa_index_plugins.http_api.app import create_app
    from piaa_index_plugins.http_api.state import ServerConfig

    from tests.shapes_library import open_shapes_library

    home = tmp_path_factory.mktemp("client") / "index"
    shutil.copytree(shapes_home, home)
    library = open_shapes_library(home)
    app = create_app(library, ServerConfig(session_key=KEY))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not uv.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert uv.started, "uvicorn did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(30)
        sock.close()
        library.close()


@pytest.fixture(scope="module")
def api(server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    """The client package generated from the server's /openapi.json, imported."""
    import httpx

    base = tmp_path_factory.mktemp("generated")
    spec = base / "openapi.json"
    spec.write_text(httpx.get(server + "/openapi.json", timeout=30).text, encoding="utf-8")
    config = base / "config.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    # The generator runs `ruff` on what it writes: the venv's, beside this Python.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        [
            sys.executable, "-m", "openapi_python_client", "generate", "--path", str(spec),
            "--output-path", str(base / PACKAGE), "--meta", "none", "--config", str(config),
        ],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Warning" not in output and "WARNING" not in output, output  # nothing left out
    sys.path.insert(0, str(base))
    try:
        yield importlib.import_module(PACKAGE)
    finally:
        sys.path.remove(str(base))
        for name in [n for n in sys.modules if n == PACKAGE or n.startswith(PACKAGE + ".")]:
            del sys.modules[name]


def module(api: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{PACKAGE}.{name}")


@pytest.fixture(scope="module")
def client(api: ModuleType, server: str) -> Iterator[Any]:
    with api.AuthenticatedClient(base_url=server, token=KEY, timeout=120) as c:
        yield c


def is_utc(moment: Any) -> bool:
    return isinstance(moment, datetime) and moment.utcoffset() == timedelta(0)


def test_generated_operations_are_named_and_typed(api: ModuleType, client: Any) -> None:
    queries = module(api, "api.queries")
    models = module(api, "models")
    for name in ("search", "tags", "similar", "list_queries"):
        assert hasattr(importlib.import_module(f"{queries.__name__}.{name}"), "sync")
    for name in ("Image", "ImageWithTags", "Tag", "Job", "JobBrief", "QueryResult", "Error"):
        assert hasattr(models, name), name
    get_status = module(api, "api.meta.get_status")
    status = get_status.sync(client=client)
    assert isinstance(status, models.Status)
    assert status.images.indexed == 48 and is_utc(status.classifier.fitted_at)


def test_search_pages_through_next_cursor(api: ModuleType, client: Any) -> None:
    search = module(api, "api.queries.search")
    models = module(api, "models")
    vocabulary = module(api, "api.vocabulary.get_vocabulary").sync(client=client)
    label = vocabulary.labels[0]
    # Every image, ranked (matches first), 10 a page: 5 pages over the 48 images.
    whole = search.sync(client=client, expression=label, all_images=True, limit=0)
    assert isinstance(whole, models.QueryResult) and whole.next_cursor is None
    assert len(whole.results) == 48
    seen: list[int] = []
    cursor: Any = None
    pages = 0
    while True:
        kwargs = {} if cursor is None else {"cursor": cursor}
        page = search.sync(client=client, expression=label, all_images=True, limit=10, **kwargs)
        assert isinstance(page, models.QueryResult), page
        assert len(page.results) <= 10
        seen += [row.id for row in page.results]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 5
    assert seen == [row.id for row in whole.results]  # the same ranking, no row twice
    first = page.results[0] if page.results else whole.results[0]
    assert isinstance(first.path, str) and first.content_hash
    assert set(first.additional_properties) >= {"match", "labels"}  # the query's own fields
    # The open-vocabulary text search pages too; a cursor is tied to its parameters.
    top = search.sync(client=client, text="a red circle", limit=6)
    one = search.sync(client=client, text="a red circle", limit=3)
    two = search.sync(client=client, text="a red circle", limit=3, cursor=one.next_cursor)
    assert [r.id for r in one.results + two.results] == [r.id for r in top.results]
    other = search.sync(client=client, text="a blue square", limit=3, cursor=one.next_cursor)
    assert isinstance(other, models.Error) and "cursor" in other.error.message


def test_errors_are_typed(api: ModuleType, client: Any, server: str) -> None:
    models = module(api, "models")
    get_image = module(api, "api.images.get_image")
    missing = get_image.sync_detailed(999_999, client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Error)
    assert missing.parsed.error.code == "not_found"
    image = get_image.sync(1, client=client)
    assert isinstance(image, models.ImageWithTags) and is_utc(image.indexed_at)
    assert image.tags and isinstance(image.tags[0], models.Tag)
    search = module(api, "api.queries.search")
    bad = search.sync_detailed(client=client, expression="no_such_label_here")
    assert bad.status_code == 400 and bad.parsed.error.code == "bad_request"
    with api.Client(base_url=server) as anonymous:
        denied = search.sync_detailed(client=anonymous, expression="x")
    assert denied.status_code == 401 and denied.parsed.error.code == "unauthorized"


def feed(api: ModuleType, client: Any, since: int | None = None) -> tuple[dict[int, Any], int]:
    """A DAM's sync: every page of the change feed; (image id -> image, version)."""
    list_tags = module(api, "api.images.list_tags")
    images: dict[int, Any] = {}
    cursor: Any = None
    while True:
        kwargs: dict[str, Any] = {"limit": 20}
        if cursor is not None:
            kwargs["cursor"] = cursor
        elif since is not None:
            kwargs["since"] = since
        page = list_tags.sync(client=client, **kwargs)
        assert isinstance(page, module(api, "models").TagFeed), page
        for image in page.images:
            assert image.id not in images and is_utc(image.indexed_at)
            images[image.id] = image
        cursor = page.next_cursor
        if cursor is None:
            return images, page.version


def test_fit_job_and_the_change_feed(api: ModuleType, client: Any) -> None:
    models = module(api, "models")
    everything, version = feed(api, client)
    assert len(everything) == 48
    mirror = {i: {t.label for t in im.tags} for i, im in everything.items()}
    assert feed(api, client, since=version) == ({}, version)
    # Drop three labels, then fit: the images whose present labels changed come in the feed.
    vocabulary = module(api, "api.vocabulary.get_vocabulary").sync(client=client)
    body = models.VocabularyBody(labels=vocabulary.labels[3:])
    changed = module(api, "api.vocabulary.set_vocabulary").sync(client=client, body=body)
    assert isinstance(changed, models.Vocabulary) and changed.stale
    started_at = datetime.now(timezone.utc)
    job = module(api, "api.jobs.start_fit_job").sync(client=client)
    assert isinstance(job, models.JobBrief) and job.kind == models.JobBriefKind.FIT
    get_job = module(api, "api.jobs.get_job")
    deadline = time.monotonic() + 120
    while True:
        state = get_job.sync(job.id, client=client)
        assert isinstance(state, models.Job), state
        if state.state in (models.JobState.DONE, models.JobState.FAILED):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.1)
    assert state.state == models.JobState.DONE, state.error
    assert is_utc(state.created_at) and is_utc(state.started_at) and is_utc(state.finished_at)
    assert started_at - timedelta(seconds=5) <= state.created_at <= state.finished_at
    assert state.progress.stage
    updates, new_version = feed(api, client, since=version)
    assert new_version > version and updates
    for i, image in updates.items():
        mirror[i] = {t.label for t in image.tags}
    fresh, _ = feed(api, client)
    assert mirror == {i: {t.label for t in im.tags} for i, im in fresh.items()}
    assert not set().union(*mirror.values()) & set(vocabulary.labels[:3])


def truth_by_path(shapes_home: Path) -> dict[str, set[str]]:
    """The generated scenes' true classes, by resolved image path (the user's keywords)."""
    import json

    data = shapes_home.parent / "library"
    classes = json.loads((data / "classes.json").read_text())
    out = {}
    for line in (data / "labels.txt").read_text().splitlines():
        rel, *ids = line.split()
        out[str((data / rel).resolve())] = {classes[int(i)] for i in ids}
    return out


def test_labels_then_a_fit_job_that_says_what_it_learnt(
    api: ModuleType, client: Any, shapes_home: Path
) -> None:
    """Your labels through the generated client: a bulk by path, one confirmation and one
    rejection by id, the paged listing; then a fit job whose result says, label by label,
    whether the learnt or the training-free score is used and why."""
    models = module(api, "models")
    names = module(api, "api.vocabulary.get_vocabulary").sync(client=client).labels
    images = module(api, "api.images.list_images").sync(client=client, limit=100).images
    truth = truth_by_path(shapes_home)
    rows = [
        models.LabelRow(image=im.path, label=name, present=name in truth[im.path])
        for im in images
        for name in names
    ]
    body = models.LabelsBody(labels=rows)
    written = module(api, "api.labels.set_labels").sync(client=client, body=body)
    assert isinstance(written, models.LabelsWritten), written
    assert written.written == len(images) * len(names) and written.images == len(images)
    assert written.labels_changed is True
    missing = models.LabelsBody(labels=[models.LabelRow(image=999_999, label="x", present=True)])
    unknown = module(api, "api.labels.set_labels").sync_detailed(client=client, body=missing)
    assert unknown.status_code == 404 and isinstance(unknown.parsed, models.Error)
    assert "999999" in unknown.parsed.error.message
    # One image confirmed and rejected from the "gallery", then read back, typed.
    image = images[0]
    set_label = module(api, "api.labels.set_image_label")
    yes = models.LabelBody(present=True, source=models.LabelBodySource.GALLERY)
    answer = set_label.sync(image.id, "a label of mine", client=client, body=yes)
    assert isinstance(answer, models.ImageLabels), answer
    no = models.LabelBody(present=False)
    answer = set_label.sync(image.id, names[0], client=client, body=no)
    mine = module(api, "api.labels.get_image_labels").sync(image.id, client=client)
    assert isinstance(mine, models.ImageLabels) and mine.labels_changed is True
    by_label = {row.label: row for row in mine.labels}
    assert by_label["a label of mine"].present and by_label["a label of mine"].source == "gallery"
    assert by_label[names[0]].present is False and by_label[names[0]].source == "api"
    assert all(isinstance(row, models.UserLabel) and is_utc(row.updated_at) for row in mine.labels)
    forgotten = module(api, "api.labels.forget_image_label").sync(
        image.id, "a label of mine", client=client
    )
    assert "a label of mine" not in {row.label for row in forgotten.labels}
    # The export, page by page.
    list_labels = module(api, "api.labels.list_labels")
    listed: list[Any] = []
    cursor: Any = None
    while True:
        kwargs = {"limit": 300} if cursor is None else {"limit": 300, "cursor": cursor}
        page = list_labels.sync(client=client, **kwargs)
        assert isinstance(page, models.LabelPage), page
        listed += page.labels
        cursor = page.next_cursor
        if cursor is None:
            break
    assert len(listed) == len(images) * len(names)
    assert {(row.path, row.label) for row in listed} == {
        (im.path, name) for im in images for name in names
    }
    get_status = module(api, "api.meta.get_status")
    assert get_status.sync(client=client).labels_changed is True
    # The fit job learns from them, and says what it learnt.
    job = module(api, "api.jobs.start_fit_job").sync(client=client)
    get_job = module(api, "api.jobs.get_job")
    deadline = time.monotonic() + 300
    while True:
        state = get_job.sync(job.id, client=client)
        if state.state in (models.JobState.DONE, models.JobState.FAILED):
            break
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state.state == models.JobState.DONE, state.error
    result = state.result.to_dict()
    learning = result["learning"]
    assert learning["images"] == len(images)
    assert set(learning["labels"]) == set(names)
    for name, rec in learning["labels"].items():
        assert rec["used"] in ("learnt", "training-free") and rec["why"], (name, rec)
        assert (name in learning["learnt"]) == (rec["used"] == "learnt")
    for name in learning["learnt"]:
        assert result["labels"][name]["source"] == "learnt"
        assert result["labels"][name]["learning"] == learning["labels"][name]
    assert get_status.sync(client=client).labels_changed is False


def test_teach_a_concept_through_the_generated_client(api: ModuleType, client: Any) -> None:
    """`teach_concept`: a typed TeachJob (202), polled as a fit job to the end; typed errors."""
    models = module(api, "models")
    teach = module(api, "api.labels.teach_concept")
    images = module(api, "api.images.list_images").sync(client=client, limit=100).images
    body = models.TeachBody(
        name="my thing", examples=[im.id for im in images[:4]], not_=[images[-1].path]
    )
    job = teach.sync(client=client, body=body)
    assert isinstance(job, models.TeachJob), job
    assert job.kind == models.JobKind.FIT and job.label == "my thing" and job.examples == 4
    assert job.counter_examples == 1 and job.added_to_vocabulary is True
    get_job = module(api, "api.jobs.get_job")
    deadline = time.monotonic() + 300
    while (state := get_job.sync(job.id, client=client)).state not in (
        models.JobState.DONE,
        models.JobState.FAILED,
    ):
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state.state == models.JobState.DONE, state.error
    assert "my thing" in state.result.to_dict()["labels"]
    assert "my thing" in module(api, "api.vocabulary.get_vocabulary").sync(client=client).labels
    missing = models.TeachBody(name="x", examples=[999_999])
    unknown = teach.sync_detailed(client=client, body=missing)
    assert unknown.status_code == 404 and isinstance(unknown.parsed, models.Error)
    assert "999999" in unknown.parsed.error.message
    both = models.TeachBody(name="x", examples=[images[0].id], not_=[images[0].id])
    refused = teach.sync_detailed(client=client, body=both)
    assert refused.status_code == 422 and isinstance(refused.parsed, models.Error)
