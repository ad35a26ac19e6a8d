"""The user's own keywords, read from XMP sidecars and from the metadata embedded in image files,
mapped to vocabulary labels (`piaa labels import xmp`).

Where keywords come from, for each image:

- its sidecars, `IMG.jpg.xmp` and `IMG.xmp` (the names xmp.py writes; both when both exist),
  read with exiv2 as `piaa export xmp` reads them;
- the XMP packet embedded in the file and its IPTC Keywords, taken out by Pillow (pure Python,
  headers only; the packet is then parsed as a sidecar is). A file Pillow cannot open (most
  camera RAW files) is searched for an XMP packet in its first MAX_SCAN_BYTES.

The lists read are every keyword list xmp.py knows (dc:subject, lr:hierarchicalSubject,
digiKam:TagsList, MicrosoftPhoto:LastKeywordXMP, mediapro:CatalogSets) and IPTC Keywords. Our
own keywords are left out: the values a sidecar records in our namespace as added by
`piaa export xmp` (our labels and the copies of the user's keywords), and any hierarchical one
under our prefix (`piaa|dog`, `piaa/dog`), with, in a sidecar that lost our record (rewritten by
another application), each flat keyword that is a level of such a path.

A keyword is a path of levels (`animals|dog` is ("animals", "dog")); a flat keyword that is a
level of one of the image's hierarchical keywords is that keyword, not another (as Lightroom
reads dc:subject beside lr:hierarchicalSubject, and as xmp.py copies keywords). A keyword maps to
the vocabulary label equal to it case-folded (normalize_label), else to the one equal to its last
level (`animals|dog`, `animals/dog` → `dog`); a keyword that maps to none is counted as unmapped.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from piaa_index.progress import Progress, progress_bar
from piaa_index.query.language import normalize_label
from piaa_index.xmp.sidecars import (
    FIELDS,
    SOURCES,
    SUBJECT,
    InvalidSidecar,
    read_properties,
    sidecar_names,
    without_each,
)

KeywordPath = tuple[str, ...]
SOURCE = "xmp"  # user_labels.source of what this module stores
OUR_RECORD = "Xmp.piaa."  # properties in our namespace: the values `piaa export xmp` added
MAX_SCAN_BYTES = 4 << 20  # how far into a file Pillow cannot open we look for an XMP packet
IPTC_KEYWORDS = (2, 25)
IPTC_CHARSET = (1, 90)
IPTC_UTF8 = b"\x1b%G"


# -- one XMP packet --------------------------------------------------------------------------


def _values(props: Mapping[str, Any], key: str) -> list[str]:
    """A property's values, whatever its form (list, lone text, exiv2's flat form for items
    with qualifiers, a language alternative); [] when absent."""
    value = props.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        return [str(v) for v in value.values()]
    text = str(value)
    if text.startswith("type="):
        out, i = [], 1
        while f"{key}[{i}]" in props:
            out.append(str(props[f"{key}[{i}]"]))
            i += 1
        return out
    return [text]


def _levels(value: str, separator: str) -> KeywordPath:
    return tuple(level.strip() for level in value.split(separator) if level.strip())


@dataclass
class Found:
    """Keywords of one image, gathered from all its sources before they are resolved."""

    paths: dict[KeywordPath, None] = field(default_factory=dict)  # hierarchical, the user's
    flat: dict[str, None] = field(default_factory=dict)  # dc:subject, IPTC Keywords
    ours: set[str] = field(default_factory=set)  # levels of our paths in a sidecar with no record

    def add_packet(self, props: Mapping[str, Any], prefix: str) -> None:
        recorded = {prop: _values(props, mine) for prop, _, mine in FIELDS}
        has_record = any(k.startswith(OUR_RECORD) for k in props)
        for key, separator in SOURCES:
            for value in without_each(_values(props, key), recorded.get(key, [])):
                path = _levels(value, separator)
                if not path:
                    continue
                if prefix and len(path) > 1 and path[0] == prefix:
                    if not has_record:
                        self.ours.update(path[1:])
                    continue
                self.paths.setdefault(path)
        for value in without_each(_values(props, SUBJECT), recorded[SUBJECT]):
            path = _levels(value, "|")  # darktable writes its hierarchical tags there as a|b
            if prefix and len(path) > 1 and path[0] == prefix:
                continue
            if value.strip():
                self.flat.setdefault(value.strip())

    def add_flat(self, values: Iterable[str]) -> None:
        for value in values:
            if value.strip():
                self.flat.setdefault(value.strip())

    def merge(self, other: Found) -> None:
        self.paths.update(other.paths)
        self.flat.update(other.flat)
        self.ours |= other.ours

    def keywords(self) -> list[KeywordPath]:
        """The user's keywords as paths: the hierarchical ones, then each flat one that is no
        level of those (nor, from a sidecar that lost our record, of ours)."""
        paths = dict(self.paths)
        levels = {level for path in paths for level in path}
        for value in self.flat:
            path = _levels(value, "|")
            if not path or path in paths:
                continue
            if len(path) == 1 and (path[0] in levels or path[0] in self.ours):
                continue
            paths.setdefault(path)
        return list(paths)


# -- the files of one image ------------------------------------------------------------------


def _decode_iptc(value: bytes, utf8: bool) -> str:
    if utf8:
        return value.decode("utf-8", "replace")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return value.decode("latin-1")  # IPTC's default: ISO 8859-1 when no charset is given


def embedded_metadata(path: str) -> tuple[bytes | None, list[str]]:
    """The XMP packet embedded in an image file (None if none) and its IPTC Keywords.

    Raises OSError when the file cannot be read and ValueError when it is damaged."""
    from PIL import Image, IptcImagePlugin, UnidentifiedImageError

    from piaa_index.ingest.images import PILLOW_EXTENSIONS, _register_heif, open_regular

    _register_heif()
    with open_regular(path) as fh:
        try:
            im = Image.open(fh)
        except UnidentifiedImageError:
            if os.path.splitext(path)[1].lower() in PILLOW_EXTENSIONS:
                raise ValueError("damaged image file (Pillow cannot identify it)") from None
            fh.seek(0)  # a camera RAW, JPEG XL…: look for the packet itself
            return _scan_packet(fh.read(MAX_SCAN_BYTES)), []
        except Image.DecompressionBombError:
            fh.seek(0)  # a huge panorama: Pillow will not open it, its packet is near the start
            return _scan_packet(fh.read(MAX_SCAN_BYTES)), []
        except OSError:
            raise
        except Exception as exc:  # noqa: BLE001 - any parser error of a damaged file
            raise ValueError(f"damaged image file ({_reason(exc)})") from None
        with im:
            xmp = im.info.get("xmp") or im.info.get("XML:com.adobe.xmp")
            if isinstance(xmp, str):
                xmp = xmp.encode("utf-8")
            keywords: list[str] = []
            try:
                iptc = IptcImagePlugin.getiptcinfo(im)
            except Exception as exc:  # noqa: BLE001 - any parser error of damaged IPTC data
                raise ValueError(f"damaged IPTC data ({_reason(exc)})") from None
            if iptc:
                raw = iptc.get(IPTC_KEYWORDS) or []
                utf8 = iptc.get(IPTC_CHARSET) == IPTC_UTF8
                for value in raw if isinstance(raw, list) else [raw]:
                    keywords.append(_decode_iptc(bytes(value), utf8))
    return (bytes(xmp).rstrip(b"\x00 ") or None) if xmp else None, keywords


def _scan_packet(head: bytes) -> bytes | None:
    """The first XMP packet in a file's bytes (the XMP specification's packet scanning)."""
    start = head.find(b"<x:xmpmeta")
    if start < 0:
        return None
    end = head.find(b"</x:xmpmeta>", start)
    if end < 0:
        return None
    return head[start : end + len(b"</x:xmpmeta>")]


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class SidecarFinder:
    """Which sidecars exist, one directory listing per folder (not two stats per image)."""

    def __init__(self) -> None:
        self._names: dict[str, frozenset[str]] = {}

    def _listing(self, folder: str) -> frozenset[str]:
        names = self._names.get(folder)
        if names is None:
            try:
                names = frozenset(e.name for e in os.scandir(folder or "."))
            except OSError:
                names = frozenset()
            self._names[folder] = names
        return names

    def sidecars(self, image: str) -> list[str]:
        out = []
        for candidate in dict.fromkeys(sidecar_names(image)):
            folder, name = os.path.split(candidate)
            if candidate != image and name in self._listing(folder):
                out.append(candidate)
        return out


# -- mapping to the vocabulary ---------------------------------------------------------------


class LabelMap:
    """Keyword → vocabulary label: exact (case-folded), else the keyword's last level."""

    def __init__(self, names: Iterable[str]):
        self.by_key: dict[str, str] = {}
        for name in names:
            self.by_key.setdefault(normalize_label(name), name)

    def label(self, path: KeywordPath) -> str | None:
        for whole in dict.fromkeys(("|".join(path), "/".join(path), path[-1])):
            name = self.by_key.get(normalize_label(whole))
            if name is not None:
                return name
        return None


