"""XMP write-back a photographer can trust (piaa_index/xmp/sidecars.py): merge, re-export, undo.

Pre-existing sidecars are made by exiftool (rating, label, title, the user's keywords) and by
hand as darktable writes them (edit history); exiftool reads the results. The store is a real
SQLite file, and a real Postgres database when PIAA_TEST_PG is set.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piaa_index.catalog.store import Store
from piaa_index.xmp import sidecars as xmp
from piaa_index.xmp.sidecars import Keywords, Sidecars, read_properties
from tests.xmp_files import DARKTABLE_SIDECAR, exiftool, exiftool_read, write_exiftool_sidecar


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'piaa.sqlite3'}"
    else:
        create: Callable[[], str] = request.getfixturevalue("postgres_database")
        url = create()
    opened = Store.open(url)
    try:
        yield opened
    finally:
        opened.close()


def photo(path: Path) -> str:
    """A real little JPEG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 12), (200, 80, 40)).save(path, "JPEG")
    return str(path)


def export(store: Store, tags: dict[str, list[str]], **options: str) -> dict:
    return Sidecars(store).export(tags, list(tags), **options).as_dict(list_paths=True)


def undo(store: Store, images: list[str]) -> dict:
    return Sidecars(store).undo(images).as_dict(list_paths=True)


# -- merging into what is there ----------------------------------------------------------------


def test_merge_into_exiftool_sidecar_keeps_every_field(store: Store, tmp_path: Path) -> None:
    """exiftool reads our keywords beside the user's rating, label, title, creator and keywords;
    the user's "dog" stays the user's; each list also gets the user's keywords it lacked (the
    TagsList we add must not hide them from Immich and digiKam); undo gives back the exact
    original bytes."""
    image = photo(tmp_path / "IMG_0001.jpg")
    sidecar = Path(image + ".xmp")
    write_exiftool_sidecar(sidecar)
    original = sidecar.read_bytes()

    summary = export(store, {image: ["dog", "cat"]})
    assert (summary["updated"], summary["written"], summary["failed"]) == (1, 0, 0)
    got = exiftool_read(sidecar)
    assert got["Rating"] == 4 and got["Label"] == "Red"
    assert got["Title"] == "Harbour at dusk" and got["Creator"] == ["Jane Doe"]
    assert got["Subject"] == ["dog", "holiday", "harbour", "cat"]  # "dog" once: the user's
    assert got["HierarchicalSubject"] == [
        "places|harbour", "dog", "holiday", "piaa|dog", "piaa|cat"
    ]  # fmt: skip
    assert got["TagsList"] == ["places/harbour", "dog", "holiday", "piaa/dog", "piaa/cat"]
    # dc:subject stays an unordered Bag, as its schema says (not the Seq pyexiv2 defaults to).
    text = sidecar.read_text(encoding="utf-8")
    assert "<dc:subject>\n    <rdf:Bag>" in text

    assert export(store, {image: ["dog", "cat"]})["unchanged"] == 1
    summary = undo(store, [image])
    assert summary["restored"] == 1
    assert sidecar.read_bytes() == original


def test_darktable_history_survives(store: Store, tmp_path: Path) -> None:
    """A darktable sidecar keeps its edit history, rating and darktable fields; undo restores it."""
    image = photo(tmp_path / "IMG_0042.jpg")
    sidecar = Path(image + ".xmp")
    sidecar.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    before = exiftool_read(sidecar)
    assert [h["Operation"] for h in before["History"]] == ["exposure", "colorbalancergb"]

    assert export(store, {image: ["cat", "dog"]})["updated"] == 1
    after = exiftool_read(sidecar)
    assert after["Subject"] == ["darktable|format|jpg", "dog", "cat"]
    assert after["HierarchicalSubject"] == ["darktable|format|jpg", "dog", "piaa|cat", "piaa|dog"]
    assert after["TagsList"] == ["darktable/format/jpg", "dog", "piaa/cat", "piaa/dog"]
    ours = {"Subject", "HierarchicalSubject", "TagsList", "SourceFile", "XMPToolkit"}
    # Every darktable field, the history's every step and parameter, the rating and the date.
    assert {k: v for k, v in after.items() if k not in ours} == {
        k: v for k, v in before.items() if k not in ours
    }
    undo(store, [image])
    assert sidecar.read_text(encoding="utf-8") == DARKTABLE_SIDECAR


