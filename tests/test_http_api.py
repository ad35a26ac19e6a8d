"""The HTTP API (`piaa serve`) through FastAPI's TestClient on real libraries: the tiny model
with real PNGs for queries and jobs, a synthetic library (thousands of images) for paging and
the change feed, stubs only for the error mapping. Attacks: tests/test_http_security.py."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from piaa_index_plugins.http_api.app import create_app
from piaa_index_plugins.http_api.auth import create_key
from piaa_index_plugins.http_api.state import ServerConfig

from piaa_index import __version__
from piaa_index.cli import cli
from piaa_index.library.core import Library, LibraryError
from piaa_index.vectors.shards import LockedError, VectorStoreError
from tests.image_files import shapes_image
from tools import scale

LABELS = ["a", "b", "c"]
SESSION = "piaa_test-session-key"
BASE = "http://127.0.0.1:8765"


def write_pngs(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{seed}_{i:02d}.png"
        shapes_image(rng, (80, 72)).save(path)
        paths.append(path.resolve())
    return paths


def client_for(library: Any, **config: Any) -> TestClient:
    cfg = ServerConfig(session_key=SESSION, **config)
    return TestClient(
        create_app(library, cfg),
        base_url=BASE,
        headers={"Authorization": f"Bearer {SESSION}"},
        raise_server_exceptions=False,
    )


@dataclass
class Api:
    client: TestClient
    library: Library
    photos: list[Path]

    def wait(self, job: dict[str, Any]) -> dict[str, Any]:
        state = self.client.app.state.piaa  # type: ignore[attr-defined]
        done = state.jobs.wait(job["id"], timeout=300)
        assert done is not None and done["state"] in ("done", "failed"), done
        return self.client.get(f"/api/jobs/{job['id']}").json()

    def fit(self) -> dict[str, Any]:
        response = self.client.post("/api/jobs/fit")
        assert response.status_code == 202
        return self.wait(response.json())


@pytest.fixture(scope="module")
def api(tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """The app on a library (tiny model, pretrained none) with 8 indexed PNGs, fitted on a-c."""
    base = tmp_path_factory.mktemp("http")
    photos = write_pngs(base / "photos", 8, seed=1)
    home = base / "home"
    library = Library.open(
        home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=str(tiny_model_config),
        pretrained="none", device="cpu",
    )  # fmt: skip
    library.index([photos[0].parent])
    with client_for(library) as client:
        out = Api(client, library, photos)
        assert client.put("/api/vocabulary", json={"labels": LABELS}).status_code == 200
        assert out.fit()["state"] == "done"
        yield out
    library.close()


# -- basics --------------------------------------------------------------------------------------


def test_health_needs_no_key(api: Api) -> None:
    response = api.client.get("/api/health", headers={"Authorization": ""})
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "version": __version__}


def test_status(api: Api) -> None:
    body = api.client.get("/api/status").json()
    assert body["images"]["indexed"] == len(api.photos)
    assert body["model"]["pretrained"] == "none"
    assert body["labels_changed"] is False  # no labels of yours yet (tests/test_http_labels.py)


def test_openapi_is_valid_openapi_3(api: Api) -> None:
    from openapi_spec_validator import validate

    spec = api.client.get("/openapi.json").json()
    validate(spec)
    assert spec["openapi"].startswith("3.")
    for path in ("/api/tags", "/api/images/{image_id}", "/api/jobs/index", "/api/queries/search"):
        assert path in spec["paths"]
    operations = [op for item in spec["paths"].values() for op in item.values()]
    ids = [op["operationId"] for op in operations]
    assert len(ids) == len(set(ids))
    assert {"list_tags", "search", "tags", "similar", "get_image", "start_fit_job"} <= set(ids)
    labels = {"get_image_labels", "set_image_label", "forget_image_label", "set_labels"}
    assert labels | {"list_labels", "complete_labels"} <= set(ids)
    assert not [i for i in ids if i.endswith(("_get", "_post", "_put"))]  # no FastAPI auto names
    # Every 4xx/5xx is the real error body; no FastAPI validation body anywhere.
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for op in operations:
        for status, answer in op["responses"].items():
            if status[0] in "45":
                schema = answer["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/Error"}, (op["operationId"], status)
    # A registered query's parameters, typed, from its Params.
    search = spec["paths"]["/api/queries/search"]["get"]
    params = {p["name"]: p for p in search["parameters"]}
    assert set(params) == {"expression", "text", "all_images", "limit", "cursor"}
    assert params["limit"]["schema"] == {"type": "integer", "default": 20}
    assert params["all_images"]["schema"] == {"type": "boolean", "default": False}
    tags = {p["name"]: p for p in spec["paths"]["/api/queries/tags"]["get"]["parameters"]}
    assert tags["image"]["required"] is True
    assert spec["paths"]["/api/images/{image_id}"]["get"]["responses"]["200"]["content"][
        "application/json"
    ]["schema"] == {"$ref": "#/components/schemas/ImageWithTags"}
    assert {"401", "404", "422"} <= set(spec["paths"]["/api/images/{image_id}"]["get"]["responses"])
    assert {"401", "403", "429"} <= set(spec["paths"]["/api/jobs/fit"]["post"]["responses"])


def test_docs_are_served_offline(api: Api) -> None:
    """/docs and /redoc load Swagger UI and ReDoc from this server, never from a CDN."""
    import re

    for page in ("/docs", "/redoc"):
        response = api.client.get(page, headers={"Authorization": ""})
        assert response.status_code == 200 and "/openapi.json" in response.text
        urls = re.findall(r'(?:src|href)="([^"]+)"', response.text)
        assert urls and all(u.startswith("/") for u in urls), urls
        for url in urls:
            if url != "/openapi.json":
                assert api.client.get(url).status_code == 200, url


def test_gallery_is_served_at_the_root(api: Api) -> None:
    response = api.client.get("/")
    assert response.status_code == 200 and "gallery" in response.text
    assert response.headers["content-type"].startswith("text/html")


# -- keys ----------------------------------------------------------------------------------------


def test_keys_scopes_and_revocation(api: Api) -> None:
    store = api.library.store
    read_id, read_key = create_key(store, "read", "dam")
    _, write_key = create_key(store, "write")
    c = api.client
    anonymous = {"Authorization": ""}
    assert c.get("/api/status", headers=anonymous).status_code == 401
    assert c.get("/api/status", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert c.get("/api/status", headers={"Authorization": f"Bearer {read_key}"}).status_code == 200
    assert c.get("/api/status", headers={"X-API-Key": read_key, **anonymous}).status_code == 200
    # Writes: 401 without a key, 403 with a read key, fine with a write key.
    body = {"labels": LABELS}
    assert c.put("/api/vocabulary", json=body, headers=anonymous).status_code == 401
    response = c.put("/api/vocabulary", json=body, headers={"X-API-Key": read_key, **anonymous})
    assert response.status_code == 403 and response.json()["error"]["code"] == "forbidden"
    assert c.post("/api/jobs/fit", headers=anonymous).status_code == 401
    assert (
        c.get("/api/vocabulary", headers={"X-API-Key": write_key, **anonymous}).status_code == 200
    )
    assert store.revoke_api_key(read_id)
    assert c.get("/api/status", headers={"X-API-Key": read_key, **anonymous}).status_code == 401
    assert "key_hash" not in str(store.api_keys()) and read_key not in str(store.api_keys())


def test_public_read(api: Api) -> None:
    with client_for(api.library, public_read=True) as c:
        assert c.get("/api/status", headers={"Authorization": ""}).status_code == 200
        assert c.post("/api/jobs/fit", headers={"Authorization": ""}).status_code == 401


# -- vocabulary and queries ----------------------------------------------------------------------


def test_vocabulary_get_and_bad_puts(api: Api) -> None:
    c = api.client
    body = c.get("/api/vocabulary").json()
    assert body["labels"] == LABELS and body["templates"] and body["stale"] is False
    assert c.put("/api/vocabulary", json={"labels": "a"}).status_code == 422
    response = c.put("/api/vocabulary", json={"labels": ["a"], "colour": 1})
    assert response.status_code == 422 and "colour" in response.json()["error"]["message"]
    response = c.put("/api/vocabulary", json={"labels": ["a", "AND"]})
    assert response.status_code == 400 and "operator" in response.json()["error"]["message"]
    response = c.put("/api/vocabulary", json={"labels": [f"l{i}" for i in range(5000)]})
    assert response.status_code == 400 and "at most" in response.json()["error"]["message"]
    response = c.put("/api/vocabulary", json={"labels": ["x" * 201]})
    assert response.status_code == 400
    assert c.get("/api/vocabulary").json()["labels"] == LABELS  # unchanged by the failures


def test_label_completion(api: Api) -> None:
    body = api.client.get("/api/labels?prefix=B").json()
    assert [row["label"] for row in body["labels"]] == ["b"]
    assert all(isinstance(row["count"], int) for row in body["labels"])
    assert len(api.client.get("/api/labels?limit=2").json()["labels"]) == 2


def test_queries_listing(api: Api) -> None:
    by_name = {q["name"]: q for q in api.client.get("/api/queries").json()}
    assert {"tags", "search", "similar"} <= set(by_name)
    params = {p["name"]: p for p in by_name["search"]["params"]}
    assert params["limit"] == {**params["limit"], "type": "int", "required": False, "default": 20}
    assert params["all_images"]["type"] == "bool"


def test_search_rows_carry_id_and_content_hash(api: Api) -> None:
    response = api.client.get("/api/queries/search?expression=a%20AND%20b&limit=3&all_images=1")
    body = response.json()
    assert response.status_code == 200 and body["query"] == "search"
    assert len(body["results"]) == 3
    refs = api.library.store.image_refs([str(p) for p in api.photos])
    for row in body["results"]:
        assert Path(row["path"]) in api.photos
        assert (row["id"], row["content_hash"]) == refs[row["path"]]
        assert len(row["content_hash"]) >= 32 and set(row["labels"]) == {"a", "b"}


def test_query_pages_by_cursor(api: Api) -> None:
    c = api.client
    url = "/api/queries/search?expression=a%20OR%20b&all_images=1"
    whole = c.get(url + "&limit=0").json()
    assert whole["next_cursor"] is None and len(whole["results"]) == len(api.photos)
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        body = c.get(url + "&limit=3" + (f"&cursor={cursor}" if cursor else "")).json()
        rows += body["results"]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert rows == whole["results"]
    first = c.get(url + "&limit=3").json()["next_cursor"]
    # A cursor belongs to its query and parameters; a forged one is a 400.
    other = c.get(f"/api/queries/search?expression=a&limit=3&cursor={first}")
    assert other.status_code == 400 and "cursor" in other.json()["error"]["message"]
    assert c.get(url + "&limit=3&cursor=garbage").status_code == 400
    assert c.get(url + f"&limit=0&cursor={first}").status_code == 400
    # A query without paging (no limit parameter of its own) takes no cursor.
    image_id = api.library.image_id(str(api.photos[0]))
    response = c.get(f"/api/queries/tags?image={image_id}&cursor={first}")
    assert response.status_code == 400 and "cursor" in response.json()["error"]["message"]
    # The library changed since the first page: the cursor has expired (409).
    # (A stand-in for an index or re-tag committed between the pages: the feed version moves.)
    store = api.library.store
    version = store.feed_version()
    store.feed_version = lambda: version + 1  # type: ignore[method-assign]
    try:
        response = c.get(url + f"&limit=3&cursor={first}")
    finally:
        del store.feed_version
    assert response.status_code == 409 and response.json()["error"]["code"] == "cursor_expired"


def test_times_are_rfc3339_utc(api: Api) -> None:
    from datetime import datetime, timedelta

    def utc(text: str) -> datetime:
        assert text.endswith("Z"), text
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        assert moment.utcoffset() == timedelta(0)
        return moment

    image_id = api.library.image_id(str(api.photos[0]))
    utc(api.client.get(f"/api/images/{image_id}").json()["indexed_at"])
    utc(api.client.get("/api/images?limit=1").json()["images"][0]["indexed_at"])
    utc(api.client.get("/api/tags?limit=1").json()["images"][0]["indexed_at"])
    utc(api.client.get("/api/status").json()["classifier"]["fitted_at"])
    job = api.client.get("/api/jobs").json()[0]
    assert utc(job["created_at"]) <= utc(job["started_at"]) <= utc(job["finished_at"])


def test_query_errors(api: Api) -> None:
    c = api.client
    cases = [
        ("/api/queries/search?expression=a%20AND%20zebra", 400, "zebra"),
        ("/api/queries/nope", 404, "nope"),
        ("/api/queries/search?expression=a&limit=many", 400, "limit"),
        ("/api/queries/search?expression=a&limit=-5", 400, "limit"),
        ("/api/queries/search?expression=a&colour=red", 400, "colour"),
        ("/api/queries/tags", 400, "image"),
    ]
    for url, status, word in cases:
        response = c.get(url)
        assert response.status_code == status, url
        assert word in response.json()["error"]["message"], url


def test_tags_and_similar_by_id_or_indexed_path(api: Api) -> None:
    c = api.client
    image = str(api.photos[0])
    image_id = api.library.image_id(image)
    by_path = c.get("/api/queries/tags?" + urlencode({"image": image})).json()["results"]
    by_id = c.get(f"/api/queries/tags?image={image_id}").json()["results"]
    assert by_path == by_id and {r["label"] for r in by_id} == set(LABELS)
    assert all(r["id"] == image_id and r["path"] == image for r in by_id)
    similar = c.get(f"/api/queries/similar?image={image_id}&limit=2").json()["results"]
    assert len(similar) == 2 and image_id not in {r["id"] for r in similar}


def test_concurrent_reads_are_all_answered_alike(api: Api) -> None:
    """Many client threads at once: every answer is complete and the same."""
    url = "/api/queries/search?expression=a%20OR%20c&all_images=true&limit=5"
    expected = api.client.get(url).json()
    results: list[Any] = []

    def worker() -> None:
        results.append(api.client.get(url).json())

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 8


def test_no_client_path_is_opened(api: Api, tmp_path: Path) -> None:
    """`similar` and `tags` take indexed images only: an existing file that is not indexed and
    a missing one get the same answer, so the API tells nothing about the server's files."""
    outside = write_pngs(tmp_path, 1, seed=9)[0]
    answers = []
    for path in (str(outside), "/etc/hostname", "/root/.bashrc", "/no/such/file.png"):
        for query in ("similar", "tags"):
            response = api.client.get(f"/api/queries/{query}?" + urlencode({"image": path}))
            assert response.status_code == 400
            message = response.json()["error"]["message"]
            assert "not an indexed image" in message
            answers.append(message.replace(path, "P"))
    assert len(set(answers)) == 1


