"""The media routes of the HTTP API (plugins/http_api/routes_media.py): thumbnails and patch
evidence maps by image id, through FastAPI's test client on a fitted ShapesWorld library."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
pytest.importorskip("piaa_index_plugins.http_api.app", reason="the FastAPI app is not here")

from fastapi.testclient import TestClient  # noqa: E402
from piaa_index_plugins.http_api.app import create_app  # noqa: E402
from piaa_index_plugins.http_api.state import ServerConfig  # noqa: E402

from tests.shapes_library import open_shapes_library  # noqa: E402

KEY = "piaa_test-session-key"


@pytest.fixture(scope="module")
def served(shapes_home: Path):
    library = open_shapes_library(shapes_home)
    app = create_app(library, ServerConfig(session_key=KEY))
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(app, base_url="http://127.0.0.1", headers=auth) as client:
        yield client, library
    library.close()


def _first_id(library) -> int:
    return library.image_id(library.store.indexed_paths()[0])


def test_thumbnail_jpeg_with_etag_and_304(served):
    client, library = served
    image_id = _first_id(library)
    resp = client.get(f"/api/images/{image_id}/thumbnail?size=128")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(resp.content))
    assert img.format == "JPEG" and max(img.size) == 128
    etag = resp.headers["etag"]
    row = library.store.image_by_id(image_id)
    assert etag == f'"{row.content_hash}-128"'
    assert "max-age" in resp.headers["cache-control"]
    again = client.get(
        f"/api/images/{image_id}/thumbnail?size=128", headers={"If-None-Match": etag}
    )
    assert again.status_code == 304 and again.content == b""
    other = client.get(
        f"/api/images/{image_id}/thumbnail?size=256", headers={"If-None-Match": etag}
    )
    assert other.status_code == 200 and max(Image.open(io.BytesIO(other.content)).size) == 224


def test_thumbnail_errors_are_json(served):
    client, library = served
    image_id = _first_id(library)
    for url, status in [
        ("/api/images/999999/thumbnail", 404),
        (f"/api/images/{image_id}/thumbnail?size=300", 400),
        ("/api/images/0/thumbnail", 422),
        ("/api/images/..%2F..%2Fetc%2Fpasswd/thumbnail", 404),  # no such route
        ("/api/images/abc/thumbnail", 422),
    ]:
        resp = client.get(url)
        assert resp.status_code == status, (url, resp.text)
        assert resp.headers["content-type"].startswith("application/json")
        assert resp.json()["error"]["message"]
    assert (
        "no indexed image with id 999999"
        in client.get("/api/images/999999/thumbnail").json()["error"]["message"]
    )


def test_reads_need_a_key(served):
    client, library = served
    image_id = _first_id(library)
    for kind in ("thumbnail", "evidence?label=wheel"):
        resp = client.get(f"/api/images/{image_id}/{kind}", headers={"Authorization": ""})
        assert resp.status_code == 401, resp.text


def test_evidence_json_is_the_librarys_grid(served):
    client, library = served
    path = library.store.indexed_paths()[2]
    image_id = library.image_id(path)
    label = library.labels()[5]
    resp = client.get(f"/api/images/{image_id}/evidence", params={"label": label, "format": "json"})
    assert resp.status_code == 200, resp.text
    doc = resp.json()
    assert doc["grid_shape"] == [8, 8] and doc["label"] == label and doc["image_id"] == image_id
    np.testing.assert_allclose(doc["grid"], library.evidence(path, label).grid, atol=1e-6)
    tags = {t["label"]: t for t in library.tags(path)}
    assert doc["max"] == pytest.approx(tags[label]["patch_score"], rel=1e-5)
    assert doc["present"] == tags[label]["present"] and doc["why"] == tags[label]["why"]


def test_evidence_png(served):
    client, library = served
    image_id = _first_id(library)
    resp = client.get(f"/api/images/{image_id}/evidence", params={"label": library.labels()[0]})
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(resp.content))
    assert img.format == "PNG" and img.size == (224, 224)
    assert np.asarray(img).std() > 5
    small = client.get(
        f"/api/images/{image_id}/evidence", params={"label": library.labels()[0], "size": 64}
    )
    assert Image.open(io.BytesIO(small.content)).size == (64, 64)


def test_evidence_errors(served):
    client, library = served
    image_id = _first_id(library)
    cases = [
        (f"/api/images/{image_id}/evidence?label=unicorn", 400, "not in the vocabulary"),
        ("/api/images/999999/evidence?label=wheel", 404, "no indexed image"),
        (f"/api/images/{image_id}/evidence?label=wheel&format=gif", 422, "format"),
        (f"/api/images/{image_id}/evidence", 422, "label"),
        (f"/api/images/{image_id}/evidence?label=wheel&size=5000", 422, "size"),
    ]
    for url, status, message in cases:
        resp = client.get(url)
        assert resp.status_code == status, (url, resp.text)
        assert message in resp.json()["error"]["message"], resp.text


def test_gallery_is_served_at_root(served):
    client, _ = served
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'src="app.js"' in page.text and 'href="style.css"' in page.text
    for asset, kind in (("/app.js", "javascript"), ("/style.css", "text/css")):
        resp = client.get(asset)
        assert resp.status_code == 200 and kind in resp.headers["content-type"]


def test_exif_of_an_indexed_image(served):
    """The image page's facts: pixel and byte size from the index, EXIF fields null where the
    file has none (ShapesWorld images carry no camera); 404 for an unknown id."""
    client, library = served
    image_id = _first_id(library)
    resp = client.get(f"/api/images/{image_id}/exif")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    info = client.get(f"/api/images/{image_id}").json()
    assert (body["id"], body["width"], body["height"], body["size"]) == (
        image_id,
        info["width"],
        info["height"],
        info["size"],
    )
    assert body["readable"] is True and body["camera"] is None and body["taken"] is None
    missing = client.get("/api/images/999999999/exif")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_read_exif_of_a_camera_jpeg(tmp_path: Path):
    from piaa_index_plugins.http_api.routes_media import read_exif

    exif = Image.Exif()
    exif[0x010F] = "Canon"
    exif[0x0110] = "Canon EOS R6"
    sub = exif.get_ifd(0x8769)
    sub[0x829A] = 1 / 250
    sub[0x829D] = 2.8
    sub[0x8827] = 400
    sub[0x9003] = "2026:07:14 18:30:05"
    sub[0x9011] = "+02:00"
    sub[0x920A] = 35.0
    sub[0xA434] = "RF35mm F1.8 MACRO IS STM"
    path = tmp_path / "camera.jpg"
    Image.new("RGB", (64, 48), "gray").save(path, exif=exif)
    assert read_exif(str(path)) == {
        "readable": True,
        "camera": "Canon EOS R6",
        "lens": "RF35mm F1.8 MACRO IS STM",
        "taken": "2026-07-14T18:30:05+02:00",
        "exposure": "1/250 s",
        "aperture": "f/2.8",
        "iso": 400,
        "focal_length": "35 mm",
    }
    (tmp_path / "not.jpg").write_bytes(b"not an image")
    assert read_exif(str(tmp_path / "not.jpg")) == {"readable": False}
    assert read_exif(str(tmp_path / "gone.jpg")) == {"readable": False}
