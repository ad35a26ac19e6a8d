"""`piaa labels import xmp` (piaa_index/xmp/keywords.py): the user's own keywords from XMP
sidecars and embedded XMP/IPTC, mapped to vocabulary labels, ours left out.

Sidecars and embedded metadata are written by exiftool as Lightroom and digiKam leave them; a
previous `piaa export xmp` writes ours. One small library is indexed once with the shipped
shapesworld model; each test copies its database and works in its own folder of images (the
PATH it imports), so the tests do not see each other's sidecars.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from piaa_index.xmp.sidecars import Sidecars
from tests.cli_main import run_main
from tests.shapes_library import SHAPESWORLD_DIR, open_shapes_library
from tests.xmp_files import exiftool

VOCABULARY = ["dog", "cat", "tree", "boat", "person", "car"]
FOLDERS = {  # test folder → its images
    "lightroom": ["IMG_0001.jpg", "IMG_0002.jpg", "IMG_0003.jpg"],
    "digikam": ["DSC_0001.jpg", "DSC_0002.jpg"],
    "ours": ["IMG_0010.jpg", "IMG_0011.jpg"],
    "embedded": ["IMG_0020.jpg", "IMG_0021.jpg"],
    "corrupt": ["IMG_0030.jpg", "IMG_0031.jpg", "IMG_0032.jpg", "IMG_0033.jpg"],
    "complete": ["IMG_0040.jpg", "IMG_0041.jpg", "IMG_0042.jpg"],
}


def _jpeg(path: Path, shade: int, **save: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (shade % 256, (shade * 7) % 256, 90)).save(path, "JPEG", **save)


def _need_model() -> None:
    if not (SHAPESWORLD_DIR / "shapesworld.safetensors").is_file():
        pytest.skip("the shipped shapesworld checkpoint is not in this checkout")


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(home, images): an indexed library of little JPEGs with VOCABULARY; read only."""
    _need_model()
    root = tmp_path_factory.mktemp("labels-xmp")
    images, home = root / "images", root / "home"
    n = 0
    for folder, names in FOLDERS.items():
        for name in names:
            _jpeg(images / folder / name, n := n + 1)
    with open_shapes_library(home) as library:
        library.index([images])
        library.set_vocabulary(VOCABULARY)
    return home, images