def show(path: KeywordPath) -> str:
    """A keyword as the report lists it: Lightroom's `a|b` form."""
    return "|".join(path)


# -- a run over images -----------------------------------------------------------------------


@dataclass
class ImportPlan:
    """What a run read: each image's labels and what the report says."""

    present: dict[int, list[str]] = field(default_factory=dict)  # image id → labels
    with_keywords: set[int] = field(default_factory=set)  # images with any user keyword
    unmapped: Counter[str] = field(default_factory=Counter)  # keyword → images
    mapped: Counter[str] = field(default_factory=Counter)  # label → images
    read: set[int] = field(default_factory=set)  # images whose every source could be read
    unreadable: list[dict[str, str]] = field(default_factory=list)
    sidecars: int = 0
    embedded: int = 0  # images whose file held keywords of the user's


def read_keywords(
    images: Mapping[str, int],
    vocabulary: Sequence[str],
    prefix: str = "piaa",
    progress: Progress = False,
) -> ImportPlan:
    """Read the user's keywords of `images` (path → image id) and map them to `vocabulary`."""
    plan = ImportPlan()
    labels = LabelMap(vocabulary)
    finder = SidecarFinder()
    with progress_bar(len(images), "reading keywords", progress) as advance:
        for path in sorted(images):
            image_id = images[path]
            found = Found()
            ok = True
            for sidecar in finder.sidecars(path):
                try:
                    with open(sidecar, "rb") as fh:
                        data = fh.read()
                    found.add_packet(read_properties(data), prefix)
                    plan.sidecars += 1
                except InvalidSidecar as exc:
                    ok = False
                    plan.unreadable.append({"path": sidecar, "reason": f"not valid XMP: {exc}"})
                except OSError as exc:
                    ok = False
                    plan.unreadable.append({"path": sidecar, "reason": exc.strerror or str(exc)})
            inside = Found()
            try:
                packet, iptc = embedded_metadata(path)
                if packet is not None:
                    inside.add_packet(read_properties(packet), prefix)
                inside.add_flat(iptc)
            except InvalidSidecar as exc:
                ok = False
                plan.unreadable.append({"path": path, "reason": f"embedded XMP: {exc}"})
            except (OSError, ValueError) as exc:
                ok = False
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else None
                plan.unreadable.append({"path": path, "reason": reason or _reason(exc)})
            if inside.keywords():
                plan.embedded += 1
            found.merge(inside)
            if ok:
                plan.read.add(image_id)
            keywords = found.keywords()
            if keywords:
                plan.with_keywords.add(image_id)
            names: dict[str, None] = {}
            for keyword in keywords:
                name = labels.label(keyword)
                if name is None:
                    plan.unmapped[show(keyword)] += 1
                else:
                    names.setdefault(name)
            if names:
                plan.present[image_id] = list(names)
                plan.mapped.update(list(names))
            advance(1)
    return plan


