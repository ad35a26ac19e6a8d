"""Patch evidence maps: the grid is the quantity the stored patch score max-pools, on the
model's patch grid; rendering draws it over the upright photo; bad input is a user error."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.errors import NotFoundError, UserInputError
from piaa_index.library.evidence import (
    Evidence,
    colormap,
    evidence_png,
    render_overlay,
    seen_box,
    upsample,
)
from tests.shapes_library import open_shapes_library


@pytest.fixture(scope="module")
def library(shapes_home: Path):
    with open_shapes_library(shapes_home) as lib:
        yield lib


def test_grid_max_is_the_stored_patch_score_for_every_label_and_image(library):
    """For every label on 16 images (384 maps), the grid has the model's patch-grid shape
    and its max equals the patch score `piaa tags` shows (the map is what was max-pooled)."""
    grid_shape = tuple(library.vectors.identity["grid"])
    assert grid_shape == (8, 8)  # the shipped shapesworld model: 96 px, 12 px patches
    paths = library.store.indexed_paths()
    assert len(paths) == 48
    checked = 0
    for path in paths[::3]:
        image_id = library.image_id(path)
        for row in library.tags(path):
            ev = library.evidence(image_id, row["label"])
            assert ev.grid.shape == grid_shape
            assert ev.path == path and ev.label == row["label"]
            # The map's brightest patch is the patch score `piaa tags` shows.
            assert ev.grid.max() == pytest.approx(row["patch_score"], rel=1e-5, abs=1e-7)
            assert ev.tag["present"] == row["present"]
            assert ev.tag["threshold"] == row["threshold"] and ev.tag["why"] == row["why"]
            assert ev.tag["score"] == row["score"]
            checked += 1
    assert checked == 16 * 24


def test_each_label_map_is_its_own_probability(library):
    """Open world: a patch's evidence for a label is that label against the background, not a
    share of the vocabulary: every map lies in [0, 1] and the maps do not sum to one."""
    path = library.store.indexed_paths()[0]
    grids = [library.evidence(path, name).grid for name in library.labels()]
    assert all(0.0 <= g.min() and g.max() <= 1.0 for g in grids)
    assert not np.allclose(sum(grids), 1.0)


def test_by_path_equals_by_id_and_label_matching_is_the_query_languages(library):
    path = library.store.indexed_paths()[3]
    label = library.labels()[0]
    a = library.evidence(path, label)
    b = library.evidence(library.image_id(path), label.upper())
    np.testing.assert_array_equal(a.grid, b.grid)
    assert b.label == label


def test_json_form(library):
    path = library.store.indexed_paths()[1]
    ev = library.evidence(path, library.labels()[2])
    doc = json.loads(json.dumps(ev.as_json()))
    assert doc["grid_shape"] == [8, 8]
    grid = np.asarray(doc["grid"])
    assert grid.shape == (8, 8)
    assert doc["max"] == pytest.approx(grid.max(), abs=1e-6)
    assert doc["min"] == pytest.approx(grid.min(), abs=1e-6)
    assert doc["max"] == pytest.approx(doc["patch_score"], rel=1e-5)
    assert doc["image_id"] == ev.image_id and doc["label"] == ev.label
    lo, hi = doc["display_range"]
    assert lo == 0.0
    for key in ("present", "threshold", "why", "score", "label_status"):
        assert key in doc


def test_bad_label_and_unindexed_image_are_user_errors(library, tmp_path):
    path = library.store.indexed_paths()[0]
    with pytest.raises(UserInputError, match="not in the vocabulary"):
        library.evidence(path, "unicorn")
    with pytest.raises(NotFoundError, match="no indexed image with id 999999"):
        library.evidence(999_999, library.labels()[0])
    stranger = tmp_path / "stranger.png"
    Image.new("RGB", (32, 32)).save(stranger)
    with pytest.raises(UserInputError, match="not in the index"):
        library.evidence(str(stranger), library.labels()[0])


def test_png_is_the_upright_photo_with_the_map_drawn_where_the_evidence_is(library):
    """The overlay lightens the photo most at the hottest patch and darkens the coldest one;
    it keeps the photo's size (at most 512 px) and the PNG decodes."""
    for path in library.store.indexed_paths()[:6]:
        present = [r for r in library.tags(path) if r["present"]]
        if present:
            break
    ev = library.evidence(path, present[0]["label"])
    png = evidence_png(ev, size=224)
    overlay = Image.open(io.BytesIO(png))
    photo = Image.open(path).convert("RGB")
    assert overlay.format == "PNG" and overlay.size == photo.size == (224, 224)
    luma = np.array([0.299, 0.587, 0.114])
    change = (np.asarray(overlay, np.float64) - np.asarray(photo, np.float64)) @ luma
    cell = 224 // 8
    hot = np.unravel_index(int(np.argmax(ev.grid)), ev.grid.shape)
    cold = np.unravel_index(int(np.argmin(ev.grid)), ev.grid.shape)

    def block(rc):
        r, c = rc
        return change[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].mean()

    assert block(hot) > block(cold) + 30
    with pytest.raises(UserInputError):
        evidence_png(ev, size=5000)


