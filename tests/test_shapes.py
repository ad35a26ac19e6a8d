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

ASSET_DIR = (
    Path(__file__).resolve().parent.parent / "piaa_index" / "model" / "assets" / "shapesworld"
)
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


# ----------------------------------------------------------------------------- long tail, novel


def test_new_options_at_neutral_values_draw_exactly_as_before() -> None:
    """weights=None / novel=0 (and equal weights: --long-tail 1) make the same RNG calls."""
    from piaa_index.shapes.world import class_subset, long_tail_order, long_tail_weights

    kitchen = class_subset(groups=["kitchen"])
    for allowed in (None, kitchen):
        flat = long_tail_weights(long_tail_order(3, allowed), 1.0)
        for i in range(12):
            ra, rb, rc = (np.random.default_rng([3, i]) for _ in range(3))
            a = render_scene(ra, 64, allowed)
            b = render_scene(rb, 64, allowed, weights=None, novel=0)
            c = render_scene(rc, 64, allowed, weights=flat, novel=0)
            for s in (b, c):
                assert s.labels == a.labels and s.objects == a.objects
                assert np.array_equal(np.asarray(s.image), np.asarray(a.image))
            # The generators are in the same state afterwards: the same calls were made.
            assert ra.random() == rb.random() == rc.random()
    assert len(CLASSES) == 24


def test_long_tail_order_is_a_seeded_permutation() -> None:
    from piaa_index.shapes.world import class_subset, long_tail_order, long_tail_weights

    a, b = long_tail_order(1), long_tail_order(2)
    assert sorted(a) == sorted(b) == list(range(len(CLASSES)))
    assert a == long_tail_order(1) and a != b  # head and tail differ between seeds
    w = long_tail_weights(a, 50)
    assert w[a[0]] == 1.0 and w[a[-1]] == pytest.approx(1 / 50)
    assert all(w[a[k]] > w[a[k + 1]] for k in range(len(a) - 1))
    street = class_subset(groups=["street"])
    assert street is not None
    order = long_tail_order(1, street)
    assert sorted(order) == street
    ws = long_tail_weights(order, 10)
    assert ws[order[-1]] == pytest.approx(0.1) and ws.sum() == ws[street].sum()
    with pytest.raises(ValueError):
        long_tail_weights(a, 0.5)


def test_long_tail_image_counts_fall_from_head_to_tail_by_about_the_ratio() -> None:
    from piaa_index.shapes.world import long_tail_order, long_tail_weights

    ratio = 50.0
    order = long_tail_order(4)
    weights = long_tail_weights(order, ratio)
    counts = np.zeros(len(CLASSES))
    for i in range(3000):
        scene = render_scene(np.random.default_rng([4, i]), 32, weights=weights)
        counts[scene.labels] += 1
    by_rank = counts[order]
    assert by_rank.min() > 0
    assert by_rank.max() >= ratio / 3 * by_rank.min()
    assert by_rank[:4].mean() >= 8 * by_rank[-4:].mean()  # the head is the head, not by chance
    assert np.corrcoef(np.arange(len(order)), by_rank)[0, 1] < -0.8  # falls along the order


def test_novel_kinds_render_with_texture_and_appear_often_enough() -> None:
    from piaa_index.shapes.world import NOVEL, class_name

    assert NOVEL[:2] == ["novel-1", "novel-2"] and not set(NOVEL) & set(CLASSES)
    rng = np.random.default_rng(0)
    for j, name in enumerate(NOVEL):
        cid = len(CLASSES) + j
        assert class_name(cid) == name
        for w, h in ((12, 10), (80, 64)):
            rgb, mask = render_object(cid, rng, w, h)
            m = np.asarray(mask) > 127
            assert rgb.size == mask.size and 0.1 < m.mean() <= 1.0, name
            if w >= 64:
                assert np.asarray(rgb)[m].astype(float).std(0).max() > 10, name
    counts = np.zeros(len(CLASSES) + len(NOVEL))
    for i in range(1000):
        scene = render_scene(np.random.default_rng([8, i]), 32, novel=2)
        counts[scene.labels] += 1
        assert 1 <= len(scene.objects) <= 7
    assert (counts[24:26] >= 100).all() and (counts[26:] == 0).all()
    assert counts[:24].min() > 0  # the world's classes still appear
    # Scene captions name the novel kinds by their names.
    for i in range(40):
        scene = render_scene(np.random.default_rng([8, i]), 32, novel=2)
        text, ids = caption_with_ids(scene, np.random.default_rng(i))
        assert all(class_name(c) in text for c in ids)


def test_generate_long_tail_novel_dataset_with_groups_loads_for_eval(tmp_path: Path) -> None:
    from piaa_index.shapes.world import NOVEL, class_subset

    allowed = class_subset(groups=["kitchen", "fun"])
    assert allowed is not None
    out = generate_dataset(
        tmp_path / "ds",
        60,
        seed=3,
        size=48,
        fmt="png",
        progress=False,
        classes_allowed=allowed,
        long_tail=10.0,
        novel=3,
    )
    names = json.loads((out / "classes.json").read_text())
    assert names == CLASSES + ["novel-1", "novel-2", "novel-3"] == CLASSES + NOVEL[:3]
    rows = [line.split() for line in (out / "labels.txt").read_text().splitlines()]
    labels = [{int(t) for t in row[1:]} for row in rows]
    assert len(rows) == 60 and all(ids <= set(allowed) | {24, 25, 26} for ids in labels)
    assert {24, 25, 26} <= set().union(*labels)
    info = json.loads((out / "long_tail.json").read_text())
    assert info["ratio"] == 10.0
    assert sorted(info["order"]) == sorted(CLASSES[c] for c in allowed)
    assert list(info["counts"]) == info["order"]
    for name, n in info["counts"].items():
        assert n == sum(CLASSES.index(name) in ids for ids in labels)
    # Eval's loader reads it: 27 classes, novel ids 24..26 in range.
    dataset = load_dataset(out)
    assert dataset.classes == names
    assert [set(item.labels) for item in dataset.items] == labels
    # Image i is render_scene with the same options.
    from piaa_index.shapes.world import long_tail_order, long_tail_weights

    weights = long_tail_weights(long_tail_order(3, allowed), 10.0)
    scene = render_scene(np.random.default_rng([3, 5]), 48, allowed, weights=weights, novel=3)
    assert set(scene.labels) == labels[5]
    # Without the options: 24 classes and no long_tail.json (a stale one is removed).
    generate_dataset(out, 3, seed=3, size=48, fmt="png", progress=False)
    assert json.loads((out / "classes.json").read_text()) == CLASSES
    assert not (out / "long_tail.json").exists()


def test_cli_generate_long_tail_and_novel(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from piaa_index.cli import cli

    home, out = tmp_path / "home", tmp_path / "ds"
    args = ["--home", str(home), "-q", "shapes", "generate", str(out), "--images", "8"]
    args += ["--size", "40", "--seed", "2", "--long-tail", "20", "--novel", "2", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["novel"] == ["novel-1", "novel-2"] and report["classes"] == CLASSES
    assert report["long_tail"] == json.loads((out / "long_tail.json").read_text())
    assert report["long_tail"]["ratio"] == 20.0
    assert len(json.loads((out / "classes.json").read_text())) == 26
    for bad in (["--novel", "9"], ["--long-tail", "0.5"]):
        result = CliRunner().invoke(
            cli, ["--home", str(home), "shapes", "generate", str(out), *bad]
        )
        assert result.exit_code == 2