def test_reexport_after_vocabulary_change_replaces_only_ours(store: Store, tmp_path: Path) -> None:
    """Labels that went away leave the sidecar, new ones come in, the user's keywords stay,
    and an image that lost every label loses what we wrote (a file we made is deleted)."""
    a, b = photo(tmp_path / "a.jpg"), photo(tmp_path / "b.jpg")
    write_exiftool_sidecar(Path(a + ".xmp"))
    original = Path(a + ".xmp").read_bytes()
    export(store, {a: ["dog", "cat", "bird"], b: ["cat"]}, prefix="auto")
    # The vocabulary changed: no more "cat" or "bird"; "dog" stays, "tree" is new.
    summary = Sidecars(store).export({a: ["dog", "tree"]}, [a, b], prefix="auto").as_dict()
    assert (summary["updated"], summary["removed"]) == (1, 1)
    assert not Path(b + ".xmp").exists()
    got = exiftool_read(Path(a + ".xmp"))
    assert got["Subject"] == ["dog", "holiday", "harbour", "tree"]
    assert got["HierarchicalSubject"] == [
        "places|harbour", "dog", "holiday", "auto|dog", "auto|tree"
    ]  # fmt: skip
    assert got["TagsList"] == ["places/harbour", "dog", "holiday", "auto/dog", "auto/tree"]
    assert got["Rating"] == 4
    assert undo(store, [a, b])["restored"] == 1
    assert Path(a + ".xmp").read_bytes() == original


def test_created_sidecar_undo_deletes_it(store: Store, tmp_path: Path) -> None:
    """A sidecar we created is deleted by undo; one the user edited since keeps their edit."""
    a, b = photo(tmp_path / "a.jpg"), photo(tmp_path / "b.jpg")
    summary = export(store, {a: ["cat"], b: ["dog"]})
    assert summary["written"] == 2
    assert exiftool_read(Path(a + ".xmp"))["Subject"] == ["cat"]
    exiftool("-q", "-overwrite_original", "-XMP-xmp:Rating=5", Path(b + ".xmp"))
    summary = undo(store, [a, b])
    assert (summary["removed"], summary["updated"]) == (1, 1)
    assert not Path(a + ".xmp").exists()
    left = read_properties(Path(b + ".xmp").read_bytes())
    assert left == {"Xmp.xmp.Rating": "5"}
    assert undo(store, [a, b])["updated"] == 0  # nothing of ours is left anywhere


def test_undo_after_user_edit_removes_only_ours(store: Store, tmp_path: Path) -> None:
    """The user re-rated and added a keyword after our export: undo keeps both and takes out
    only what we added (not "dog", which the user had before us)."""
    image = photo(tmp_path / "IMG_0001.jpg")
    sidecar = Path(image + ".xmp")
    write_exiftool_sidecar(sidecar)
    export(store, {image: ["dog", "cat"]})
    exiftool(
        "-q", "-overwrite_original", "-XMP-xmp:Rating=2", "-XMP-dc:Subject+=sunset", sidecar
    )  # fmt: skip
    assert undo(store, [image])["updated"] == 1
    got = exiftool_read(sidecar)
    assert got["Rating"] == 2 and got["Label"] == "Red" and got["Title"] == "Harbour at dusk"
    assert got["Subject"] == ["dog", "holiday", "sunset"]
    assert got["HierarchicalSubject"] == ["places|harbour"]
    assert "TagsList" not in got
    assert not any(k.startswith("Xmp.piaa.") for k in read_properties(sidecar.read_bytes()))


def test_user_edit_between_exports_is_never_undone(store: Store, tmp_path: Path) -> None:
    """Export, the user re-rates, a re-export rewrites our keywords: the original bytes can no
    longer be put back as they were, so undo keeps the new rating and removes only ours."""
    image = photo(tmp_path / "IMG_0001.jpg")
    sidecar = Path(image + ".xmp")
    write_exiftool_sidecar(sidecar)
    export(store, {image: ["cat"]})
    exiftool("-q", "-overwrite_original", "-XMP-xmp:Rating=1", sidecar)
    assert export(store, {image: ["cat", "bird"]})["updated"] == 1
    assert undo(store, [image])["updated"] == 1  # not "restored"
    got = exiftool_read(sidecar)
    assert got["Rating"] == 1 and got["Subject"] == ["dog", "holiday"]
    assert got["HierarchicalSubject"] == ["places|harbour"]


