"""After `piaa export xmp`, every reader still shows the user's own keywords beside ours.

Each reader picks ONE keyword list from a sidecar by its own precedence (docs/xmp.md has the
table and the sources), so a list we add can hide the user's keywords from a reader that
prefers it: a digiKam:TagsList added to a darktable sidecar hides its lr:hierarchicalSubject
from Immich; an lr:hierarchicalSubject added to a Lightroom sidecar hides its dc:subject from
darktable. The four readers are modelled below on what exiftool reads back from the sidecar
(`-j -struct -XMP:all`, exiftool's tag names), each as the set of keyword paths it shows:
("places", "harbour") for places|harbour, places/harbour or places > harbour.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from piaa_index.catalog.store import Store
from piaa_index.xmp.sidecars import Sidecars
from tests.xmp_files import exiftool, exiftool_read

KeywordPath = tuple[str, ...]
Tags = Mapping[str, Any]


def _strings(tags: Tags, key: str) -> list[str]:
    value = tags.get(key)
    if value is None:
        return []
    return [str(v) for v in (value if isinstance(value, list) else [value])]


def _split(values: Iterable[str], separator: str) -> set[KeywordPath]:
    return {tuple(v.split(separator)) for v in values}


def immich(tags: Tags) -> set[KeywordPath]:
    """Immich (server/src/services/metadata.service.ts, getTagList): TagsList if present, else
    HierarchicalSubject ('|' levels become '/', a '/' inside a level becomes '|'), else Keywords.
    dc:subject (exiftool's Subject) is not read at all."""
    if "TagsList" in tags:
        return _split(_strings(tags, "TagsList"), "/")
    if "HierarchicalSubject" in tags:
        return {
            tuple(level.replace("/", "|") for level in v.split("|"))
            for v in _strings(tags, "HierarchicalSubject")
        }
    return _split(_strings(tags, "Keywords"), "/")


def darktable(tags: Tags) -> set[KeywordPath]:
    """darktable (src/common/exif.cc, _exif_decode_xmp_data): Xmp.lr.hierarchicalSubject when
    the sidecar has that property at all, else Xmp.dc.subject; '|' separates levels."""
    if "HierarchicalSubject" in tags:
        return _split(_strings(tags, "HierarchicalSubject"), "|")
    return _split(_strings(tags, "Subject"), "|")


def digikam(tags: Tags) -> set[KeywordPath]:
    """digiKam (dmetadata_tags.cpp getItemTagsPath, with the default read namespaces of
    dmetadatasettingscontainer.cpp): the first NON-EMPTY of digiKam:TagsList ('/'),
    MicrosoftPhoto:LastKeywordXMP ('/'), lr:hierarchicalSubject ('|'), mediapro:CatalogSets
    ('|'), dc:subject ('/'), then IPTC Keywords (not in an XMP sidecar)."""
    for key, separator in (
        ("TagsList", "/"),
        ("LastKeywordXMP", "/"),
        ("HierarchicalSubject", "|"),
        ("CatalogSets", "|"),
        ("Subject", "/"),
    ):
        values = _strings(tags, key)
        if values:
            return _split(values, separator)
    return set()


def lightroom(tags: Tags) -> set[KeywordPath]:
    """Lightroom Classic (Metadata > Read Metadata from File): lr:hierarchicalSubject gives the
    keyword tree; a dc:subject keyword that is no level of any of those paths is a top-level
    keyword of its own (one that is a level is that node, already shown)."""
    paths = _split(_strings(tags, "HierarchicalSubject"), "|")
    levels = {level for path in paths for level in path}
    flat = {(v,) for v in _strings(tags, "Subject") if v not in levels}
    return paths | flat


READERS: dict[str, Callable[[Tags], set[KeywordPath]]] = {
    "Immich": immich,
    "darktable": darktable,
    "digiKam": digikam,
    "Lightroom": lightroom,
}

# Sidecars as each application leaves them, with the user's keywords in one list only, and
# those keywords as paths. All also carry a rating, which must survive.
STYLES: dict[str, tuple[list[str], set[KeywordPath]]] = {
    # Lightroom with flat keywords writes dc:subject alone.
    "lightroom-flat": (
        ["-XMP-dc:Subject=holiday", "-XMP-dc:Subject=harbour"],
        {("holiday",), ("harbour",)},
    ),
    # darktable-style: the user's tag only in lr:hierarchicalSubject.
    "darktable-hierarchical": (
        ["-XMP-lr:HierarchicalSubject=places|harbour", "-XMP-lr:HierarchicalSubject=holiday"],
        {("places", "harbour"), ("holiday",)},
    ),
    # digiKam's own list alone.
    "digikam-tagslist": (
        ["-XMP-digiKam:TagsList=places/harbour", "-XMP-digiKam:TagsList=holiday"],
        {("places", "harbour"), ("holiday",)},
    ),
    # Windows Photo Gallery's list, which digiKam reads second.
    "windows-lastkeyword": (
        ["-XMP-microsoft:LastKeywordXMP=family/grandma"],
        {("family", "grandma")},
    ),
    # iView / Expression Media's catalog sets, which digiKam reads fourth.
    "mediapro-catalogsets": (
        ["-XMP-mediapro:CatalogSets=places|harbour"],
        {("places", "harbour")},
    ),
    # A photographer's exiftool sidecar: flat keywords (one equal to our label "dog") and a
    # hierarchical one, but no TagsList. darktable, Immich and digiKam showed only the
    # hierarchical one; after the export every reader shows all three.
    "exiftool-mixed": (
        [
            "-XMP-dc:Subject=dog",
            "-XMP-dc:Subject=holiday",
            "-XMP-lr:HierarchicalSubject=places|harbour",
        ],
        {("places", "harbour"), ("dog",), ("holiday",)},
    ),
}
LABELS = ["dog", "cat"]


@pytest.fixture
def store(tmp_path: Path) -> Any:
    opened = Store.open(f"sqlite:///{tmp_path / 'piaa.sqlite3'}")
    try:
        yield opened
    finally:
        opened.close()


def photo(path: Path) -> str:
    Image.new("RGB", (16, 12), (200, 80, 40)).save(path, "JPEG")
    return str(path)


def make_sidecar(path: Path, style: str) -> None:
    args, _ = STYLES[style]
    exiftool("-q", "-o", path, "-XMP-xmp:Rating=3", *args)
    assert path.exists()


def views(sidecar: Path) -> dict[str, set[KeywordPath]]:
    tags = exiftool_read(sidecar)
    return {name: read(tags) for name, read in READERS.items()}


def ours(labels: Iterable[str], prefix: str = "piaa") -> set[KeywordPath]:
    return {(prefix, label) for label in labels}


def hidden(after: Mapping[str, set[KeywordPath]], wanted: set[KeywordPath]) -> dict[str, list]:
    """Per reader, the wanted keywords it does not show."""
    return {name: sorted(wanted - shown) for name, shown in after.items() if wanted - shown}


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_reader_shows_the_users_keywords_and_ours(
    store: Store, tmp_path: Path, style: str
) -> None:
    """After the export every reader shows the user's keywords and ours, and still everything
    it showed before; undo gives back the exact original bytes."""
    image = photo(tmp_path / "IMG_0001.jpg")
    sidecar = Path(image + ".xmp")
    make_sidecar(sidecar, style)
    original = sidecar.read_bytes()
    before = views(sidecar)
    _, user = STYLES[style]

    report = Sidecars(store).export({image: LABELS}, [image]).as_dict()
    assert (report["updated"], report["failed"], report["skipped_invalid"]) == (1, 0, 0)
    after = views(sidecar)
    assert hidden(after, user | ours(LABELS)) == {}
    assert {name: sorted(before[name] - after[name]) for name in READERS} == dict.fromkeys(
        READERS, []
    )
    assert exiftool_read(sidecar)["Rating"] == 3

    assert Sidecars(store).undo([image]).as_dict()["restored"] == 1
    assert sidecar.read_bytes() == original


@pytest.mark.parametrize("style", ["lightroom-flat", "darktable-hierarchical", "digikam-tagslist"])
def test_reexport_keeps_the_users_keywords_visible_and_replaces_only_ours(
    store: Store, tmp_path: Path, style: str
) -> None:
    """A re-export after a vocabulary change, then a user edit in the list they own, then
    another re-export: readers keep showing the user's keywords (the new one too), ours are
    exactly the current labels, and undo takes out everything of ours (copies included)."""
    image = photo(tmp_path / "IMG_0002.jpg")
    sidecar = Path(image + ".xmp")
    make_sidecar(sidecar, style)
    _, user = STYLES[style]
    Sidecars(store).export({image: ["dog", "cat"]}, [image], prefix="auto")
    Sidecars(store).export({image: ["dog", "tree"]}, [image], prefix="auto")
    after = views(sidecar)
    assert hidden(after, user | ours(["dog", "tree"], "auto")) == {}
    assert all(("auto", "cat") not in shown for shown in after.values())

    # The user adds a keyword in the list their application writes.
    field, new, path = {
        "lightroom-flat": ("XMP-dc:Subject", "sunset", ("sunset",)),
        "darktable-hierarchical": ("XMP-lr:HierarchicalSubject", "sky|sunset", ("sky", "sunset")),
        "digikam-tagslist": ("XMP-digiKam:TagsList", "sky/sunset", ("sky", "sunset")),
    }[style]
    exiftool("-q", "-overwrite_original", f"-{field}+={new}", sidecar)
    assert (
        Sidecars(store).export({image: ["tree"]}, [image], prefix="auto").as_dict()["updated"] == 1
    )
    after = views(sidecar)
    assert hidden(after, user | {path} | ours(["tree"], "auto")) == {}
    assert all(("auto", "dog") not in shown for shown in after.values())

    # Undo cannot restore the bytes (the user edited): it leaves only the user's lists.
    assert Sidecars(store).undo([image]).as_dict()["updated"] == 1
    left = exiftool_read(sidecar)
    lists = {k for k in ("Subject", "HierarchicalSubject", "TagsList") if k in left}
    assert lists == {field.split(":")[1]}
    assert not any(p[0] == "auto" for shown in views(sidecar).values() for p in shown)


def test_lists_another_application_rewrote_keep_every_keyword(store: Store, tmp_path: Path) -> None:
    """digiKam rewrites all three lists from its database on any edit: the copies we added,
    ours and a new tag all come back as if they were the user's. A re-export still shows every
    keyword in every reader (a list holding one of the user's values still gets the copies it
    lacks), and ours are recognised and replaced."""
    image = photo(tmp_path / "IMG_0003.jpg")
    sidecar = Path(image + ".xmp")
    make_sidecar(sidecar, "darktable-hierarchical")
    _, user = STYLES["darktable-hierarchical"]
    Sidecars(store).export({image: ["dog", "cat"]}, [image])
    held = views(sidecar)["digiKam"] | {("sky", "sunset")}  # digiKam's database, one tag more
    args = [f"-XMP-digiKam:TagsList={'/'.join(p)}" for p in sorted(held)]
    args += [f"-XMP-lr:HierarchicalSubject={'|'.join(p)}" for p in sorted(held)]
    args += [f"-XMP-dc:Subject={p[-1]}" for p in sorted(held)]
    exiftool("-q", "-overwrite_original", *args, sidecar)

    Sidecars(store).export({image: ["dog", "bird"]}, [image])
    after = views(sidecar)
    assert hidden(after, user | {("sky", "sunset")} | ours(["dog", "bird"])) == {}
    assert all(("piaa", "cat") not in shown for shown in after.values())
