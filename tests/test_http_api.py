"""`piaa serve`: the HTTP API plugin, exercised over real sockets with urllib on a real library
(tiny model) and, for the error mapping, on stub libraries."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from click.testing import CliRunner
from piaa_index_plugins.http_api import make_server

from piaa_index import __version__
from piaa_index.cli import cli
from piaa_index.library import Library, LibraryError
from piaa_index.vectors import LockedError, VectorStoreError
from tests.image_files import shapes_image

LABELS = ["a", "b", "c"]


@dataclass
class Api:
    """A running server: its base URL, the library behind it and the indexed photo folder."""

    base: str
    library: Any
    photos: list[Path]

    def call(
        self, method: str, path: str, body: Any = None, raw: bytes | None = None
    ) -> tuple[int, Any]:
        """(status, decoded JSON body) of one request; HTTP errors are returned, not raised."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                status, payload = response.status, response.read()
                assert response.headers["Content-Type"].startswith("application/json")
        except urllib.error.HTTPError as exc:
            status, payload = exc.code, exc.read()
        return status, json.loads(payload.decode("utf-8"))

    def get(self, path: str) -> tuple[int, Any]:
        return self.call("GET", path)


@contextmanager
def serve(library: Any) -> Iterator[str]:
    """Run make_server(library) on a free port in a background thread; yield its base URL."""
    server = make_server(library, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def write_pngs(folder: Path, n: int, seed: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = folder / f"img_{seed}_{i:02d}.png"
        shapes_image(rng, (80, 72)).save(path)
        paths.append(path.resolve())
    return paths


@pytest.fixture(scope="module")
def api(tiny_model_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """A server on a library (tiny model, pretrained none) with 8 indexed PNGs."""
    base = tmp_path_factory.mktemp("http")
    photos = write_pngs(base / "photos", 8, seed=1)
    home = base / "home"
    library = Library.open(
        home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=str(tiny_model_config),
        pretrained="none", device="cpu",
    )  # fmt: skip
    library.index([photos[0].parent])
    try:
        with serve(library) as url:
            yield Api(url, library, photos)
    finally:
        library.close()


# -- the real library --------------------------------------------------------------------------


def test_health(api: Api) -> None:
    assert api.get("/health") == (200, {"status": "ok", "version": __version__})


def test_status(api: Api) -> None:
    status, body = api.get("/status")
    assert status == 200
    assert body["images"]["indexed"] == len(api.photos)
    assert body["model"]["pretrained"] == "none"


def test_vocabulary_put_and_get(api: Api) -> None:
    status, body = api.call("PUT", "/vocabulary", {"labels": LABELS})
    assert status == 200 and body["labels"] == LABELS and body["templates"]
    assert api.get("/vocabulary") == (200, body)
    # Bad bodies are the client's fault.
    assert api.call("PUT", "/vocabulary", {"labels": "a"})[0] == 400
    assert api.call("PUT", "/vocabulary", {"labels": ["a"], "colour": 1})[0] == 400
    status, err = api.call("PUT", "/vocabulary", {"labels": ["a", "AND"]})
    assert status == 400 and "operator" in err["error"]
    assert api.get("/vocabulary")[1]["labels"] == LABELS  # unchanged by the failures


def test_queries_listing(api: Api) -> None:
    status, body = api.get("/queries")
    assert status == 200
    by_name = {q["name"]: q for q in body}
    assert {"tags", "search", "similar"} <= set(by_name)
    params = {p["name"]: p for p in by_name["search"]["params"]}
    assert params["limit"] == {**params["limit"], "type": "int", "required": False, "default": 20}
    assert params["all_images"]["type"] == "bool"
    assert {p["name"]: p["required"] for p in by_name["tags"]["params"]}["image"] is True


def test_search_query(api: Api) -> None:
    api.call("PUT", "/vocabulary", {"labels": LABELS})
    status, body = api.get("/queries/search?expression=a%20AND%20b&limit=3")
    assert status == 200 and body["query"] == "search"
    assert len(body["results"]) <= 3
    # all_images=1 ranks every image, so there are rows whatever the random tiny model says.
    status, body = api.get("/queries/search?expression=a%20AND%20b&limit=3&all_images=1")
    assert status == 200 and len(body["results"]) == 3
    for row in body["results"]:
        assert Path(row["path"]) in api.photos and isinstance(row["score"], float)
        assert set(row["labels"]) == {"a", "b"}


def test_query_errors(api: Api) -> None:
    api.call("PUT", "/vocabulary", {"labels": LABELS})
    status, body = api.get("/queries/search?expression=" + quote("a AND zebra"))
    assert status == 400 and "zebra" in body["error"]
    status, body = api.get("/queries/nope")
    assert status == 404 and "nope" in body["error"]
    status, body = api.get("/queries/search?expression=a&limit=many")
    assert status == 400 and "limit" in body["error"]
    status, body = api.get("/queries/search?expression=a&colour=red")
    assert status == 400 and "colour" in body["error"]
    status, body = api.get("/queries/tags")
    assert status == 400 and "image" in body["error"]
    status, body = api.get("/queries/tags?" + urlencode({"image": "/no/such/file.png"}))
    assert status == 400 and "/no/such/file.png" in body["error"]
    assert "Traceback" not in json.dumps(body)


def test_tags_and_similar_queries(api: Api) -> None:
    api.call("PUT", "/vocabulary", {"labels": LABELS})
    image = str(api.photos[0])
    status, body = api.get("/queries/tags?" + urlencode({"image": image}))
    assert status == 200 and body["query"] == "tags"
    assert [r["label"] for r in body["results"]] == LABELS
    assert all(r["path"] == image and "present" in r for r in body["results"])
    status, body = api.get("/queries/tags?" + urlencode({"image": image, "limit": 1}))
    assert status == 200 and len(body["results"]) == 1
    status, body = api.get("/queries/similar?" + urlencode({"image": image, "limit": 2}))
    assert status == 200 and len(body["results"]) == 2
    assert image not in {r["path"] for r in body["results"]}


def test_concurrent_requests_are_serialised(api: Api) -> None:
    """Many client threads at once: every answer is complete and the same."""
    api.call("PUT", "/vocabulary", {"labels": LABELS})
    path = "/queries/search?expression=a%20OR%20c&all_images=true&limit=5"
    expected = api.get(path)
    results: list[tuple[int, Any]] = []

    def worker() -> None:
        results.append(api.get(path))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == [expected] * 8


def test_index_route(api: Api) -> None:
    new = write_pngs(api.photos[0].parent, 2, seed=2)
    status, body = api.call("POST", "/index", {"paths": [str(api.photos[0].parent)]})
    assert status == 200
    assert (body["indexed"], body["unchanged"], body["failed"]) == (2, 8, [])
    api.photos.extend(new)
    assert api.get("/status")[1]["images"]["indexed"] == 10
    status, body = api.call("POST", "/index", {"paths": ["/no/such/folder"]})
    assert status == 400 and "/no/such/folder" in body["error"]
    assert api.call("POST", "/index", {"paths": []})[0] == 400
    assert api.call("POST", "/index", {"paths": ["x"], "prune": "yes"})[0] == 400


def test_bad_json_and_routes(api: Api) -> None:
    status, body = api.call("POST", "/index", raw=b"{not json")
    assert status == 400 and "invalid JSON" in body["error"]
    assert api.call("PUT", "/vocabulary", raw=b"[1, 2]")[0] == 400
    assert api.call("PUT", "/vocabulary", raw=b"")[0] == 400
    assert api.get("/nope")[0] == 404
    status, body = api.call("DELETE", "/vocabulary")
    assert status == 405 and "PUT" in body["error"]
    assert api.call("POST", "/health", {"x": 1})[0] == 405


# -- error mapping on stub libraries (no model needed) -----------------------------------------


class FailingLibrary:
    """status() raises what it was given."""

    def __init__(self, exc: Exception):
        self.exc = exc

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
    with serve(FailingLibrary(exc)) as base:
        status, body = Api(base, None, []).get("/status")
    assert status == code and message in body["error"]
    assert "Traceback" not in body["error"] and "secret" not in body["error"]


# -- the command -------------------------------------------------------------------------------


def test_serve_help() -> None:
    result = CliRunner().invoke(cli, ["serve", "--help"])
    assert result.exit_code == 0, result.output
    assert "--host" in result.output and "--port" in result.output
    assert "127.0.0.1" in result.output and "8765" in result.output