def test_upsample_keeps_cell_centres_and_constants():
    grid = np.arange(16, dtype=np.float64).reshape(4, 4)
    up = upsample(grid, 44, 44, (0, 0, 44, 44))
    assert up.shape == (44, 44)
    # Cells are 11 px: pixel 5 is cell 0's centre, pixel 38 cell 3's; exact there.
    assert up[5, 5] == pytest.approx(grid[0, 0]) and up[38, 38] == pytest.approx(grid[3, 3])
    assert up[5, 16] == pytest.approx(grid[0, 1])
    assert np.all(np.diff(up[20]) >= 0)
    flat = upsample(np.full((3, 5), 0.7), 33, 17, (0, 0, 33, 17))
    np.testing.assert_allclose(flat, 0.7)


def test_seen_box_follows_open_clips_resize_modes():
    assert seen_box(300, 200, "shortest") == (50.0, 0.0, 250.0, 200.0)  # centre crop
    assert seen_box(300, 200, "squash") == (0.0, 0.0, 300.0, 200.0)
    assert seen_box(300, 200, "longest") == (0.0, -50.0, 300.0, 250.0)  # padded square


def test_overlay_dims_what_the_model_never_saw():
    photo = Image.new("RGB", (300, 200), (200, 200, 200))
    out = np.asarray(render_overlay(photo, np.zeros((4, 4)), "shortest"))
    assert out[100, 10].tolist() == [70, 70, 70]  # left strip, outside the centre crop
    assert out[100, 150].sum() > out[100, 10].sum()


def test_colormap_is_monotone_in_lightness():
    c = colormap(np.linspace(0, 1, 50)).astype(np.float64)
    lightness = c @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lightness) > 0)
    assert colormap(np.array([-1.0, 2.0])).tolist() == [[0, 0, 4], [252, 255, 164]]


def test_display_range_runs_from_no_preference_to_the_threshold_or_the_best_patch():
    grid = np.array([[1 / 24, 0.08], [0.07, 0.05]])
    below = Evidence(1, "x", "a", grid, tag={"threshold": 0.1, "n_labels": 24})
    assert below.display_range == (1 / 24, 0.1)  # not tagged: never reaches the top colour
    assert below.scaled().max() < 1
    tagged = Evidence(1, "x", "a", grid, tag={"threshold": 0.06, "n_labels": 24})
    assert tagged.display_range == (1 / 24, 0.08)  # tagged: the best patch is the top colour
    np.testing.assert_allclose(tagged.scaled()[0], [0, 1])
    absent = Evidence(1, "x", "a", grid, tag={"threshold": None, "n_labels": 24})
    assert absent.display_range == (1 / 24, 1.0)


# ------------------------------------------------------------------------------------- CLI


def _piaa(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    db = f"sqlite:///{home / 'piaa.sqlite3'}"
    return subprocess.run(
        [sys.executable, "-m", "piaa_index", "--home", str(home), "--db", db, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_writes_the_heatmap_and_prints_the_grid(library, shapes_home, tmp_path):
    path = library.store.indexed_paths()[5]
    label = library.labels()[3]
    out = tmp_path / "map.png"
    done = _piaa(shapes_home, "tags", path, "--evidence", label, "--output", str(out))
    assert done.returncode == 0, done.stderr
    assert label in done.stdout and "max = patch score" in done.stdout
    assert Image.open(out).format == "PNG" and Image.open(out).size == Image.open(path).size
    done = _piaa(shapes_home, "tags", path, "--evidence", label, "--json")
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    np.testing.assert_allclose(doc["grid"], library.evidence(path, label).grid, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--evidence", "unicorn"], 2, "not in the vocabulary"),
        (["--output", "x.png"], 2, "give both"),
        (["--evidence", "wheel", "--csv"], 2, "--csv"),
        (["--evidence", "wheel", "--output", "/nonexistent-dir/map.png"], 1, "nonexistent-dir"),
    ],
)
def test_cli_mistakes_are_one_line(library, shapes_home, args, code, message):
    path = library.store.indexed_paths()[0]
    done = _piaa(shapes_home, "tags", path, *args)
    assert done.returncode == code, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