def test_sidecars_found_by_namespace_without_records(tmp_path: Path) -> None:
    """Undo finds our keywords in the sidecars of the given images even with a new database."""
    image = photo(tmp_path / "a.jpg")
    write_exiftool_sidecar(Path(image + ".xmp"))
    first = Store.open(f"sqlite:///{tmp_path / 'one.sqlite3'}")
    export(first, {image: ["cat"]})
    first.close()
    other = Store.open(f"sqlite:///{tmp_path / 'two.sqlite3'}")
    assert undo(other, [image])["updated"] == 1
    assert exiftool_read(Path(image + ".xmp"))["Subject"] == ["dog", "holiday"]
    other.close()


# -- what must not be touched --------------------------------------------------------------------


def test_invalid_sidecars_are_reported_and_left_untouched(store: Store, tmp_path: Path) -> None:
    contents = {
        "empty.jpg": b"",
        "text.jpg": b"not xmp at all\n",
        "truncated.jpg": DARKTABLE_SIDECAR.encode()[:700],
        "jpeg.jpg": Path(photo(tmp_path / "x" / "pixels.jpg")).read_bytes(),
        "other-xml.jpg": b'<?xml version="1.0"?><svg><g/></svg>',
    }
    tags = {}
    for name, data in contents.items():
        image = photo(tmp_path / name)
        Path(image + ".xmp").write_bytes(data)
        tags[image] = ["cat"]
    summary = export(store, tags)
    assert summary["skipped_invalid"] == len(contents)
    assert sorted(summary["invalid"]) == sorted(p + ".xmp" for p in tags)
    assert all("not valid XMP" in e for e in summary["errors"])
    for name, data in contents.items():
        assert (tmp_path / f"{name}.xmp").read_bytes() == data
    assert not list(tmp_path.glob(".*piaa-tmp"))


def test_linked_sidecar_is_left_alone(store: Store, tmp_path: Path) -> None:
    image = photo(tmp_path / "a.jpg")
    target = tmp_path / "elsewhere.xmp"
    target.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    Path(image + ".xmp").symlink_to(target)
    summary = export(store, {image: ["cat"]})
    assert summary["failed"] == 1 and "symbolic link" in summary["errors"][0]
    assert Path(image + ".xmp").is_symlink()
    assert target.read_text(encoding="utf-8") == DARKTABLE_SIDECAR


def test_excluded_folders_get_no_sidecar(store: Store, tmp_path: Path) -> None:
    """Images in NAS thumbnail, trash and .git folders (indexed before the excludes, say) get
    no sidecar there."""
    good = photo(tmp_path / "share" / "IMG_1.jpg")
    junk = [
        photo(tmp_path / "share" / "@eaDir" / "IMG_1.jpg" / "SYNOPHOTO_THUMB_XL.jpg"),
        photo(tmp_path / "share" / ".Trash-1000" / "files" / "old.jpg"),
        photo(tmp_path / "share" / ".git" / "x.jpg"),
        photo(tmp_path / "share" / "#recycle" / "y.jpg"),
    ]
    summary = export(store, {p: ["cat"] for p in [good, *junk]})
    assert (summary["written"], summary["skipped_excluded"]) == (1, 4)
    assert sorted(str(p) for p in tmp_path.rglob("*.xmp")) == [good + ".xmp"]


