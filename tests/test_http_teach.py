"""`POST /api/teach` (issue 21): a concept taught from example images over HTTP, as `piaa teach`
does: 202 with the fit job it queued, which makes the label a tag; the errors (404 naming the
images, 422 with the error body, nothing stored), scopes and a full queue. On a copy of the
shared ShapesWorld library."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from fastapi.testclient import TestClient
from piaa_index_plugins.http_api.auth import create_key

from piaa_index.library.core import Library
from tests.shapes_library import open_shapes_library
from tests.test_http_api import client_for


class Lab:
    def __init__(self, library: Library, client: TestClient, truth: dict[str, set[str]]):
        self.library = library
        self.client = client
        self.truth = truth  # resolved path -> the ShapesWorld classes it shows
        ids = sorted(library.store.paths(list(range(1, 10_000))))
        self.paths = library.store.paths(ids)  # id -> stored path

    def holders(self, kind: str, present: bool = True) -> list[int]:
        return [
            i
            for i, p in sorted(self.paths.items())
            if (kind in self.truth[str(Path(p).resolve())]) == present
        ]

    def most_common(self) -> str:
        counts: dict[str, int] = {}
        for classes in self.truth.values():
            for c in classes:
                counts[c] = counts.get(c, 0) + 1
        return max(counts, key=lambda c: counts[c])

    def stored(self) -> tuple[list[Any], list[str]]:
        return self.library.store.user_labels(), self.library.labels()


@pytest.fixture(scope="module")
def lab(shapes_home: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    home = tmp_path_factory.mktemp("teach") / "index"
    shutil.copytree(shapes_home, home, ignore=shutil.ignore_patterns("thumbnails"))
    data = shapes_home.parent / "library"
    classes = json.loads((data / "classes.json").read_text())
    truth = {}
    for line in (data / "labels.txt").read_text().splitlines():
        rel, *ids = line.split()
        truth[str((data / rel).resolve())] = {classes[int(i)] for i in ids}
    library = open_shapes_library(home)
    with client_for(library) as client:
        yield Lab(library, client, truth)
    library.close()


def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


def test_teach_queues_a_fit_that_makes_the_concept_a_label(lab: Lab) -> None:
    c = lab.client
    kind = lab.most_common()
    examples, others = lab.holders(kind)[:5], lab.holders(kind, present=False)[:2]
    # Examples by id and by stored path alike.
    refs: list[int | str] = [examples[0], lab.paths[examples[1]], *examples[2:]]
    response = c.post("/api/teach", json={"name": "  my   thing ", "examples": refs,
                                          "not": others})  # fmt: skip
    assert response.status_code == 202, response.text
    body = response.json()
    assert set(body) == {"id", "kind", "state", "label", "examples", "counter_examples",
                         "added_to_vocabulary"}  # fmt: skip
    assert body["kind"] == "fit" and body["state"] in ("queued", "running", "done")
    assert body["label"] == "my thing" and body["examples"] == 5
    assert body["counter_examples"] == 2 and body["added_to_vocabulary"] is True
    # Stored before the answer: the examples as your labels, the label in the vocabulary.
    assert "my thing" in c.get("/api/vocabulary").json()["labels"]
    rows = c.get("/api/user-labels?" + urlencode({"label": "my thing"})).json()["labels"]
    assert sorted((r["image"], r["present"], r["source"]) for r in rows) == sorted(
        [(i, True, "teach") for i in examples] + [(i, False, "teach") for i in others]
    )

    state = c.app.state.piaa  # type: ignore[attr-defined]
    done = state.jobs.wait(body["id"], timeout=300)
    assert done is not None and done["state"] == "done", done
    job = c.get(f"/api/jobs/{body['id']}").json()
    assert job["result"]["labels"]["my thing"]["status"] in ("present", "weak")
    status = c.get("/api/status").json()
    assert "my thing" in status["vocabulary"]["labels"] and status["stale"] is False
    found = c.get("/api/queries/search?" + urlencode({"expression": '"my thing"', "limit": 48}))
    assert found.status_code == 200, found.text
    ranked = [r["id"] for r in found.json()["results"]]
    assert ranked, "the taught label tags some images"

    # Teaching it again (more examples) keeps one vocabulary entry.
    again = c.post("/api/teach", json={"name": "My Thing", "examples": lab.holders(kind)[5:8]})
    assert again.status_code == 202, again.text
    assert again.json()["added_to_vocabulary"] is False
    assert state.jobs.wait(again.json()["id"], timeout=300)["state"] == "done"
    assert [n for n in lab.library.labels() if n.lower() == "my thing"] == ["my thing"]


def test_teach_errors_store_nothing(lab: Lab) -> None:
    c = lab.client
    some = sorted(lab.paths)[:3]
    before = lab.stored()
    jobs_before = len(c.get("/api/jobs").json())

    err = error_of(c.post("/api/teach", json={"name": "x", "examples": [some[0], 999_999,
                                                                         "/no/such.png"]}), 404)  # fmt: skip
    assert err["code"] == "not_found"
    assert "999999" in err["message"] and "/no/such.png" in err["message"]
    err = error_of(c.post("/api/teach", json={"name": "x", "examples": [some[0]],
                                              "not": [888_888]}), 404)  # fmt: skip
    assert "888888" in err["message"]

    for payload, where in [
        ({"name": "", "examples": some}, "empty"),
        ({"name": "   ", "examples": some}, "empty"),
        ({"name": 'say "hi"', "examples": some}, "reserved"),
        ({"name": "AND", "examples": some}, "operator"),
        ({"name": "x" * 201, "examples": some}, "name"),
        ({"name": "x", "examples": []}, "example"),
        ({"name": "x"}, "examples"),
        ({"examples": some}, "name"),
        ({"name": "x", "examples": some, "not": [some[0]]}, "both"),
        ({"name": "x", "examples": some, "not": [lab.paths[some[1]]]}, "both"),
        ({"name": "x", "examples": [0]}, "examples"),
        ({"name": "x", "examples": [True]}, "examples"),
        ({"name": "x", "examples": some, "extra": 1}, "extra"),
    ]:
        err = error_of(c.post("/api/teach", json=payload), 422)
        assert err["code"] == "invalid_request" and where in err["message"], (payload, err)
    assert lab.stored() == before
    assert len(c.get("/api/jobs").json()) == jobs_before  # no fit queued


def test_teach_needs_a_write_key(lab: Lab) -> None:
    c = lab.client
    some = sorted(lab.paths)[:2]
    before = lab.stored()
    _, read_key = create_key(lab.library.store, "read", "dam")
    body = {"name": "x", "examples": some}
    read = c.post("/api/teach", json=body, headers={"Authorization": f"Bearer {read_key}"})
    assert error_of(read, 403)["code"] == "forbidden"
    anonymous = c.post("/api/teach", json=body, headers={"Authorization": ""})
    assert error_of(anonymous, 401)["code"] == "unauthorized"
    assert lab.stored() == before


def test_a_full_job_queue_is_429_before_anything_is_stored(
    lab: Lab, monkeypatch: pytest.MonkeyPatch
) -> None:
    c = lab.client
    state = c.app.state.piaa  # type: ignore[attr-defined]
    monkeypatch.setattr(state.jobs, "full", lambda: True)
    before = lab.stored()
    response = c.post("/api/teach", json={"name": "x", "examples": sorted(lab.paths)[:2]})
    assert error_of(response, 429)["code"] == "too_many_jobs"
    assert response.headers["Retry-After"] == "5"
    assert lab.stored() == before


def test_openapi_declares_teach_concept(lab: Lab) -> None:
    spec = lab.client.get("/openapi.json").json()
    op = spec["paths"]["/api/teach"]["post"]
    assert op["operationId"] == "teach_concept"
    assert set(op["responses"]) >= {"202", "401", "403", "404", "422", "429"}
    ok = op["responses"]["202"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/TeachJob"}
    ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    body = spec["components"]["schemas"][ref.rsplit("/", 1)[1]]
    assert set(body["properties"]) == {"name", "examples", "not"}
    assert body["required"] == ["name", "examples"]
