"""Tests for piaa_index.eval.datasets on tiny hand-made folders of each layout."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.eval.datasets import (
    Dataset,
    DatasetError,
    Item,
    load_dataset,
    missing_files,
    parse_label_line,
)
from piaa_index.library.presets import PRESETS, preset_classes

VOC_FOLDER_NAMES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
]  # fmt: skip
# COCO category ids run 1..90 with these ten unused.
COCO_UNUSED_IDS = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
BENCHMARK = Path("/work/shared/data/benchmark-labels")


def write_jpeg(path: Path) -> None:
    """Write a tiny JPEG, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (200, 30, 30)).save(path, "JPEG")


def write(path: Path, text: str) -> None:
    """Write a text file, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def as_dict(ds: Dataset) -> dict[Path, set[int]]:
    """Map image path to label set."""
    return {item.path: set(item.labels) for item in ds.items}


# ---------------------------------------------------------------------------- presets


def test_presets():
    assert PRESETS == ("voc", "coco", "nus")
    assert [len(preset_classes(n)) for n in PRESETS] == [20, 80, 81]
    assert preset_classes("voc")[10] == "dining table"
    with pytest.raises(ValueError, match="unknown class preset 'imagenet'.*voc, coco, nus"):
        preset_classes("imagenet")


# ---------------------------------------------------------------------------- label lines


@pytest.mark.parametrize(
    ("line", "key", "ids"),
    [
        ("a/b.png 3 7\n", "a/b.png", [3, 7]),
        ("img.png", "img.png", []),
        ("my photo 2.png 0", "my photo 2.png", [0]),
        ("000001 11 14", "000001", [11, 14]),
        ("000001", "000001", []),
    ],
)
def test_parse_label_line(line, key, ids):
    assert parse_label_line(line) == (key, ids)


# ---------------------------------------------------------------------------- ours


def make_ours(root: Path) -> None:
    """Three images, one in a subfolder with a space in its name, one unlabelled."""
    write(root / "classes.json", json.dumps(["circle", "square", "red"]))
    write(root / "labels.txt", "a.png 0 2\n\nsub/b c.png 1\r\nempty.png\n")
    for rel in ("a.png", "sub/b c.png"):  # empty.png deliberately missing
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4)).save(root / rel)


def test_ours(tmp_path):
    make_ours(tmp_path)
    ds = load_dataset(str(tmp_path))
    root = tmp_path.resolve()
    assert (ds.layout, ds.root, ds.name) == ("ours", root, tmp_path.name)
    assert ds.classes == ["circle", "square", "red"]
    assert ds.items == [
        Item(root / "a.png", frozenset({0, 2})),
        Item(root / "sub" / "b c.png", frozenset({1})),
        Item(root / "empty.png", frozenset()),
    ]
    assert all(item.path.is_absolute() for item in ds.items)
    np.testing.assert_array_equal(
        ds.targets(), [[True, False, True], [False, True, False], [False, False, False]]
    )
    assert ds.targets().dtype == bool and len(ds) == 3
    assert missing_files(ds) == [ds.items[2]]


def test_ours_errors(tmp_path):
    make_ours(tmp_path)
    with pytest.raises(DatasetError, match="no splits"):
        load_dataset(tmp_path, split="val")
    write(tmp_path / "labels.txt", "a.png 0\nb.png 3\n")
    with pytest.raises(DatasetError, match=r"labels.txt:2: .*\[3\] out of range for 3 classes"):
        load_dataset(tmp_path)
    write(tmp_path / "classes.json", json.dumps({"voc": ["a"]}))
    with pytest.raises(DatasetError, match="JSON list"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------- VOC


VOC_IMAGES = {
    # id: {folder class name: 1 present / 0 difficult}
    "000001": {"dog": 1, "person": 0},
    "000002": {},
    "000004": {"aeroplane": 1, "tvmonitor": 1, "diningtable": 1},
}


def make_voc_imagesets(year_dir: Path, split: str, images: dict[str, dict[str, int]]) -> None:
    """Per-class ImageSets/Main files plus the split list, and the JPEGs."""
    main = year_dir / "ImageSets" / "Main"
    write(main / f"{split}.txt", "".join(f"{i}\n" for i in images))
    for name in VOC_FOLDER_NAMES:
        # VOC's own `%s %2d` formatting: "000001  1", "000001 -1"
        lines = [f"{i} {images[i].get(name, -1):2d}\n" for i in images]
        write(main / f"{name}_{split}.txt", "".join(lines))
    for i in images:
        write_jpeg(year_dir / "JPEGImages" / f"{i}.jpg")


VOC_EXPECTED = {"000001": {11, 14}, "000002": set(), "000004": {0, 19, 10}}


@pytest.mark.parametrize("level", ["parent", "devkit", "year"])
def test_voc_imagesets_from_any_root_level(tmp_path, level):
    year_dir = tmp_path / "VOCdevkit" / "VOC2007"
    make_voc_imagesets(year_dir, "test", VOC_IMAGES)
    make_voc_imagesets(year_dir, "val", {"000009": {"cat": 1}})
    root = {"parent": tmp_path, "devkit": tmp_path / "VOCdevkit", "year": year_dir}[level]
    ds = load_dataset(root)
    year_dir = year_dir.resolve()
    assert (ds.layout, ds.root, ds.name) == ("voc", year_dir, "voc2007-test")
    assert ds.classes == preset_classes("voc")
    assert [item.path for item in ds.items] == [
        year_dir / "JPEGImages" / f"{i}.jpg" for i in ("000001", "000002", "000004")
    ]
    assert [set(item.labels) for item in ds.items] == list(VOC_EXPECTED.values())
    assert missing_files(ds) == []

    val = load_dataset(root, split="val")
    assert val.name == "voc2007-val"
    assert val.items == [Item(year_dir / "JPEGImages" / "000009.jpg", frozenset({7}))]


def test_voc_default_split_is_val_without_test_files(tmp_path):
    year_dir = tmp_path / "VOC2012"
    make_voc_imagesets(year_dir, "val", VOC_IMAGES)
    ds = load_dataset(tmp_path)
    assert ds.name == "voc2012-val"
    assert {p.name: ls for p, ls in as_dict(ds).items()} == {
        f"{i}.jpg": ls for i, ls in VOC_EXPECTED.items()
    }


def test_voc_incomplete_imagesets(tmp_path):
    year_dir = tmp_path / "VOC2007"
    make_voc_imagesets(year_dir, "test", VOC_IMAGES)
    (year_dir / "ImageSets" / "Main" / "sofa_test.txt").unlink()
    with pytest.raises(DatasetError, match="lacks sofa_test.txt"):
        load_dataset(year_dir)


def voc_xml(objects: list[tuple[str, int]]) -> str:
    """A VOC annotation with the given (name, difficult) objects."""
    objs = "".join(
        f"<object><name>{n}</name><pose>Unspecified</pose><truncated>0</truncated>"
        f"<difficult>{d}</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax>"
        f"<ymax>3</ymax></bndbox></object>"
        for n, d in objects
    )
    return f"<annotation><folder>VOC2012</folder><filename>x.jpg</filename>{objs}</annotation>"


def test_voc_from_xml_annotations(tmp_path):
    year_dir = tmp_path / "VOCdevkit" / "VOC2012"
    write(year_dir / "Annotations" / "2008_000002.xml", voc_xml([("motorbike", 0)]))
    write(
        year_dir / "Annotations" / "2008_000001.xml",
        voc_xml([("diningtable", 0), ("pottedplant", 1), ("diningtable", 0), (" person ", 0)]),
    )
    write(year_dir / "Annotations" / "2008_000003.xml", voc_xml([]))
    ds = load_dataset(tmp_path / "VOCdevkit")
    year_dir = year_dir.resolve()
    assert (ds.layout, ds.name, ds.classes) == ("voc", "voc2012-all", preset_classes("voc"))
    assert ds.items == [
        Item(year_dir / "JPEGImages" / "2008_000001.jpg", frozenset({10, 15, 14})),
        Item(year_dir / "JPEGImages" / "2008_000002.jpg", frozenset({13})),
        Item(year_dir / "JPEGImages" / "2008_000003.jpg", frozenset()),
    ]
    assert len(missing_files(ds)) == 3

    # a split list without per-class files restricts the XML images to that split
    write(year_dir / "ImageSets" / "Main" / "val.txt", "2008_000002\n")
    ds = load_dataset(year_dir, split="val")
    assert ds.name == "voc2012-val"
    assert ds.items == [Item(year_dir / "JPEGImages" / "2008_000002.jpg", frozenset({13}))]
    with pytest.raises(DatasetError, match="no split list"):
        load_dataset(year_dir, split="trainval")

    write(year_dir / "Annotations" / "2008_000002.xml", voc_xml([("unicorn", 0)]))
    with pytest.raises(DatasetError, match="unknown VOC class 'unicorn'"):
        load_dataset(year_dir, split="val")


def test_voc_several_years_is_ambiguous(tmp_path):
    make_voc_imagesets(tmp_path / "VOCdevkit" / "VOC2007", "test", VOC_IMAGES)
    make_voc_imagesets(tmp_path / "VOCdevkit" / "VOC2012", "val", VOC_IMAGES)
    with pytest.raises(DatasetError, match="several VOC years"):
        load_dataset(tmp_path)
    assert load_dataset(tmp_path / "VOCdevkit" / "VOC2012").name == "voc2012-val"


# ---------------------------------------------------------------------------- COCO


def make_coco(root: Path) -> None:
    """instances_val2014.json: all 80 categories (shuffled), 3 images, 5 annotations."""
    names = iter(preset_classes("coco"))
    cats = [
        {"id": i, "name": next(names), "supercategory": "x"}
        for i in range(1, 91)
        if i not in COCO_UNUSED_IDS
    ]
    random.Random(0).shuffle(cats)  # order must come from the ids, not the file
    data = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "width": 4, "height": 4},
            {"id": 7, "file_name": "COCO_val2014_000000000007.jpg", "width": 4, "height": 4},
            {"id": 100, "file_name": "COCO_val2014_000000000100.jpg", "width": 4, "height": 4},
        ],
        "annotations": [
            {"id": 1, "image_id": 42, "category_id": 1, "iscrowd": 0},
            {"id": 2, "image_id": 42, "category_id": 1, "iscrowd": 1},
            {"id": 3, "image_id": 42, "category_id": 18, "iscrowd": 0},
            {"id": 4, "image_id": 7, "category_id": 90, "iscrowd": 0},
            {"id": 5, "image_id": 7, "category_id": 13, "iscrowd": 0},
        ],
        "categories": cats,
    }
    write(root / "annotations" / "instances_val2014.json", json.dumps(data))
    write_jpeg(root / "val2014" / "COCO_val2014_000000000042.jpg")
    write_jpeg(root / "val2014" / "COCO_val2014_000000000007.jpg")


def test_coco(tmp_path):
    make_coco(tmp_path)
    ds = load_dataset(tmp_path)
    root = tmp_path.resolve()
    assert (ds.layout, ds.root, ds.name) == ("coco", root, "coco-val2014")
    # COCO categories ordered by id are exactly the "coco" preset
    assert ds.classes == preset_classes("coco")
    img = root / "val2014"
    assert ds.items == [
        Item(img / "COCO_val2014_000000000042.jpg", frozenset({0, 16})),  # person, dog
        Item(img / "COCO_val2014_000000000007.jpg", frozenset({79, 11})),  # toothbrush, stop sign
        Item(img / "COCO_val2014_000000000100.jpg", frozenset()),
    ]
    assert ds.classes[16] == "dog" and ds.classes[11] == "stop sign"
    assert missing_files(ds) == [ds.items[2]]
    assert ds.targets().sum() == 4


def test_coco_errors(tmp_path):
    make_coco(tmp_path)
    with pytest.raises(DatasetError, match=r"instances_train2014.json not found .*val2014"):
        load_dataset(tmp_path, split="train")
    path = tmp_path / "annotations" / "instances_val2014.json"
    data = json.loads(path.read_text())
    data["annotations"].append({"id": 6, "image_id": 42, "category_id": 12})
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="annotation 6 refers to unknown"):
        load_dataset(tmp_path)


# ---------------------------------------------------------------------------- NUS-WIDE


NUS_LINES = "restaurant/0346_1766455331 5 13 49 55\nmountain/0452_1365218963 13 30\nsky/0001_1 \n"


def test_nus(tmp_path):
    write(tmp_path / "nuswideval_labels.txt", NUS_LINES)
    write_jpeg(tmp_path / "Flickr" / "restaurant" / "0346_1766455331.jpg")
    write_jpeg(tmp_path / "Flickr" / "mountain" / "0452_1365218963.jpg")
    ds = load_dataset(tmp_path)
    flickr = tmp_path.resolve() / "Flickr"
    assert (ds.layout, ds.name) == ("nus", "nus-wide-nuswideval")
    assert ds.classes == preset_classes("nus")
    assert ds.items == [
        Item(flickr / "restaurant" / "0346_1766455331.jpg", frozenset({5, 13, 49, 55})),
        Item(flickr / "mountain" / "0452_1365218963.jpg", frozenset({13, 30})),
        Item(flickr / "sky" / "0001_1.jpg", frozenset()),
    ]
    assert missing_files(ds) == [ds.items[2]]


def test_nus_label_file_choice(tmp_path):
    (tmp_path / "Flickr").mkdir()
    with pytest.raises(DatasetError, match="no unique label list.*found: none"):
        load_dataset(tmp_path)
    write(tmp_path / "nus_wide_test_labels.txt", "a/b 1\n")
    write(tmp_path / "nus_wide_train_labels.txt", "c/d 2\n")
    assert load_dataset(tmp_path).items[0].labels == {1}
    assert load_dataset(tmp_path, split="train").items[0].path.name == "d.jpg"
    assert load_dataset(tmp_path, split="nus_wide_train_labels.txt").items[0].labels == {2}
    other = tmp_path / "elsewhere" / "mine_labels.txt"
    write(other, "Flickr/e/f.jpg 80\n")
    item = load_dataset(tmp_path, split=str(other)).items[0]
    assert (item.path, item.labels) == (tmp_path.resolve() / "Flickr/e/f.jpg", {80})
    write(other, "e/f 81\n")
    with pytest.raises(DatasetError, match="out of range for 81 classes"):
        load_dataset(tmp_path, split=str(other))


@pytest.mark.skipif(not (BENCHMARK / "nuswideval_labels.txt").is_file(), reason="no benchmark")
def test_nus_reads_the_benchmark_label_file(tmp_path):
    (tmp_path / "Flickr").mkdir()
    ds = load_dataset(tmp_path, split=str(BENCHMARK / "nuswideval_labels.txt"))
    first = ds.items[0]
    assert first.path == tmp_path.resolve() / "Flickr/restaurant/0346_1766455331.jpg"
    assert first.labels == {5, 13, 49, 55}
    assert len(ds) > 10_000 and ds.targets().shape == (len(ds), 81)


@pytest.mark.skipif(not (BENCHMARK / "classes.json").is_file(), reason="no benchmark")
def test_shipped_presets_match_the_benchmark_classes():
    bench = json.loads((BENCHMARK / "classes.json").read_text())
    assert {n: preset_classes(n) for n in PRESETS} == bench


# ---------------------------------------------------------------------------- unknown


def test_unknown_folder_lists_the_layouts(tmp_path):
    write_jpeg(tmp_path / "photo.jpg")
    with pytest.raises(DatasetError) as e:
        load_dataset(tmp_path)
    for what in ("ours", "classes.json", "coco", "instances_", "nus", "Flickr", "voc", "VOC"):
        assert what in str(e.value)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
