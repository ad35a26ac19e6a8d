"""Tests for the ShapesWorld generator, dataset writer, training helpers and shipped checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from piaa_index.eval.datasets import load_dataset
from piaa_index.shapes.dataset import generate_dataset
from piaa_index.shapes.world import (
    CLASSES,
    GROUPS,
    caption,
    caption_with_ids,
    render_object,
    render_scene,
)

ASSET_DIR = Path(__file__).resolve().parent.parent / "piaa_index" / "assets" / "shapesworld"
CKPT = ASSET_DIR / "shapesworld.safetensors"


def _scenes(n: int, seed: int, size: int = 96) -> list:
    """n scenes from one generator."""
    rng = np.random.default_rng(seed)
    return [render_scene(rng, size) for _ in range(n)]


# ----------------------------------------------------------------------------- world


def test_classes_are_unique_prompt_phrases() -> None:
    assert len(CLASSES) >= 20
    assert len(set(CLASSES)) == len(CLASSES)
    assert all(c == c.strip().lower() and 0 < len(c.split()) <= 3 for c in CLASSES)
    assert all(name in CLASSES for g in GROUPS.values() for name in g)


def test_same_seed_same_scene_different_seed_different() -> None:
    a = render_scene(np.random.default_rng(42), 112)
    b = render_scene(np.random.default_rng(42), 112)
    c = render_scene(np.random.default_rng(43), 112)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert a.labels == b.labels and a.objects == b.objects
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_scene_structure() -> None:
    scenes = _scenes(300, seed=7)
    for s in scenes:
        assert s.image.mode == "RGB" and s.image.size == (96, 96)
        assert 1 <= len(s.objects) <= 5
        assert s.labels == sorted({c for c, _ in s.objects})
        assert all(0 <= c < len(CLASSES) and 0 < a <= 1 for c, a in s.objects)
        areas = [a for _, a in s.objects]
        assert areas == sorted(areas, reverse=True)  # dominant object first
    counts = {len(s.objects) for s in scenes}
    assert counts == {1, 2, 3, 4, 5}


def test_object_sizes_span_small_to_large() -> None:
    areas = np.array([a for s in _scenes(300, seed=3) for _, a in s.objects])
    assert (areas < 0.04).sum() >= 20  # one or two patches
    assert (areas > 0.4).sum() >= 3


def test_every_class_renders_and_appears() -> None:
    rng = np.random.default_rng(0)
    for cid in range(len(CLASSES)):
        for w, h in ((12, 10), (80, 64)):
            rgb, mask = render_object(cid, rng, w, h)
            m = np.asarray(mask) > 127
            assert rgb.size == mask.size
            assert 0.1 < m.mean() <= 1.0, CLASSES[cid]
            if w >= 64:  # internal pattern is what a patch sees: not a flat colour
                pix = np.asarray(rgb)[m].astype(float)
                assert pix.std(0).max() > 10, f"{CLASSES[cid]} has no internal pattern"
    seen = {c for s in _scenes(400, seed=11, size=64) for c in s.labels}
    assert seen == set(range(len(CLASSES)))


def test_caption_names_objects_verbatim() -> None:
    rng = np.random.default_rng(5)
    full = 0
    for s in _scenes(200, seed=5):
        text, ids = caption_with_ids(s, rng)
        assert ids and set(ids) <= set(s.labels)
        assert ids[0] == s.objects[0][0]  # the dominant object is always named
        assert all(CLASSES[c] in text for c in ids)
        full += len(ids) == len(s.objects) > 2
        assert isinstance(caption(s, rng), str)
    assert full > 0  # some captions list every object


# ----------------------------------------------------------------------------- dataset


def test_generate_dataset_round_trip(tmp_path: Path) -> None:
    out = generate_dataset(tmp_path / "ds", 6, seed=9, size=64, fmt="png", progress=False)
    # Read back exactly as `piaa eval` reads it.
    dataset = load_dataset(out)
    assert dataset.layout == "ours" and dataset.classes == CLASSES
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    assert [item.path for item in dataset.items] == [
        out.resolve() / f"images/{i:05d}.png" for i in range(6)
    ]
    for i, item in enumerate(dataset.items):
        scene = render_scene(np.random.default_rng([9, i]), 64)
        assert sorted(item.labels) == scene.labels
        from PIL import Image

        with Image.open(item.path) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), np.asarray(scene.image))
    line = (out / "labels.txt").read_text().splitlines()[0]
    assert line.split()[0] == "images/00000.png" and all(t.isdigit() for t in line.split()[1:])


def test_generate_dataset_deterministic_jpg(tmp_path: Path) -> None:
    a = generate_dataset(tmp_path / "a", 4, seed=1, size=64, progress=False)
    b = generate_dataset(tmp_path / "b", 4, seed=1, size=64, progress=False)
    c = generate_dataset(tmp_path / "c", 4, seed=2, size=64, progress=False)
    assert (a / "labels.txt").read_text() == (b / "labels.txt").read_text()
    for i in range(4):
        rel = f"images/{i:05d}.jpg"
        assert (a / rel).read_bytes() == (b / rel).read_bytes()
    assert any(
        (a / f"images/{i:05d}.jpg").read_bytes() != (c / f"images/{i:05d}.jpg").read_bytes()
        for i in range(4)
    )


# ----------------------------------------------------------------------------- training helpers


def test_losses_and_token_similarity() -> None:
    torch = pytest.importorskip("torch")
    from tools.train_shapesworld import mean_ap, soft_clip_loss, token_sim

    patches = torch.zeros(2, 3, 2)
    patches[0, 0] = torch.tensor([1.0, 0.0])  # image 0 has a class-0 patch
    patches[1, 2] = torch.tensor([0.0, 1.0])  # image 1 has a class-1 patch
    text = torch.eye(2)
    mention = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim = token_sim(patches, text, mention)
    assert torch.allclose(sim, torch.eye(2))
    same = torch.eye(2)
    assert soft_clip_loss(10 * sim, same) < soft_clip_loss(-10 * sim, same)
    scores, targets = np.array([[0.9], [0.8], [0.1]]), np.array([[1], [0], [1]])
    assert mean_ap(scores, targets) == pytest.approx(100 * (1 + 2 / 3) / 2)
    # The small/large-object evaluations mask images out per class.
    assert mean_ap(scores, targets, valid=np.array([[True], [False], [True]])) == 100.0


# ----------------------------------------------------------------------------- shipped model


def test_model_config_shape() -> None:
    cfg = json.loads((ASSET_DIR / "shapesworld.json").read_text())
    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    assert v["image_size"] // v["patch_size"] >= 7
    assert t["vocab_size"] == 49408 and t["context_length"] == 32


def test_shipped_checkpoint_loads_through_open_clip() -> None:
    if not CKPT.exists():
        pytest.skip(f"{CKPT.name} not trained yet (python -m tools.train_shapesworld)")
    torch = pytest.importorskip("torch")
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import load_file

    assert CKPT.stat().st_size <= 20 * 1024 * 1024
    sd = load_file(str(CKPT))
    assert all(v.dtype == torch.float16 for v in sd.values())
    open_clip.add_model_config(ASSET_DIR)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "shapesworld", pretrained=str(CKPT)
    )
    assert set(sd) == set(model.state_dict())
    tok = open_clip.get_tokenizer("shapesworld")
    scene = render_scene(np.random.default_rng(0), 224)
    with torch.no_grad():
        img = model.encode_image(preprocess(scene.image)[None])
        txt = model.encode_text(tok([f"a photo of a {c}." for c in CLASSES]))
    assert img.shape == (1, 128) and txt.shape == (len(CLASSES), 128)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_class_subset_scenes_hold_only_those_classes_and_full_world_is_unchanged() -> None:
    from piaa_index.shapes.world import CLASSES, GROUPS, class_subset

    allowed = class_subset(groups=["kitchen", "fun"])
    assert allowed is not None
    assert {CLASSES[c] for c in allowed} == set(GROUPS["kitchen"]) | set(GROUPS["fun"])
    seen: set[int] = set()
    for i in range(300):
        scene = render_scene(np.random.default_rng([5, i]), 64, allowed)
        assert set(scene.labels) <= set(allowed)
        seen |= set(scene.labels)
    assert len(seen) >= len(allowed) - 1
    one = class_subset(classes=["car"])
    assert all(
        render_scene(np.random.default_rng(i), 64, one).labels in ([], [15]) for i in range(20)
    )
    # Without a subset the draws are exactly the full world's (seeded splits keep their scenes).
    a = render_scene(np.random.default_rng(42), 64)
    b = render_scene(np.random.default_rng(42), 64, None)
    assert a.labels == b.labels and np.array_equal(np.asarray(a.image), np.asarray(b.image))
    with pytest.raises(ValueError):
        class_subset(groups=["nowhere"])
