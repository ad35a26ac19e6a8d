"""`piaa eval` end to end: real folders in our layout and PASCAL VOC's, a real (tiny) model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from piaa_index.cli import cli
from piaa_index.eval.ablation import METHODS
from piaa_index.shapes.dataset import generate_dataset


def run(args: list[str]):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, args, catch_exceptions=False)


@pytest.fixture
def model_args(tiny_model_config: Path) -> list[str]:
    return ["-q", "--model", str(tiny_model_config), "--pretrained", "none"]


def test_eval_reports_the_ablation_and_never_touches_the_user_library(tmp_path, model_args):
    """The JSON has mAP/CF1/OF1 for cls, patch-text, pvcl, piaa; the fit split's labels are
    never needed (we delete them), and the user's own library keeps its vocabulary."""
    test_dir = generate_dataset(tmp_path / "test", 24, seed=1, size=64, progress=False)
    fit_dir = generate_dataset(tmp_path / "fit", 24, seed=2, size=64, progress=False)
    (fit_dir / "labels.txt").write_text(
        "\n".join(f"images/{p.name}" for p in sorted((fit_dir / "images").iterdir())) + "\n"
    )
    assert run([*model_args, "vocab", "set", "dog"]).exit_code == 0

    result = run([*model_args, "eval", str(test_dir), "--fit", str(fit_dir), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["results"]) == set(METHODS)
    for method in METHODS:
        r = report["results"][method]
        assert 0.0 <= r["mAP"] <= 100.0 and 0.0 <= r["CF1"] <= 100.0 and 0.0 <= r["OF1"] <= 100.0
    classes = json.loads((test_dir / "classes.json").read_text())
    assert set(report["per_class_AP"]["piaa"]) == set(classes)
    assert report["dataset"]["fit"]["images"] == 24 and report["dataset"]["test"]["images"] == 24

    assert json.loads(run([*model_args, "vocab", "list", "--json"]).output)["labels"] == ["dog"]

    # A second run reuses the evaluation's index: nothing is encoded again.
    again = json.loads(
        run([*model_args, "eval", str(test_dir), "--fit", str(fit_dir), "--json"]).output
    )
    assert again["index"]["test"]["indexed"] == 0 and again["index"]["test"]["unchanged"] == 24
    assert again["results"] == report["results"]

    # The open-world protocol: labels fitted alone score as under the full vocabulary, and
    # removing a label changes no other label's tags; the user's vocabulary is still untouched.
    args = ["eval", str(test_dir), "--fit", str(fit_dir), "--vocab-size", "3"]
    ow = json.loads(run([*model_args, *args, "--vocab-draws", "2", "--json"]).output)["open_world"]
    assert ow["vocab_size"] == 3 and len(ow["draws"]) == 2 and len(ow["removal"]) == 2
    for draw in ow["draws"]:
        assert len(draw["labels"]) == 3
        if draw["status_changed"] == 0:  # a random model: the pooled level may move a status
            assert draw["mAP"] == draw["mAP_full"] and draw["OF1"] == draw["OF1_full"]
    assert all(r["tags_changed"] == 0 for r in ow["removal"] if r["status_changed"] == 0)
    assert json.loads(run([*model_args, "vocab", "list", "--json"]).output)["labels"] == ["dog"]
    too_many = run([*model_args, *args[:-1], "99"])
    assert too_many.exit_code == 2 and "99 is more than the 24 classes" in too_many.output


def test_eval_reads_a_voc_folder(tmp_path, model_args):
    """A VOCdevkit/VOC2007 tree with ImageSets/Main is evaluated on its 20 classes."""
    year = tmp_path / "VOCdevkit" / "VOC2007"
    names = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
             "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
             "train", "tvmonitor"]  # fmt: skip
    ids = [f"{i:06d}" for i in range(1, 9)]
    (year / "JPEGImages").mkdir(parents=True)
    for k, image_id in enumerate(ids):
        Image.new("RGB", (80, 60), (30 * k, 100, 200 - 20 * k)).save(
            year / "JPEGImages" / f"{image_id}.jpg"
        )
    main = year / "ImageSets" / "Main"
    main.mkdir(parents=True)
    for c, name in enumerate(names):
        lines = [f"{image_id} {1 if (k + c) % 4 == 0 else -1}" for k, image_id in enumerate(ids)]
        (main / f"{name}_test.txt").write_text("\n".join(lines) + "\n")
    result = run([*model_args, "eval", str(tmp_path / "VOCdevkit"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["dataset"]["test"]["layout"] == "voc"
    assert report["dataset"]["classes"][10] == "dining table"
    assert report["dataset"]["test"]["images"] == 8


def test_eval_on_a_folder_that_is_no_dataset_exits_2(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"")
    from piaa_index.cli.common import run_guarded

    with pytest.raises(SystemExit) as exit_info:
        run_guarded(cli, ["eval", str(tmp_path)])
    assert exit_info.value.code == 2


def test_default_bank_size_keeps_the_papers_proportion():
    """Benchmark-sized pools get the paper's K = 512; small libraries a bank ≤ 1/100 of the pool,
    whatever the vocabulary (open world); the paper's rows keep ≤ 1/50 per class."""
    from piaa_index.library.core import default_bank_size
    from piaa_index.method.pvcl import paper_bank_size

    assert default_bank_size(5000 * 196) == 512  # VOC07 train with ViT-B/16
    assert default_bank_size(400 * 64) == 256  # a 400-image ShapesWorld library
    assert default_bank_size(10) == 16  # never below the floor
    assert paper_bank_size(5000 * 196, 20) == 512
    assert paper_bank_size(400 * 64, 24) == 21
    assert paper_bank_size(10, 80) == 16


def test_eval_with_keywords_adds_the_learned_row_and_head_medium_tail(tmp_path, model_args):
    """`piaa shapes keywords` makes the user's keywords for half the fit images; `eval --labels`
    learns from them and reports the learned row beside piaa, and mAP by label frequency."""
    test_dir = generate_dataset(tmp_path / "test", 40, seed=1, size=64, progress=False)
    fit_dir = generate_dataset(tmp_path / "fit", 60, seed=2, size=64, progress=False)
    keywords = tmp_path / "kw.csv"
    made = run(["shapes", "keywords", str(fit_dir), "--fraction", "0.5", "-o", str(keywords)])
    assert made.exit_code == 0, made.output
    rows = keywords.read_text().splitlines()
    assert rows[0] == "path,label" and len({r.split(",")[0] for r in rows[1:]}) == 30

    args = [*model_args, "eval", str(test_dir), "--fit", str(fit_dir), "--labels", str(keywords)]
    report = json.loads(run([*args, "--json"]).output)
    assert set(report["results"]) == {*METHODS, "learned"}
    learning = report["learning"]
    assert learning["labelled_images"] == 30
    for name, rec in learning["labels"].items():
        assert (name in learning["learnt"]) == (rec["used"] == "learnt")
    freq = report["by_frequency"]
    assert set(freq["groups"]) == {"head", "medium", "tail"}
    held = {n for g in freq["groups"].values() for n in g}
    assert held == {n for n, ap in report["per_class_AP"]["piaa"].items() if ap is not None}
    heads, tails = freq["groups"]["head"].values(), freq["groups"]["tail"].values()
    assert min(heads) >= max(tails)
    table = run(args).output
    assert "| learned |" in table and "mAP tail" in table