# -- images --------------------------------------------------------------------------------------


def test_image_by_id(api: Api) -> None:
    image = str(api.photos[1])
    image_id = api.library.image_id(image)
    body = api.client.get(f"/api/images/{image_id}").json()
    assert body["id"] == image_id and body["path"] == image
    assert body["width"] == 80 and body["height"] == 72 and body["size"] > 0
    assert body["content_hash"] and body["indexed_at"]
    cli_rows = [
        {"id": image_id, "content_hash": body["content_hash"], **row}
        for row in api.library.tags(image)
    ]
    assert [
        {k: v for k, v in r.items() if k not in ("id", "content_hash")} for r in body["tags"]
    ] == [{k: v for k, v in r.items() if k not in ("id", "content_hash")} for r in cli_rows]
    assert api.client.get("/api/images/999999").status_code == 404
    assert api.client.get("/api/images/abc").status_code == 422


def test_images_paging(api: Api) -> None:
    seen: list[int] = []
    cursor = None
    pages = 0
    while True:
        query = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = api.client.get("/api/images?" + urlencode(query)).json()
        seen += [im["id"] for im in body["images"]]
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == api.client.get("/api/status").json()["images"]["indexed"]
    assert pages >= 3 and seen == sorted(seen)
    response = api.client.get("/api/images?cursor=garbage")
    assert response.status_code == 400 and "cursor" in response.json()["error"]["message"]
    assert api.client.get("/api/images?limit=0").status_code == 422
    # Newest first (the gallery's landing page): the same images, highest id first, paged.
    newest: list[int] = []
    cursor = None
    while True:
        query = {"limit": 3, "order": "newest", **({"cursor": cursor} if cursor else {})}
        body = api.client.get("/api/images?" + urlencode(query)).json()
        assert all(set(im) >= {"id", "path", "content_hash", "indexed_at"} for im in body["images"])
        newest += [im["id"] for im in body["images"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert newest == sorted(seen, reverse=True)
    first = api.client.get("/api/images?limit=3").json()["next_cursor"]
    response = api.client.get(f"/api/images?order=newest&cursor={first}")  # another kind's
    assert response.status_code == 400
    assert api.client.get("/api/images?order=random").status_code == 422


# -- jobs ----------------------------------------------------------------------------------------


def test_index_job_and_bad_paths(api: Api) -> None:
    c = api.client
    new = write_pngs(api.photos[0].parent, 2, seed=2)
    response = c.post("/api/jobs/index", json={"paths": [str(api.photos[0].parent)]})
    assert response.status_code == 202
    job = response.json()
    assert set(job) == {"id", "kind", "state"} and job["kind"] == "index"
    done = api.wait(job)
    assert done["state"] == "done", done
    assert (done["result"]["indexed"], done["result"]["unchanged"]) == (2, 8)
    assert done["progress"]["done"] == done["progress"]["total"] > 0
    api.photos.extend(new)
    assert c.get("/api/status").json()["images"]["indexed"] == 10
    # The job tagged the new images with the current classifier: their tags are served.
    new_id = api.library.image_id(new[0])
    assert len(c.get(f"/api/images/{new_id}").json()["tags"]) == len(LABELS)
    assert any(j["id"] == job["id"] for j in c.get("/api/jobs").json())
    folder = str(api.photos[0].parent)
    for body, status in [
        ({"paths": ["/no/such/folder"]}, 400),
        ({"paths": ["relative/folder"]}, 400),
        ({"paths": []}, 400),
        ({"paths": [folder], "prune": "yes"}, 422),
        ({"paths": folder}, 422),
        ({"paths": [folder], "colour": 1}, 422),
    ]:
        assert c.post("/api/jobs/index", json=body).status_code == status, body
    assert c.get("/api/jobs/12345").status_code == 404


def test_index_roots(api: Api, tmp_path: Path) -> None:
    with client_for(api.library, index_roots=(str(tmp_path),)) as c:
        response = c.post("/api/jobs/index", json={"paths": [str(api.photos[0].parent)]})
        assert response.status_code == 403


def test_fifo_is_refused(api: Api, tmp_path: Path) -> None:
    import os

    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert api.client.post("/api/jobs/index", json={"paths": [str(fifo)]}).status_code == 400


class _GatedEncoder:
    """The real encoder, whose image encoding waits for the test to open the gate: a job that
    runs as long as the test needs."""

    def __init__(self, real: Any, gate: threading.Event):
        self._real, self._gate = real, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def encode_images(self, batch: Any) -> Any:
        assert self._gate.wait(120)
        return self._real.encode_images(batch)


def _gated_opener(library: Library, gate: threading.Event) -> Callable[[], Library]:
    """Job libraries on `library`'s database whose encoder waits for `gate`."""
    from piaa_index.model.encoder import Encoder

    def open_job_library() -> Library:
        return Library.open(
            home=library.settings.home, db=library.settings.db_url, device="cpu",
            encoder_factory=lambda spec: _GatedEncoder(Encoder(spec, device="cpu"), gate),
        )  # fmt: skip

    return open_job_library


def test_reads_are_answered_while_a_job_runs(api: Api, tmp_path: Path) -> None:
    gate = threading.Event()
    library = api.library
    open_job_library = _gated_opener(library, gate)

    folder = tmp_path / "more"
    write_pngs(folder, 3, seed=3)
    app = create_app(library, ServerConfig(session_key=SESSION), open_job_library)
    auth = {"Authorization": f"Bearer {SESSION}"}
    with TestClient(app, base_url=BASE, headers=auth) as c:
        job = c.post("/api/jobs/index", json={"paths": [str(folder)]}).json()
        state = app.state.piaa
        try:
            for _ in range(500):
                if state.jobs.get(job["id"])["state"] == "running":
                    break
                threading.Event().wait(0.02)
            assert c.get(f"/api/jobs/{job['id']}").json()["state"] == "running"
            assert c.get("/api/status").status_code == 200
            assert c.get("/api/queries/search?expression=a").status_code == 200
            assert c.get("/api/tags?limit=5").status_code == 200
            second = c.post("/api/jobs/fit").json()
            assert c.get(f"/api/jobs/{second['id']}").json()["state"] == "queued"
        finally:
            gate.set()
        assert state.jobs.wait(job["id"], 120)["state"] == "done"
        assert state.jobs.wait(second["id"], 120)["state"] == "done"


def test_stopping_the_server_cancels_a_running_job(api: Api, tmp_path: Path) -> None:
    gate = threading.Event()
    library = api.library
    open_job_library = _gated_opener(library, gate)

    folder = tmp_path / "more"
    write_pngs(folder, 40, seed=4)
    app = create_app(library, ServerConfig(session_key=SESSION), open_job_library)
    jobs = app.state.piaa.jobs
    with TestClient(app, base_url=BASE, headers={"Authorization": f"Bearer {SESSION}"}) as c:
        job = c.post("/api/jobs/index", json={"paths": [str(folder)]}).json()
        queued = c.post("/api/jobs/fit").json()
        for _ in range(500):
            if jobs.get(job["id"])["state"] == "running":
                break
            threading.Event().wait(0.02)
        closing = threading.Thread(target=jobs.close)
        closing.start()  # what the app's shutdown does
        gate.set()
        closing.join(60)
    assert jobs.get(job["id"])["state"] == "failed"
    assert "cancelled" in jobs.get(job["id"])["error"]
    assert jobs.get(queued["id"])["error"] == "the server stopped before the job ran"
    # The library is left consistent: the next run indexes (or keeps) every file.
    report = library.index([folder])
    assert report.indexed + report.unchanged == 40 and report.failed == []


def test_stale_vocabulary_needs_a_fit_job(api: Api) -> None:
    c = api.client
    assert c.put("/api/vocabulary", json={"labels": ["a", "b"]}).json()["stale"] is True
    response = c.get("/api/queries/search?expression=a")
    assert response.status_code == 409 and response.json()["error"]["code"] == "needs_fit"
    assert api.fit()["state"] == "done"
    assert c.get("/api/queries/search?expression=a").status_code == 200
    assert c.put("/api/vocabulary", json={"labels": LABELS}).status_code == 200
    assert api.fit()["state"] == "done"


# -- the change feed on a synthetic library (thousands of images) ---------------------------------

N_LABELS = 12
N_IMAGES = 3000


@pytest.fixture(scope="module")
def world() -> scale.World:
    return scale.World.make(N_LABELS, seed=1)


@pytest.fixture(scope="module")
def synthetic(
    tmp_path_factory: pytest.TempPathFactory, world: scale.World
) -> Iterator[tuple[Library, TestClient]]:
    """A fitted synthetic library; the read-only test comes first, the re-tag test last."""
    library = scale.open_library(tmp_path_factory.mktemp("feed") / "home", world)
    scale.add_images(library, world, N_IMAGES)
    library.set_vocabulary(scale.label_names(N_LABELS))
    library.fit()
    with client_for(library) as client:
        yield library, client
    library.close()


def sync(client: TestClient, since: int | None, limit: int = 500) -> dict[str, Any]:
    """What a DAM sync loop does: page through /api/tags; (images by id, removed, version)."""
    images: dict[int, Any] = {}
    removed: list[int] = []
    cursor = None
    version = None
    while True:
        query: dict[str, Any] = {"limit": limit}
        if cursor:
            query["cursor"] = cursor
        elif since is not None:
            query["since"] = since
        response = client.get("/api/tags?" + urlencode(query))
        assert response.status_code == 200, response.text
        body = response.json()
        version = body["version"] if version is None else version
        assert body["version"] == version  # one window for the whole listing
        for im in body["images"]:
            assert im["id"] not in images
            images[im["id"]] = im
        removed += body["removed"]
        cursor = body["next_cursor"]
        if cursor is None:
            return {"images": images, "removed": removed, "version": version}


def present_sets(library: Library) -> dict[int, set[str]]:
    by_path = library.present_tags()
    refs = library.store.image_refs(list(by_path))
    return {refs[p][0]: {name for name, _ in tags} for p, tags in by_path.items()}


def test_bulk_tags_match_the_library(synthetic: tuple[Library, TestClient]) -> None:
    library, client = synthetic
    full = sync(client, None, limit=700)
    assert len(full["images"]) == N_IMAGES and full["removed"] == []
    truth = present_sets(library)
    assert {i: {t["label"] for t in im["tags"]} for i, im in full["images"].items()} == truth
    row = next(iter(full["images"].values()))
    assert {"id", "path", "content_hash", "tags"} <= set(row)
    # since=0 lists every image too; since=now lists nothing.
    assert set(sync(client, 0)["images"]) == set(full["images"])
    assert sync(client, full["version"]) == {
        "images": {},
        "removed": [],
        "version": full["version"],
    }


def test_dam_sync_loop_picks_up_a_retag_exactly(synthetic: tuple[Library, TestClient]) -> None:
    library, client = synthetic
    mirror = {i: {t["label"] for t in im["tags"]} for i, im in sync(client, None)["images"].items()}
    version = sync(client, None)["version"]
    before = present_sets(library)
    # A vocabulary change and its fit job: some images' present labels change.
    labels = scale.label_names(N_LABELS)
    assert client.put("/api/vocabulary", json={"labels": labels[:-3]}).status_code == 200
    job = client.post("/api/jobs/fit").json()
    assert client.app.state.piaa.jobs.wait(job["id"], 300)["state"] == "done"  # type: ignore[attr-defined]
    after = present_sets(library)
    changed = {i for i in after if after[i] != before.get(i, set())}
    assert 0 < len(changed) < N_IMAGES
    feed = sync(client, version)
    assert set(feed["images"]) == changed  # exactly the images whose present labels changed
    assert feed["version"] > version
    for i, im in feed["images"].items():
        mirror[i] = {t["label"] for t in im["tags"]}
    assert mirror == after
    # Removals reach the mirror too.
    gone = sorted(after)[:250]
    library.store.remove_images(gone)
    feed2 = sync(client, feed["version"])
    assert sorted(feed2["removed"]) == gone and feed2["images"] == {}


@pytest.mark.slow
@pytest.mark.postgres
def test_dam_sync_loop_on_postgres(
    postgres_database: Any, tmp_path: Path, world: scale.World
) -> None:
    library = scale.open_library(tmp_path / "home", world, postgres_database())
    try:
        scale.add_images(library, world, 1500)
        library.set_vocabulary(scale.label_names(N_LABELS))
        library.fit()
        with client_for(library) as client:
            first = sync(client, None)
            assert len(first["images"]) == 1500
            before = present_sets(library)
            library.set_vocabulary(scale.label_names(N_LABELS)[:-3])
            library.fit()
            after = present_sets(library)
            changed = {i for i in after if after[i] != before.get(i, set())}
            assert changed and set(sync(client, first["version"])["images"]) == changed
    finally:
        library.close()


# -- error mapping on stub libraries (no model needed) -------------------------------------------


class FailingLibrary:
    """status() raises what it was given."""

    def __init__(self, exc: Exception):
        self.exc = exc
        self.tagger = SimpleNamespace(auto_fit=True)
        self.reopen = lambda: self

    def status(self) -> dict:
        raise self.exc


@pytest.mark.parametrize(
    ("exc", "code", "message"),
    [
        (LibraryError("the model is gone"), 500, "the model is gone"),
        (VectorStoreError("shard 3 is unreadable"), 500, "shard 3 is unreadable"),
        (RuntimeError("secret internals"), 500, "internal error (RuntimeError)"),
        (LockedError("another piaa process is indexing"), 409, "another piaa process"),
    ],
)
def test_error_mapping(exc: Exception, code: int, message: str) -> None:
    with client_for(FailingLibrary(exc), public_read=True) as c:
        response = c.get("/api/status")
    body = response.json()
    assert response.status_code == code and message in body["error"]["message"]
    assert response.headers["content-type"].startswith("application/json")
    assert "Traceback" not in response.text and "secret" not in response.text


def test_framework_errors_are_json(api: Api) -> None:
    c = api.client
    for method, url, status in [
        ("GET", "/api/nope", 404),
        ("DELETE", "/api/vocabulary", 405),
        ("POST", "/api/health", 405),
        ("OPTIONS", "/api/status", 405),
        ("GET", "/api/images/-1", 422),
    ]:
        response = c.request(method, url)
        assert response.status_code == status, (method, url)
        assert response.headers["content-type"].startswith("application/json")
        assert set(response.json()["error"]) == {"code", "message"}
    response = c.delete("/api/vocabulary")
    assert "PUT" in response.headers["allow"] and "PUT" in response.json()["error"]["message"]


# -- the commands --------------------------------------------------------------------------------


def piaa(args: list[str], monkeypatch: pytest.MonkeyPatch, capsys: Any) -> tuple[int, str, str]:
    """Run `main()` as the `piaa` script does: (exit code, stdout, stderr)."""
    import sys

    from piaa_index.cli import main

    monkeypatch.setattr(sys, "argv", ["piaa", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


def test_keys_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    home = ["--home", str(tmp_path / "h")]
    code, out, err = piaa(
        [*home, "keys", "create", "--scope", "read", "--name", "dam"], monkeypatch, capsys
    )
    assert code == 0, err
    token = out.strip()
    assert token.startswith("piaa_") and len(token) > 40 and "shown only now" in err
    code, out, _ = piaa([*home, "keys", "list", "--json"], monkeypatch, capsys)
    assert code == 0 and '"dam"' in out and '"read"' in out and token not in out
    assert piaa([*home, "keys", "revoke", "1"], monkeypatch, capsys)[0] == 0
    code, _, err = piaa([*home, "keys", "revoke", "1"], monkeypatch, capsys)
    assert code == 2 and "no live key" in err and "Traceback" not in err
    assert piaa([*home, "keys", "create", "--scope", "admin"], monkeypatch, capsys)[0] == 2


def test_serve_refuses_a_public_address_without_a_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    code, _, err = piaa(
        ["--home", str(tmp_path / "h"), "serve", "--host", "0.0.0.0"], monkeypatch, capsys
    )
    assert code == 2 and "keys create" in err and "Traceback" not in err


def test_serve_help() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    for option in ("--host", "--port", "--allow-host", "--cors-origin", "--public-read"):
        assert option in result.output
