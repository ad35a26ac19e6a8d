"""Your own labels over HTTP (issue 21): confirm, reject and forget a label of one image, a bulk
of thousands (ids or paths, one store write, all or nothing), the paged listing, scopes, the
errors, and a fit job that learns from labels given over the API and says so. On a synthetic
library of 2,500 images whose true labels are known (tools/scale.py)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlencode

import numpy as np
import pytest
from fastapi.testclient import TestClient
from piaa_index_plugins.http_api.auth import create_key

from piaa_index.library.core import Library
from tests.test_http_api import client_for
from tools import scale

N_LABELS = 8
N_IMAGES = 2500
RFC3339_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


class Labelled:
    def __init__(self, library: Library, client: TestClient, truth: np.ndarray):
        self.library = library
        self.client = client
        self.truth = truth  # [N_IMAGES, N_LABELS] true labels, rows in image id order
        self.ids = sorted(library.store.paths(list(range(1, N_IMAGES + 1))))
        self.paths = library.store.paths(self.ids)

    def version(self) -> int:
        return self.library.store.user_labels_version()

    def fit(self) -> dict[str, Any]:
        response = self.client.post("/api/jobs/fit")
        assert response.status_code == 202, response.text
        state = self.client.app.state.piaa  # type: ignore[attr-defined]
        done = state.jobs.wait(response.json()["id"], timeout=300)
        assert done is not None and done["state"] == "done", done
        return self.client.get(f"/api/jobs/{done['id']}").json()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Labelled]:
    world = scale.World.make(N_LABELS, seed=3)
    library = scale.open_library(tmp_path_factory.mktemp("labels") / "home", world)
    truth = scale.add_images(library, world, N_IMAGES, seed=3)
    library.set_vocabulary(scale.label_names(N_LABELS))
    library.fit()
    with client_for(library) as client:
        yield Labelled(library, client, truth)
    library.close()


@pytest.fixture
def clean(lab: Labelled) -> Labelled:
    """No user labels before the test."""
    lab.library.store.forget_user_labels(lab.ids)
    return lab


def url(image_id: int, label: str) -> str:
    return f"/api/images/{image_id}/labels/{quote(label, safe='')}"


def error_of(response: Any, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    return body["error"]


# -- one image ------------------------------------------------------------------------------------


def test_confirm_reject_and_forget_a_label_of_one_image(clean: Labelled) -> None:
    c, image = clean.client, clean.ids[0]
    assert c.get(f"/api/images/{image}/labels").json() == {
        "image": image,
        "labels": [],
        "labels_changed": c.get("/api/status").json()["labels_changed"],
    }
    before = clean.version()
    answer = c.put(url(image, "L000"), json={"present": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["image"] == image and body["labels_changed"] is True
    [row] = body["labels"]
    assert row["label"] == "L000" and row["present"] is True and row["source"] == "api"
    assert RFC3339_UTC.match(row["updated_at"]), row
    assert clean.version() == before + 1
    assert c.get("/api/status").json()["labels_changed"] is True
    # The same answer again is no change; another spelling of the label is the same label.
    assert c.put(url(image, "l000"), json={"present": True}).json() == body
    assert clean.version() == before + 1
    # Rejecting replaces it; the gallery says it is the gallery.
    rejected = c.put(url(image, "l000"), json={"present": False, "source": "gallery"}).json()
    assert [(r["label"], r["present"], r["source"]) for r in rejected["labels"]] == [
        ("l000", False, "gallery")
    ]
    assert clean.library.store.user_labels() == [(image, "l000", "l000", False, "gallery")]
    # Any text is a label (outside the vocabulary too: it counts once added), URL-encoded.
    odd = "AC/DC & friends?"
    assert c.put(url(image, odd), json={"present": True}).status_code == 200
    labels = c.get(f"/api/images/{image}/labels").json()["labels"]
    assert sorted(r["label"] for r in labels) == sorted([odd, "l000"])
    # Forget: gone; forgetting again is a no-op (no change, no version bump).
    gone = c.delete(url(image, odd))
    assert gone.status_code == 200 and [r["label"] for r in gone.json()["labels"]] == ["l000"]
    version = clean.version()
    assert c.delete(url(image, odd)).status_code == 200
    assert clean.version() == version


def test_one_image_errors(clean: Labelled) -> None:
    c, image = clean.client, clean.ids[0]
    assert error_of(c.get("/api/images/999999/labels"), 404)["code"] == "not_found"
    assert error_of(c.put(url(999999, "L000"), json={"present": True}), 404)["code"] == "not_found"
    assert error_of(c.delete(url(999999, "L000")), 404)["code"] == "not_found"
    for body, where in [
        ({"present": "yes"}, "present"),
        ({"present": 1}, "present"),
        ({}, "present"),
        ({"present": True, "source": "csv"}, "source"),
        ({"present": True, "extra": 1}, "extra"),
    ]:
        err = error_of(c.put(url(image, "L000"), json=body), 422)
        assert err["code"] == "invalid_request" and where in err["message"], (body, err)
    assert "empty" in error_of(c.put(url(image, "  "), json={"present": True}), 422)["message"]
    long = "x" * 201
    assert error_of(c.put(url(image, long), json={"present": True}), 422)["code"] == (
        "invalid_request"
    )
    assert error_of(c.get("/api/images/0/labels"), 422)["code"] == "invalid_request"
    assert clean.library.store.user_labels() == []


def test_label_writes_need_a_write_key(clean: Labelled) -> None:
    c, image = clean.client, clean.ids[1]
    _, read_key = create_key(clean.library.store, "read", "dam")
    read = {"Authorization": f"Bearer {read_key}"}
    anonymous = {"Authorization": ""}
    assert c.get(f"/api/images/{image}/labels", headers=read).status_code == 200
    assert c.get("/api/user-labels", headers=read).status_code == 200
    for response in (
        c.put(url(image, "L001"), json={"present": True}, headers=read),
        c.delete(url(image, "L001"), headers=read),
        c.post("/api/user-labels", json={"labels": []}, headers=read),
    ):
        assert error_of(response, 403)["code"] == "forbidden"
    for response in (
        c.get(f"/api/images/{image}/labels", headers=anonymous),
        c.get("/api/user-labels", headers=anonymous),
        c.put(url(image, "L001"), json={"present": True}, headers=anonymous),
        c.post("/api/user-labels", json={"labels": []}, headers=anonymous),
    ):
        assert error_of(response, 401)["code"] == "unauthorized"
    with client_for(clean.library, public_read=True) as public:
        assert public.get("/api/user-labels", headers=anonymous).status_code == 200
        put = public.put(url(image, "L001"), json={"present": True}, headers=anonymous)
        assert put.status_code == 401
    assert clean.library.store.user_labels() == []


# -- bulk and listing -----------------------------------------------------------------------------


def every_label(lab: Labelled, by_path: bool = True) -> list[dict[str, Any]]:
    """Every vocabulary label of every image, true or not (complete labelling): images by path
    (half of them) and by id."""
    names = scale.label_names(N_LABELS)
    rows = []
    for r, image in enumerate(lab.ids):
        ref: int | str = lab.paths[image] if by_path and r % 2 == 0 else image
        rows += [
            {"image": ref, "label": name, "present": bool(lab.truth[r, c])}
            for c, name in enumerate(names)
        ]
    return rows


def list_all(c: TestClient, limit: int, **params: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": limit, **params, **({"cursor": cursor} if cursor else {})}
        page = c.get("/api/user-labels?" + urlencode(query))
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["labels"]) <= limit
        out += body["labels"]
        cursor = body["next_cursor"]
        if cursor is None:
            return out


def test_bulk_of_thousands_is_one_write_then_listed_page_by_page(
    clean: Labelled, monkeypatch: pytest.MonkeyPatch
) -> None:
    c, store = clean.client, clean.library.store
    rows = every_label(clean)
    assert len(rows) == N_IMAGES * N_LABELS == 20_000
    writes: list[int] = []
    real = store.set_user_labels

    def counted(given: Any, source: str) -> int:
        writes.append(len(given))
        return real(given, source)

    monkeypatch.setattr(store, "set_user_labels", counted)
    response = c.post("/api/user-labels", json={"labels": rows})
    assert response.status_code == 200, response.text
    assert len(response.content) < 200
    assert response.json() == {"written": 20_000, "images": N_IMAGES, "labels_changed": True}
    assert writes == [20_000]  # one store write, one transaction
    stored = store.user_labels()
    assert len(stored) == 20_000 and {r[4] for r in stored} == {"api"}
    truth = {
        (image, name): bool(clean.truth[r, col])
        for r, image in enumerate(clean.ids)
        for col, name in enumerate(scale.label_names(N_LABELS))
    }
    assert {(i, name): p for i, _k, name, p, _s in stored} == truth
    # The listing: every label once, by image then label, with the image's path.
    listed = list_all(c, 3000)
    assert len(listed) == 20_000
    assert [(r["image"], r["label"]) for r in listed] == [(i, n) for i, _k, n, _p, _s in stored]
    assert all(r["path"] == clean.paths[r["image"]] for r in listed[:50])
    assert all(RFC3339_UTC.match(r["updated_at"]) for r in listed[:50])
    # One label (any case); one source.
    one = list_all(c, 700, label="L003")
    assert len(one) == N_IMAGES and {r["label"] for r in one} == {"l003"}
    assert sum(r["present"] for r in one) == int(clean.truth[:, 3].sum())
    assert list_all(c, 10, source="csv") == []
    # A later row for the same image and label wins; a repeated image counts once.
    image = clean.ids[5]
    again = c.post(
        "/api/user-labels",
        json={
            "labels": [
                {"image": image, "label": "L000", "present": True},
                {"image": str(image), "label": "l000", "present": False},
            ],
            "source": "gallery",
        },
    ).json()
    assert again["written"] == 1 and again["images"] == 1
    assert [
        (r["label"], r["present"], r["source"])
        for r in c.get(f"/api/images/{image}/labels").json()["labels"]
        if r["label"].lower() == "l000"
    ] == [("l000", False, "gallery")]


def test_bulk_with_unknown_images_writes_nothing(clean: Labelled) -> None:
    c = clean.client
    rows = every_label(clean)[:3000]
    rows += [
        {"image": 777_777, "label": "L000", "present": True},
        {"image": "/nowhere/x.jpg", "label": "L000", "present": True},
        {"image": "/nowhere/x.jpg", "label": "L001", "present": False},
        {"image": "99999999999999999999999", "label": "L000", "present": True},
    ]
    version = clean.version()
    err = error_of(c.post("/api/user-labels", json={"labels": rows}), 404)
    assert err["code"] == "not_found"
    assert err["message"].startswith("3 images are not indexed (nothing was written)")
    for named in ("777777", "/nowhere/x.jpg", "99999999999999999999999"):
        assert named in err["message"]
    assert clean.library.store.user_labels() == [] and clean.version() == version


@pytest.mark.parametrize(
    ("row", "where"),
    [
        ({"image": 1, "label": "L000", "present": "yes"}, "labels.1.present"),
        ({"image": 1, "label": "", "present": True}, "labels.1.label"),
        ({"image": 1, "label": "   ", "present": True}, "labels.1.label"),
        ({"image": 1, "label": "x" * 201, "present": True}, "labels.1.label"),
        ({"image": 1.5, "label": "L000", "present": True}, "labels.1.image"),
        ({"image": 0, "label": "L000", "present": True}, "labels.1.image"),
        ({"image": None, "label": "L000", "present": True}, "labels.1.image"),
        ({"label": "L000", "present": True}, "labels.1.image"),
        ({"image": 1, "label": "L000", "present": True, "score": 1}, "labels.1.score"),
    ],
)
def test_malformed_bulk_is_422_naming_the_row(clean: Labelled, row: Any, where: str) -> None:
    good = {"image": clean.ids[0], "label": "L000", "present": True}
    err = error_of(clean.client.post("/api/user-labels", json={"labels": [good, row]}), 422)
    assert err["code"] == "invalid_request" and where in err["message"], err
    assert clean.library.store.user_labels() == []


def test_bulk_body_shape_and_size_errors(clean: Labelled) -> None:
    c = clean.client
    for body in ({}, {"labels": {}}, {"labels": [1]}, {"labels": [], "source": "xmp"}, []):
        assert error_of(c.post("/api/user-labels", json=body), 422)["code"] == "invalid_request"
    response = c.post(
        "/api/user-labels", content=b"labels=1", headers={"Content-Type": "text/plain"}
    )
    assert error_of(response, 415)["code"] == "unsupported_media_type"
    assert c.post("/api/user-labels", json={"labels": []}).json()["written"] == 0
    # A bulk may be far larger than other bodies (the 20,000 rows above are ~1 MB), not endless.
    huge = b'{"labels": [' + b" " * (17 * 1024 * 1024) + b"]}"
    response = c.post(
        "/api/user-labels", content=huge, headers={"Content-Type": "application/json"}
    )
    assert error_of(response, 413)["code"] == "body_too_large"
    big = {"labels": ["x" * 300_000]}
    assert error_of(c.put("/api/vocabulary", json=big), 413)["code"] == "body_too_large"


def test_bad_listing_parameters(clean: Labelled) -> None:
    c = clean.client
    assert error_of(c.get("/api/user-labels?cursor=nonsense"), 400)["code"] == "bad_request"
    tags_cursor = c.get("/api/tags?limit=1").json()["next_cursor"]
    assert error_of(c.get(f"/api/user-labels?cursor={tags_cursor}"), 400)["code"] == "bad_request"
    assert error_of(c.get("/api/user-labels?limit=0"), 422)["code"] == "invalid_request"
    assert error_of(c.get("/api/user-labels?limit=10001"), 422)["code"] == "invalid_request"


# -- the fit learns from them ---------------------------------------------------------------------


def test_a_fit_job_learns_from_labels_given_over_the_api(clean: Labelled) -> None:
    """The first 200 images labelled completely; by this user's meaning, "l000" is what the
    model calls "l005" (its text says otherwise), so only learning can rank it: the fit job
    learns it, and its result says so and why, label by label."""
    c = clean.client
    names = scale.label_names(N_LABELS)
    meaning = list(range(N_LABELS))
    meaning[0] = 5
    rows = [
        {"image": image, "label": name, "present": bool(clean.truth[r, meaning[col]])}
        for r, image in enumerate(clean.ids[:200])
        for col, name in enumerate(names)
    ]
    assert c.post("/api/user-labels", json={"labels": rows}).json()["written"] == 1600
    status = c.get("/api/status").json()
    assert status["labels_changed"] is True and status["stale"] is False
    # The tags stand meanwhile: queries answer.
    assert c.get("/api/queries/search?expression=l000").status_code == 200
    job = clean.fit()
    learning = job["result"]["learning"]
    assert learning["images"] == 200
    assert set(learning["labels"]) == set(names)
    for name, rec in learning["labels"].items():
        assert rec["used"] in ("learnt", "training-free") and "held-out AP" in rec["why"], rec
        assert (name in learning["learnt"]) == (rec["used"] == "learnt")
        assert job["result"]["labels"][name]["learning"] == rec
    assert "l000" in learning["learnt"], learning["labels"]["l000"]
    ap = learning["labels"]["l000"]["held_out_AP"]
    assert ap["learnt"] > ap["training_free"]
    assert job["result"]["labels"]["l000"]["source"] == "learnt"
    assert c.get("/api/status").json()["labels_changed"] is False
    # One correction from the gallery: a fit would learn again.
    image = clean.ids[0]
    flipped = not bool(clean.truth[0, 5])
    answer = c.put(url(image, "l000"), json={"present": flipped, "source": "gallery"}).json()
    assert answer["labels_changed"] is True
    assert c.get("/api/status").json()["labels_changed"] is True


def test_openapi_declares_the_label_operations(lab: Labelled) -> None:
    spec = lab.client.get("/openapi.json").json()
    paths = spec["paths"]
    operations = {
        ("get", "/api/images/{image_id}/labels"): "get_image_labels",
        ("put", "/api/images/{image_id}/labels/{label}"): "set_image_label",
        ("delete", "/api/images/{image_id}/labels/{label}"): "forget_image_label",
        ("post", "/api/user-labels"): "set_labels",
        ("get", "/api/user-labels"): "list_labels",
    }
    for (method, path), op_id in operations.items():
        op = paths[path][method]
        assert op["operationId"] == op_id
        for status, answer in op["responses"].items():
            if status[0] in "45":
                assert answer["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/Error"
                }
        assert {"401", "422"} <= set(op["responses"]), op_id
        if method != "get":
            assert "403" in op["responses"], op_id
    assert "404" in paths["/api/user-labels"]["post"]["responses"]
    assert "labels_changed" in spec["components"]["schemas"]["Status"]["properties"]
    # `/api/labels` (GET) stays the vocabulary's label completion.
    assert paths["/api/labels"]["get"]["operationId"] == "complete_labels"