@pytest.fixture
def lib(template: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the template's database (the images stay where they were indexed)."""
    home = tmp_path / "home"
    shutil.copytree(template[0], home)
    return home, template[1]


class Piaa:
    def __init__(self, home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
        self.base = ["--home", str(home), "--model", "shapesworld"]
        self.home, self.monkeypatch, self.capsys = home, monkeypatch, capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        return run_main([*self.base, *args], self.monkeypatch, self.capsys)

    def import_xmp(self, *args: str) -> dict:
        code, out, err = self("labels", "import", "xmp", *args, "--json")
        assert code == 0, err
        return json.loads(out)

    def labels(self) -> dict[str, dict[str, tuple[bool, str]]]:
        """image file name → {label key: (present, source)}, from store.user_labels()."""
        with open_shapes_library(self.home) as library:
            rows = library.store.user_labels()
            paths = library.store.paths(sorted({r[0] for r in rows}))
        out: dict[str, dict[str, tuple[bool, str]]] = {}
        for image_id, key, _name, present, source in rows:
            out.setdefault(Path(paths[image_id]).name, {})[key] = (present, source)
        return out


@pytest.fixture
def piaa(
    lib: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> Iterator[Piaa]:
    yield Piaa(lib[0], monkeypatch, capsys)


def _present(labels: dict[str, tuple[bool, str]]) -> set[str]:
    return {k for k, (present, _) in labels.items() if present}


# -- keyword styles ----------------------------------------------------------------------------


def test_lightroom_sidecars_map_exact_case_folded_and_hierarchy_leaves(
    piaa: Piaa, lib: tuple[Path, Path]
) -> None:
    """Lightroom style (dc:subject with every level, lr:hierarchicalSubject), in IMG.xmp and
    IMG.jpg.xmp: `animals|Dog` is dog (its level `animals` in dc:subject is that keyword, not
    another), `Tree` is tree; unknown keywords are counted, not stored; a re-import after the
    user removed a keyword forgets it."""
    folder = lib[1] / "lightroom"
    exiftool(
        "-q", "-o", folder / "IMG_0001.xmp",
        "-XMP-dc:Subject=animals", "-XMP-dc:Subject=Dog", "-XMP-dc:Subject=places",
        "-XMP-dc:Subject=harbour", "-XMP-dc:Subject=holiday",
        "-XMP-lr:HierarchicalSubject=animals|Dog", "-XMP-lr:HierarchicalSubject=places|harbour",
        "-XMP-lr:HierarchicalSubject=holiday",
    )  # fmt: skip
    exiftool("-q", "-o", folder / "IMG_0002.jpg.xmp", "-XMP-dc:Subject=  Tree ",
             "-XMP-dc:Subject=holiday", "-XMP-xmp:Rating=4")  # fmt: skip
    report = piaa.import_xmp(str(folder))
    assert report["images"] == 3 and report["with_keywords"] == 2 and report["sidecars"] == 2
    assert report["labels"] == {"dog": 1, "tree": 1}
    assert report["unmapped"] == {"holiday": 2, "places|harbour": 1}
    assert report["unreadable"] == [] and report["absent"] == 0
    labels = piaa.labels()
    assert labels == {
        "IMG_0001.jpg": {"dog": (True, "xmp")},
        "IMG_0002.jpg": {"tree": (True, "xmp")},
    }
    # The user took "Tree" off IMG_0002 and tagged it a boat: the next import follows.
    (folder / "IMG_0002.jpg.xmp").unlink()
    exiftool("-q", "-o", folder / "IMG_0002.jpg.xmp", "-XMP-dc:Subject=boat")
    report = piaa.import_xmp(str(folder))
    assert report["forgotten"] == 1
    assert piaa.labels()["IMG_0002.jpg"] == {"boat": (True, "xmp")}


def test_digikam_tagslist_hierarchy(piaa: Piaa, lib: tuple[Path, Path]) -> None:
    """digiKam style: TagsList paths with `/` (and the leaves in dc:subject, the paths in
    hierarchicalSubject, as digiKam writes them all): each keyword counted once."""
    folder = lib[1] / "digikam"
    exiftool(
        "-q", "-o", folder / "DSC_0001.jpg.xmp",
        "-XMP-digiKam:TagsList=Nature/Tree", "-XMP-digiKam:TagsList=Vehicles/Boat",
        "-XMP-digiKam:TagsList=People/Family",
        "-XMP-lr:HierarchicalSubject=Nature|Tree", "-XMP-lr:HierarchicalSubject=Vehicles|Boat",
        "-XMP-lr:HierarchicalSubject=People|Family",
        "-XMP-dc:Subject=Tree", "-XMP-dc:Subject=Boat", "-XMP-dc:Subject=Family",
    )  # fmt: skip
    # A TagsList alone (digiKam set to write only its own list), another level deep.
    exiftool("-q", "-o", folder / "DSC_0002.jpg.xmp", "-XMP-digiKam:TagsList=Pets/Cats/Cat")
    report = piaa.import_xmp(str(folder))
    assert report["labels"] == {"boat": 1, "cat": 1, "tree": 1}
    assert report["unmapped"] == {"People|Family": 1}
    assert {n: _present(v) for n, v in piaa.labels().items()} == {
        "DSC_0001.jpg": {"tree", "boat"},
        "DSC_0002.jpg": {"cat"},
    }


def test_our_keywords_from_a_previous_export_do_not_come_back(
    piaa: Piaa, lib: tuple[Path, Path]
) -> None:
    """A sidecar `piaa export xmp` merged our labels into (with copies of the user's keywords
    in every list): only the user's come back. A sidecar that lost our record (another
    application rewrote it) still keeps `piaa|cat`, `piaa/cat` and its leaf `cat` out."""
    folder = lib[1] / "ours"
    image = folder / "IMG_0010.jpg"
    exiftool(
        "-q", "-o", f"{image}.xmp",
        "-XMP-dc:Subject=dog", "-XMP-dc:Subject=holiday",
        "-XMP-lr:HierarchicalSubject=places|harbour",
    )  # fmt: skip
    with open_shapes_library(piaa.home) as library:
        summary = Sidecars(library.store).export({str(image): ["cat", "car", "dog"]}, [str(image)])
    assert summary.as_dict()["updated"] == 1
    written = json.loads(exiftool("-j", "-XMP:all", f"{image}.xmp"))[0]
    assert "piaa|cat" in written["HierarchicalSubject"] and "cat" in written["Subject"]
    exiftool(
        "-q", "-o", folder / "IMG_0011.jpg.xmp",
        "-XMP-dc:Subject=cat", "-XMP-dc:Subject=Person",
        "-XMP-lr:HierarchicalSubject=piaa|cat", "-XMP-digiKam:TagsList=piaa/cat",
    )  # fmt: skip
    report = piaa.import_xmp(str(folder))
    assert report["labels"] == {"dog": 1, "person": 1}
    assert report["unmapped"] == {"holiday": 1, "places|harbour": 1}
    assert {n: _present(v) for n, v in piaa.labels().items()} == {
        "IMG_0010.jpg": {"dog"},  # the user's own "dog", equal to one of our labels
        "IMG_0011.jpg": {"person"},
    }


def test_embedded_iptc_and_xmp_keywords(piaa: Piaa, lib: tuple[Path, Path]) -> None:
    """Keywords inside the JPEGs: IPTC Keywords (Latin-1, exiftool's default) in one, an
    embedded XMP hierarchicalSubject and IPTC in UTF-8 in the other."""
    folder = lib[1] / "embedded"
    exiftool("-q", "-overwrite_original", "-IPTC:Keywords=Person", "-IPTC:Keywords=Café",
             folder / "IMG_0020.jpg")  # fmt: skip
    exiftool(
        "-q", "-overwrite_original", "-charset", "iptc=UTF8", "-IPTC:CodedCharacterSet=UTF8",
        "-IPTC:Keywords=Ünterwegs", "-XMP-lr:HierarchicalSubject=Transport|Car",
        folder / "IMG_0021.jpg",
    )  # fmt: skip
    report = piaa.import_xmp(str(folder))
    assert report["sidecars"] == 0 and report["embedded"] == 2
    assert report["labels"] == {"car": 1, "person": 1}
    assert report["unmapped"] == {"Café": 1, "Ünterwegs": 1}
    assert {n: _present(v) for n, v in piaa.labels().items()} == {
        "IMG_0020.jpg": {"person"},
        "IMG_0021.jpg": {"car"},
    }


# -- damage, --complete, usage -----------------------------------------------------------------


def test_corrupt_files_are_reported_and_the_run_goes_on(piaa: Piaa, lib: tuple[Path, Path]) -> None:
    folder = lib[1] / "corrupt"
    (folder / "IMG_0030.jpg.xmp").write_bytes(b"\x00\x01 not xml at all")
    (folder / "IMG_0031.xmp").write_text('<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF', "utf-8")
    exiftool("-q", "-o", folder / "IMG_0032.jpg.xmp", "-XMP-dc:Subject=boat")
    damaged = folder / "IMG_0033.jpg"
    kept = damaged.read_bytes()
    try:
        damaged.write_bytes(b"GIF89a" + b"\xff" * 40)  # a broken file where a photo was
        report = piaa.import_xmp(str(folder))
    finally:
        damaged.write_bytes(kept)
    unreadable = {Path(u["path"]).name for u in report["unreadable"]}
    assert unreadable == {"IMG_0030.jpg.xmp", "IMG_0031.xmp", "IMG_0033.jpg"}
    assert all(u["reason"] for u in report["unreadable"])
    assert report["labels"] == {"boat": 1}
    assert piaa.labels() == {"IMG_0032.jpg": {"boat": (True, "xmp")}}
    code, out, err = piaa("labels", "import", "xmp", str(folder))  # the text report
    assert code == 0 and "unreadable: " in err and "IMG_0030.jpg.xmp" in err


def test_complete_stores_every_other_label_absent(piaa: Piaa, lib: tuple[Path, Path]) -> None:
    """--complete: an image with any keyword (even only unmapped ones) gets every vocabulary
    label it lacks as absent; one without keywords gets nothing; a label the user gave with
    `piaa labels set` is not overwritten by an absent one."""
    folder = lib[1] / "complete"
    exiftool("-q", "-o", folder / "IMG_0040.jpg.xmp", "-XMP-dc:Subject=Dog")
    exiftool("-q", "-o", folder / "IMG_0041.jpg.xmp", "-XMP-dc:Subject=holiday")
    code, _, err = piaa("labels", "set", str(folder / "IMG_0040.jpg"), "cat", "yes")
    assert code == 0, err
    report = piaa.import_xmp(str(folder), "--complete")
    assert (report["present"], report["absent"]) == (1, 4 + 6)
    labels = piaa.labels()
    assert labels["IMG_0040.jpg"] == {
        "dog": (True, "xmp"),
        "cat": (True, "cli"),  # the user's word stands
        **{k: (False, "xmp") for k in ("tree", "boat", "person", "car")},
    }
    assert labels["IMG_0041.jpg"] == {k: (False, "xmp") for k in VOCABULARY}
    assert "IMG_0042.jpg" not in labels


def test_usage_errors(piaa: Piaa, lib: tuple[Path, Path], tmp_path: Path) -> None:
    code, _, err = piaa("labels", "import", "xmp", str(tmp_path / "nowhere"))
    assert code == 2 and "no such file or folder" in err
    code, _, err = piaa("labels", "import", "xmp", str(tmp_path))  # exists, nothing indexed
    assert code == 2 and "no indexed images" in err
    code, _, err = piaa("labels", "import", "xmp", "--prefix", "a|b", str(lib[1]))
    assert code == 2 and "--prefix" in err


# -- thousands of images -----------------------------------------------------------------------

N_MANY = 3000
EMBEDDED_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description rdf:about="" '
    'xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:lr="http://ns.adobe.com/lightroom/1.0/">'
    "<dc:subject><rdf:Bag>{subject}</rdf:Bag></dc:subject>"
    "<lr:hierarchicalSubject><rdf:Bag>{hierarchy}</rdf:Bag></lr:hierarchicalSubject>"
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


def _packet(label: str, extra: str) -> str:
    subject = f"<rdf:li>{label.title()}</rdf:li><rdf:li>{extra}</rdf:li>"
    return EMBEDDED_XMP.format(subject=subject, hierarchy=f"<rdf:li>things|{label}</rdf:li>")


def test_thousands_of_images_are_all_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """3,000 images, a third each with an IMG.jpg.xmp, an IMG.xmp and embedded XMP: every one
    is read and labelled, in one store write, in seconds."""
    _need_model()
    images, home = tmp_path / "many", tmp_path / "home"
    expected: dict[str, str] = {}
    for i in range(N_MANY):
        label = VOCABULARY[i % len(VOCABULARY)]
        path = images / f"roll{i // 500:02d}" / f"IMG_{i:05d}.jpg"
        expected[path.name] = label
        if i % 3 == 2:
            _jpeg(path, i, quality=60, xmp=_packet(label, f"roll {i // 500}").encode())
            continue
        _jpeg(path, i, quality=60)
        sidecar = Path(f"{path}.xmp") if i % 3 == 0 else path.with_suffix(".xmp")
        sidecar.write_text(_packet(label, f"roll {i // 500}"), encoding="utf-8")
    with open_shapes_library(home) as library:
        library.index([images])
        library.set_vocabulary(VOCABULARY)
    piaa = Piaa(home, monkeypatch, capsys)
    started = time.perf_counter()
    report = piaa.import_xmp()  # no PATH: every indexed image
    took = time.perf_counter() - started
    assert report["images"] == report["with_keywords"] == N_MANY
    assert report["unreadable"] == []
    assert report["sidecars"] == 2 * N_MANY // 3 and report["embedded"] == N_MANY // 3
    assert report["present"] == report["labels_written"] == N_MANY
    assert sum(report["unmapped"].values()) == N_MANY  # "roll N": one per image
    labels = piaa.labels()
    assert {name: _present(v) for name, v in labels.items()} == {
        name: {label} for name, label in expected.items()
    }
    assert took < 30, f"{took:.1f} s for {N_MANY} images"