def test_failed_write_keeps_the_old_file_and_undo_still_restores(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A write that fails (disk full, a crash) after we recorded it leaves the old sidecar whole,
    no temporary file, and undo still gives back the original bytes."""
    image = photo(tmp_path / "a.jpg")
    sidecar = Path(image + ".xmp")
    write_exiftool_sidecar(sidecar)
    original = sidecar.read_bytes()
    real_replace = os.replace

    def full_disk(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(xmp.os, "replace", full_disk)
    summary = export(store, {image: ["cat"]})
    assert summary["failed"] == 1 and "No space left on device" in summary["errors"][0]
    assert sidecar.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    monkeypatch.setattr(xmp.os, "replace", real_replace)
    assert export(store, {image: ["cat"]})["updated"] == 1
    assert undo(store, [image])["restored"] == 1
    assert sidecar.read_bytes() == original


def test_permissions_of_a_replaced_sidecar_are_kept(store: Store, tmp_path: Path) -> None:
    image = photo(tmp_path / "a.jpg")
    sidecar = Path(image + ".xmp")
    sidecar.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    sidecar.chmod(0o640)
    export(store, {image: ["cat"]})
    assert sidecar.stat().st_mode & 0o777 == 0o640


# -- names -----------------------------------------------------------------------------------


def test_naming(store: Store, tmp_path: Path) -> None:
    """append: IMG.jpg.xmp; replace: IMG.xmp; an existing other-named sidecar is merged into;
    two images sharing a stem never share IMG.xmp."""
    a = photo(tmp_path / "a" / "IMG_1.jpg")
    export(store, {a: ["cat"]})
    assert Path(a + ".xmp").exists()

    b = photo(tmp_path / "b" / "IMG_2.jpg")
    export(store, {b: ["cat"]}, naming="replace")
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["IMG_2.jpg", "IMG_2.xmp"]

    c = photo(tmp_path / "c" / "IMG_3.jpg")
    write_exiftool_sidecar(tmp_path / "c" / "IMG_3.xmp")  # Lightroom's name, already there
    assert export(store, {c: ["cat"]})["updated"] == 1
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["IMG_3.jpg", "IMG_3.xmp"]
    got = exiftool_read(tmp_path / "c" / "IMG_3.xmp")
    assert got["Subject"] == ["dog", "holiday", "harbour", "cat"]

    d1, d2 = photo(tmp_path / "d" / "IMG_4.jpg"), photo(tmp_path / "d" / "IMG_4.png")
    export(store, {d1: ["cat"], d2: ["dog"]}, naming="replace")
    assert sorted(p.name for p in (tmp_path / "d").iterdir() if p.suffix == ".xmp") == [
        "IMG_4.jpg.xmp",
        "IMG_4.png.xmp",
    ]


def test_bad_options_are_usage_errors(store: Store, tmp_path: Path) -> None:
    from piaa_index.errors import UserInputError

    image = photo(tmp_path / "a.jpg")
    with pytest.raises(UserInputError, match="--naming"):
        export(store, {image: ["cat"]}, naming="lightroom")
    with pytest.raises(UserInputError, match="--prefix"):
        export(store, {image: ["cat"]}, prefix="a|b")


def test_keywords_for_labels() -> None:
    kw = Keywords.for_labels(["dog", "cat", "dog"], prefix="piaa")
    assert kw.values == (("dog", "cat"), ("piaa|dog", "piaa|cat"), ("piaa/dog", "piaa/cat"))
    assert not Keywords.for_labels([])


# -- the must-show, through the CLI on a real index -------------------------------------------


def test_nas_share_export_and_undo_through_the_cli(tmp_path: Path, tiny_model_config: Path) -> None:
    """A NAS-like share indexes its one photo; `piaa export xmp` writes one sidecar (merged
    into the darktable one already there), none under @eaDir, .thumbnails, the trash or .git;
    `--undo` leaves the darktable sidecar byte-identical."""
    import json

    from click.testing import CliRunner

    from piaa_index.cli import cli
    from tests.image_files import shapes_image

    share = tmp_path / "share"
    (share / "2024").mkdir(parents=True)
    image = share / "2024" / "IMG_0042.jpg"
    shapes_image(np.random.default_rng(0), (96, 96)).save(image, quality=90)
    sidecar = Path(str(image) + ".xmp")
    sidecar.write_text(DARKTABLE_SIDECAR, encoding="utf-8")
    for junk in (
        "2024/@eaDir/IMG_0042.jpg/SYNOPHOTO_THUMB_XL.jpg",
        "2024/.thumbnails/IMG_0042.jpg",
        ".Trash-1000/files/IMG_0042.jpg",
        ".git/IMG_0042.jpg",
    ):
        photo(share / junk)
    base = ["--home", str(tmp_path / "home"), "-q", "--model", str(tiny_model_config)]
    base += ["--pretrained", "none"]

    def piaa(*args: str) -> str:
        result = CliRunner().invoke(cli, [*base, *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    report = json.loads(piaa("index", str(share), "--json"))
    assert report["indexed"] == 1
    piaa("vocab", "set", "red circle", "blue square", "green triangle")
    piaa("fit")
    summary = json.loads(piaa("export", "xmp", "--json"))
    sidecars = sorted(str(p) for p in share.rglob("*.xmp"))
    assert sidecars == [str(sidecar)]
    labels = [t["label"] for t in json.loads(piaa("tags", str(image), "--json")) if t["present"]]
    assert summary["failed"] == summary["skipped_invalid"] == 0
    assert labels and summary["updated"] == 1
    props = read_properties(sidecar.read_bytes())
    assert props["Xmp.dc.subject"] == ["darktable|format|jpg", "dog", *labels]
    assert props["Xmp.darktable.history[2]/darktable:operation"] == "colorbalancergb"
    piaa("export", "xmp", "--undo")
    assert sidecar.read_text(encoding="utf-8") == DARKTABLE_SIDECAR