def label_rows(
    plan: ImportPlan,
    vocabulary: Sequence[str],
    stored: Iterable[tuple[int, str, str, bool, str]],
    complete: bool = False,
) -> tuple[list[tuple[int, str, bool]], list[tuple[int, str]]]:
    """The rows to store (image id, label, present) and the (image id, label) pairs to forget.

    Present: every mapped keyword. With `complete`, each image with a keyword of the user's
    also gets every other vocabulary label as absent, except where the user said something of
    that label through another source (`piaa labels set`, the gallery, a CSV). To forget: a
    label an earlier import stored present from these files that they no longer hold (an image
    that could not be read keeps what it had, and a label no longer in the vocabulary stays)."""
    known = {normalize_label(n) for n in vocabulary}
    other: set[tuple[int, str]] = set()
    earlier: list[tuple[int, str, str]] = []
    for image_id, key, name, present, source in stored:
        if source != SOURCE:
            other.add((image_id, key))
        elif present and image_id in plan.read and key in known:
            earlier.append((image_id, key, name))
    rows: list[tuple[int, str, bool]] = []
    now: set[tuple[int, str]] = set()
    for image_id, names in plan.present.items():
        for name in names:
            rows.append((image_id, name, True))
            now.add((image_id, normalize_label(name)))
    if complete:
        keys = [(normalize_label(n), n) for n in vocabulary]
        for image_id in sorted(plan.with_keywords):
            for key, name in keys:
                if (image_id, key) not in now and (image_id, key) not in other:
                    rows.append((image_id, name, False))
                    now.add((image_id, key))
    forget = [(i, name) for i, key, name in earlier if (i, key) not in now]
    return rows, forget
