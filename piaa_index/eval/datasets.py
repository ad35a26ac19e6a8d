"""Labelled evaluation datasets: our own layout, PASCAL VOC, COCO 2014 and NUS-WIDE."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from piaa_index.errors import UsageError
from piaa_index.library.presets import preset_classes

__all__ = [
    "LAYOUTS",
    "Dataset",
    "DatasetError",
    "Item",
    "load_dataset",
    "missing_files",
    "parse_label_line",
]

LAYOUTS: tuple[str, ...] = ("ours", "voc", "coco", "nus")

_LOOKED_FOR = (
    "  - ours: classes.json + labels.txt\n"
    "  - coco: annotations/instances_<split>2014.json (images in <split>2014/)\n"
    "  - nus:  Flickr/ and/or a label list such as nuswideval_labels.txt\n"
    "  - voc:  VOCdevkit/VOC<year>/, VOC<year>/ or a year folder with ImageSets/Main/ or "
    "Annotations/ (images in JPEGImages/)"
)
_INT = re.compile(r"[+-]?\d+")


class DatasetError(UsageError, ValueError):
    """A dataset folder that cannot be read: unknown layout, missing or malformed label files."""


@dataclass(frozen=True)
class Item:
    """One image: its absolute path and the ids of the labels present."""

    path: Path
    labels: frozenset[int] = field(default_factory=frozenset)


@dataclass
class Dataset:
    """A labelled image list with its class names, in label-id order."""

    name: str
    layout: str
    root: Path
    classes: list[str]
    items: list[Item]

    def __len__(self) -> int:
        """Number of images."""
        return len(self.items)

    def targets(self) -> np.ndarray:
        """Ground truth as a bool matrix [N, C]."""
        t = np.zeros((len(self.items), len(self.classes)), dtype=bool)
        for i, item in enumerate(self.items):
            t[i, sorted(item.labels)] = True
        return t


def missing_files(dataset: Dataset) -> list[Item]:
    """Items whose image file does not exist."""
    return [item for item in dataset.items if not item.path.is_file()]


def parse_label_line(line: str) -> tuple[str, list[int]]:
    """Split `key id id ...` into the key and its ids, taking integers from the right."""
    # Splitting from the right keeps a key with spaces intact; the first token is always the key,
    # so a purely numeric key (VOC `000001`) is never mistaken for a label id.
    rest, ids = line.strip(), []
    while True:
        parts = rest.rsplit(maxsplit=1)
        if len(parts) < 2 or not _INT.fullmatch(parts[1]):
            break
        ids.append(int(parts[1]))
        rest = parts[0]
    return rest, ids[::-1]


def load_dataset(root: Path | str, split: str | None = None) -> Dataset:
    """Read the labelled dataset in `root`, detecting its layout (see `LAYOUTS`)."""
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist or is not a folder")
    if (root / "classes.json").is_file() and (root / "labels.txt").is_file():
        return _load_ours(root, split)
    if _coco_annotation_files(root):
        return _load_coco(root, split)
    if (root / "Flickr").is_dir() or _nus_label_files(root):
        return _load_nus(root, split)
    voc_dirs = _voc_year_dirs(root)
    if voc_dirs:
        if len(voc_dirs) > 1:
            names = ", ".join(str(d) for d in voc_dirs)
            raise DatasetError(
                f"{root} holds several VOC years ({names}); pass the year folder as the root"
            )
        return _load_voc(voc_dirs[0], split)
    raise DatasetError(f"no known dataset layout in {root}; looked for:\n{_LOOKED_FOR}")


# ---------------------------------------------------------------------------- helpers


def _read_lines(path: Path) -> Iterable[tuple[int, str]]:
    """Yield (1-based line number, stripped line) for the non-blank lines of a text file."""
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line:
                yield n, line


def _read_label_list(path: Path, n_classes: int) -> list[tuple[str, frozenset[int]]]:
    """Read a `key id id ...` file, checking ids against the number of classes."""
    rows = []
    for n, line in _read_lines(path):
        key, ids = parse_label_line(line)
        bad = [i for i in ids if not 0 <= i < n_classes]
        if bad:
            raise DatasetError(
                f"{path}:{n}: label id(s) {bad} out of range for {n_classes} classes"
            )
        rows.append((key, frozenset(ids)))
    if not rows:
        raise DatasetError(f"{path} lists no images")
    return rows


def _read_json(path: Path) -> object:
    """json.load with a DatasetError naming the file on failure."""
    try:
        with path.open(encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read {path}: {e}") from e


# ---------------------------------------------------------------------------- ours


def _load_ours(root: Path, split: str | None) -> Dataset:
    """Our own layout: classes.json (list of names) + labels.txt (`rel/path.png 3 7`)."""
    if split is not None:
        raise DatasetError(f"{root} is in our own layout, which has no splits (got {split!r})")
    classes = _read_json(root / "classes.json")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DatasetError(f"{root / 'classes.json'} must be a JSON list of class names")
    if len(set(classes)) != len(classes):
        raise DatasetError(f"{root / 'classes.json'} repeats class names")
    rows = _read_label_list(root / "labels.txt", len(classes))
    items = [Item(root / rel, labels) for rel, labels in rows]
    return Dataset(root.name, "ours", root, list(classes), items)


# ---------------------------------------------------------------------------- COCO


def _coco_annotation_files(root: Path) -> list[Path]:
    """COCO instance annotation files under root/annotations."""
    ann = root / "annotations"
    return sorted(ann.glob("instances_*.json")) if ann.is_dir() else []


def _load_coco(root: Path, split: str | None) -> Dataset:
    """COCO: annotations/instances_<split>2014.json + <split>2014/ images."""
    split = split or "val"
    # `val` means the paper's COCO 2014; an explicit `val2017` still works.
    tag = split if re.search(r"\d{4}$", split) else f"{split}2014"
    path = root / "annotations" / f"instances_{tag}.json"
    if not path.is_file():
        found = ", ".join(p.name for p in _coco_annotation_files(root))
        raise DatasetError(f"COCO annotations {path} not found (found: {found})")
    data = _read_json(path)
    if not isinstance(data, dict) or not {"images", "categories"} <= data.keys():
        raise DatasetError(f"{path} is not a COCO instances file (no images/categories)")
    cats = sorted(data["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    image_labels: dict[int, set[int]] = {img["id"]: set() for img in data["images"]}
    for ann in data.get("annotations", []):
        try:
            image_labels[ann["image_id"]].add(cat_index[ann["category_id"]])
        except KeyError as e:
            raise DatasetError(
                f"{path}: annotation {ann.get('id')} refers to unknown image or category {e}"
            ) from None
    items = [
        Item(root / tag / img["file_name"], frozenset(image_labels[img["id"]]))
        for img in data["images"]
    ]
    return Dataset(f"coco-{tag}", "coco", root, [c["name"] for c in cats], items)


# ---------------------------------------------------------------------------- NUS-WIDE


def _nus_label_files(root: Path) -> list[Path]:
    """NUS-WIDE label lists directly in root (nuswide*labels.txt, nus_wide*labels.txt)."""
    return sorted(
        p for p in root.glob("*labels.txt") if p.name.lower().startswith(("nuswide", "nus_wide"))
    )


def _nus_label_file(root: Path, split: str | None) -> Path:
    """Pick the label list: the default test list, or the one named by `split`."""
    if split is None:
        for name in ("nuswideval_labels.txt", "nus_wide_test_labels.txt"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.glob("*labels.txt"))
    else:
        direct = root / split  # also an absolute path, since root / "/abs" == "/abs"
        if direct.is_file():
            return direct
        for name in (f"nuswide{split}_labels.txt", f"nus_wide_{split}_labels.txt"):
            if (root / name).is_file():
                return root / name
        found = sorted(root.glob(f"*{split}*labels.txt"))
    if len(found) == 1:
        return found[0]
    what = "default" if split is None else repr(split)
    listed = ", ".join(p.name for p in found) or "none"
    raise DatasetError(
        f"NUS-WIDE folder {root}: no unique label list for split {what} "
        f"(expected nuswideval_labels.txt or nus_wide_test_labels.txt; *labels.txt found: {listed})"
    )


def _load_nus(root: Path, split: str | None) -> Dataset:
    """NUS-WIDE: Flickr/<category>/<name>.jpg with a `<category>/<name> id id` list."""
    path = _nus_label_file(root, split)
    classes = preset_classes("nus")
    items = []
    for key, labels in _read_label_list(path, len(classes)):
        key = key.replace("\\", "/").removeprefix("Flickr/")
        if not key.lower().endswith(".jpg"):
            key += ".jpg"
        items.append(Item(root / "Flickr" / key, labels))
    name = path.name.removesuffix(".txt").removesuffix("_labels")
    return Dataset(f"nus-wide-{name}", "nus", root, classes, items)


# ---------------------------------------------------------------------------- PASCAL VOC


def _is_voc_year_dir(d: Path) -> bool:
    """Whether d looks like VOCdevkit/VOC<year>."""
    return (d / "ImageSets" / "Main").is_dir() or (d / "Annotations").is_dir()


def _voc_year_dirs(root: Path) -> list[Path]:
    """VOC year folders at root, below it (root = VOCdevkit) or below root/VOCdevkit."""
    if _is_voc_year_dir(root):
        return [root]
    for base in (root, root / "VOCdevkit"):
        if base.is_dir():
            years = sorted(d for d in base.glob("VOC*") if d.is_dir() and _is_voc_year_dir(d))
            if years:
                return years
    return []


def _voc_names() -> list[str]:
    """VOC folder/XML class names in the preset order (`dining table` -> `diningtable`)."""
    return [c.replace(" ", "") for c in preset_classes("voc")]


def _read_id_list(path: Path) -> list[str]:
    """Image ids of an ImageSets/Main/<split>.txt file (first token a line)."""
    return [line.split()[0] for _, line in _read_lines(path)]


def _load_voc(year_dir: Path, split: str | None) -> Dataset:
    """PASCAL VOC 2007/2012 from ImageSets/Main/<class>_<split>.txt, else Annotations/*.xml."""
    main = year_dir / "ImageSets" / "Main"
    voc_names = _voc_names()
    explicit = split is not None
    if split is None:
        # VOC 2007 is evaluated on `test`; VOC 2012 test labels are not public, so use `val`.
        split = "test" if (main / f"{voc_names[0]}_test.txt").is_file() else "val"
    class_files = [main / f"{name}_{split}.txt" for name in voc_names]
    present = [p for p in class_files if p.is_file()]
    if present:
        if len(present) != len(class_files):
            missing = ", ".join(p.name for p in class_files if not p.is_file())
            raise DatasetError(f"VOC folder {main} lacks {missing}")
        labels = _voc_labels_from_imagesets(main, split, class_files)
    elif (year_dir / "Annotations").is_dir():
        split_list = main / f"{split}.txt"
        if not split_list.is_file():
            if explicit:
                raise DatasetError(f"VOC folder {year_dir}: no split list {split_list}")
            split = "all"  # no ImageSets at all: every annotated image is used
        labels = _voc_labels_from_xml(year_dir, split_list)
    else:
        raise DatasetError(
            f"VOC folder {year_dir}: no ImageSets/Main/*_{split}.txt or Annotations/"
        )
    jpegs = year_dir / "JPEGImages"
    items = [Item(jpegs / f"{image_id}.jpg", frozenset(ls)) for image_id, ls in labels.items()]
    year = year_dir.name.removeprefix("VOC").lower() or year_dir.name
    return Dataset(f"voc{year}-{split}", "voc", year_dir, preset_classes("voc"), items)


def _voc_labels_from_imagesets(
    main: Path, split: str, class_files: list[Path]
) -> dict[str, set[int]]:
    """Labels from per-class files: 1 present, 0 difficult (counted as present), -1 absent."""
    split_list = main / f"{split}.txt"
    labels: dict[str, set[int]] = {}
    if split_list.is_file():
        labels = {image_id: set() for image_id in _read_id_list(split_list)}
    for c, path in enumerate(class_files):
        for n, line in _read_lines(path):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("1", "0", "-1"):
                raise DatasetError(f"{path}:{n}: expected `<image id> 1|0|-1`, got {line!r}")
            image_ids = labels.setdefault(parts[0], set())
            if parts[1] != "-1":
                image_ids.add(c)
    return labels


def _voc_labels_from_xml(year_dir: Path, split_list: Path) -> dict[str, set[int]]:
    """Labels from Annotations/<id>.xml object names, difficult objects included."""
    ann_dir = year_dir / "Annotations"
    if split_list.is_file():
        image_ids = _read_id_list(split_list)
    else:
        image_ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not image_ids:
            raise DatasetError(f"VOC folder {year_dir}: Annotations/ holds no .xml files")
    index = {name: c for c, name in enumerate(_voc_names())}
    index.update({name: c for c, name in enumerate(preset_classes("voc"))})
    labels: dict[str, set[int]] = {}
    for image_id in image_ids:
        path = ann_dir / f"{image_id}.xml"
        try:
            tree = ET.parse(path)
        except (OSError, ET.ParseError) as e:
            raise DatasetError(f"cannot read VOC annotation {path}: {e}") from e
        found = set()
        for obj in tree.getroot().iter("object"):
            name = (obj.findtext("name") or "").strip().lower()
            if name not in index:
                raise DatasetError(f"{path}: unknown VOC class {name!r}")
            found.add(index[name])
        labels[image_id] = found
    return labels


def keyword_rows(dataset: Dataset, fraction: float, seed: int = 0) -> dict[str, list[str]]:
    """A random `fraction` of the dataset's images with their ground-truth labels by path: the
    keywords a user would have for part of a collection (`piaa shapes keywords`)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], not {fraction}")
    rng = np.random.default_rng(seed)
    n = max(1, int(round(fraction * len(dataset.items))))
    pick = sorted(int(i) for i in rng.choice(len(dataset.items), n, replace=False))
    return {
        str(dataset.items[i].path): [dataset.classes[c] for c in sorted(dataset.items[i].labels)]
        for i in pick
    }
