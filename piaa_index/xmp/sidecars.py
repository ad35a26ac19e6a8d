"""XMP sidecars a photographer can trust: merge our keywords in, take exactly them out again.

Sidecars are read and written with exiv2 (through pyexiv2, whose wheels bundle it), the library
darktable and digiKam write their own sidecars with: ratings, labels, titles, edit histories and
namespaces we do not know come through. We own three keyword lists, dc:subject (`label`),
lr:hierarchicalSubject (`PREFIX|label`) and digiKam:TagsList (`PREFIX/label`), and each sidecar
lists in our own namespace exactly the values we added, so that a re-export replaces only those
and never a keyword the user had, even one equal to a label.

Each reader shows ONE list (Immich and digiKam TagsList first, darktable hierarchicalSubject
first; docs/xmp.md has the table), so a list we add would hide the user's keywords held only in
another one. Each of our three lists therefore also gets, as values we added, the user's
keywords from every keyword list of the sidecar that it lacks (also MicrosoftPhoto and mediapro
lists, which digiKam reads): whichever list a reader prefers, it shows the user's and ours.

The store remembers each file we wrote: whether we created it, its bytes before our first write
and the hash of our last write. Taking our keywords out of a file nobody touched since deletes
it (we created it) or puts its exact original bytes back; otherwise only our values go.
Files are replaced atomically (temporary file, fsync, rename); one that is not valid XMP is
reported and left as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from piaa_index.durable import atomic_write, fsync_dir
from piaa_index.errors import PiaaError, UserInputError

if TYPE_CHECKING:
    from piaa_index.catalog.store import SidecarRecord, Store

NAMESPACE = "http://ns.piaa-index.org/xmp/1.0/"
NS_PREFIX = "piaa"
# (property, its array type in its schema, our property listing the values we added to it)
FIELDS = (
    ("Xmp.dc.subject", "Bag", "Xmp.piaa.subject"),
    ("Xmp.lr.hierarchicalSubject", "Bag", "Xmp.piaa.hierarchicalSubject"),
    ("Xmp.digiKam.TagsList", "Seq", "Xmp.piaa.tagsList"),
)
SUBJECT = "Xmp.dc.subject"
# The lists that hold keywords as paths, in the order readers prefer them (docs/xmp.md has the
# table), with the separator of their levels. We write the first and the third; the others we
# only read, so that a TagsList or hierarchicalSubject we add never hides what they hold.
SOURCES = (
    ("Xmp.digiKam.TagsList", "/"),  # Immich, digiKam: first
    ("Xmp.MicrosoftPhoto.LastKeywordXMP", "/"),  # digiKam: second
    ("Xmp.lr.hierarchicalSubject", "|"),  # darktable, Lightroom: first; Immich: second
    ("Xmp.lr.HierarchicalSubject", "|"),  # an old digiKam misspelling digiKam still reads
    ("Xmp.mediapro.CatalogSets", "|"),  # digiKam: fourth
)
SEPARATORS = dict(SOURCES)
KeywordPath = tuple[str, ...]
# append: IMG.jpg.xmp (darktable, digiKam, Immich; no clash between IMG.jpg and IMG.nef);
# replace: IMG.xmp (Lightroom's name for a RAW file's sidecar).
NAMINGS = ("append", "replace")
XMP_MIME = "application/rdf+xml"
EMPTY_PACKET = (
    '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
    '<x:xmpmeta xmlns:x="adobe:ns:meta/">\n'
    ' <rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">\n'
    '  <rdf:Description rdf:about=""/>\n'
    " </rdf:RDF>\n"
    "</x:xmpmeta>\n"
    '<?xpacket end="w"?>\n'
).encode()
CHUNK = 500  # sidecars per store transaction


class SidecarError(Exception):
    """A sidecar we could not rewrite safely (it is left as it was)."""


class InvalidSidecar(SidecarError):
    """A file that is not valid XMP (it is left as it was)."""


@dataclass(frozen=True)
class Keywords:
    """The values one sidecar should carry from us, one tuple per entry of FIELDS."""

    values: tuple[tuple[str, ...], ...] = ((), (), ())

    @classmethod
    def for_labels(cls, labels: Iterable[str], prefix: str = "piaa") -> Keywords:
        names = tuple(dict.fromkeys(labels))
        if not prefix:
            return cls((names, names, names))
        return cls(
            (names, tuple(f"{prefix}|{n}" for n in names), tuple(f"{prefix}/{n}" for n in names))
        )

    def __bool__(self) -> bool:
        return any(self.values)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.values).encode()).hexdigest()


NONE = Keywords()

_exiv2_module: Any = None


def _exiv2() -> Any:
    """pyexiv2, set up once: errors raise (warnings would go to stdout from C++, so they are
    muted) and our namespace is known."""
    global _exiv2_module
    if _exiv2_module is None:
        try:
            import pyexiv2
        except ImportError as exc:  # a platform with no wheel
            raise PiaaError(f"XMP needs pyexiv2 (pip install pyexiv2): {exc}") from None
        pyexiv2.set_log_level(3)
        pyexiv2.registerNs(NAMESPACE, NS_PREFIX)
        _exiv2_module = pyexiv2
    return _exiv2_module


# -- one sidecar's bytes ---------------------------------------------------------------------


def read_properties(data: bytes) -> dict[str, Any]:
    """The XMP properties of a sidecar's bytes, as exiv2 names them (`Xmp.dc.subject`…)."""
    image = _open(data)
    try:
        return _properties(image)
    finally:
        image.close()


def rewrite(data: bytes | None, ours: Keywords) -> bytes | None:
    """The sidecar `data` (None: no file yet) with our values replaced by `ours`, everything
    else kept; None when nothing changes. An empty `ours` takes all of ours out."""
    image = _open(EMPTY_PACKET if data is None else data)
    try:
        before = _properties(image)
        updates, expected = _plan(before, ours)
        if not updates:
            return None
        try:
            # exiv2 mirrors a sidecar's XMP into Exif and IPTC on reading and back on writing,
            # which would put deleted keywords back and rewrite dates: drop the mirrors first.
            if image.read_iptc():
                image.clear_iptc()
            if image.read_exif():
                image.clear_exif()
            image.modify_xmp(updates)
            out = bytes(image.get_bytes())
        except (RuntimeError, UnicodeDecodeError) as exc:
            raise SidecarError(f"exiv2 could not write it: {_reason(exc)}") from None
    finally:
        image.close()
    _check(out, before, expected)
    return out


def _open(data: bytes) -> Any:
    try:
        return _exiv2().ImageData(data)
    except (RuntimeError, ValueError) as exc:
        raise InvalidSidecar(_reason(exc)) from None


def _properties(image: Any) -> dict[str, Any]:
    try:
        if image.get_mime_type() != XMP_MIME:
            raise InvalidSidecar(f"not an XMP sidecar ({image.get_mime_type()})")
        return dict(image.read_xmp())
    except (RuntimeError, UnicodeDecodeError) as exc:
        raise InvalidSidecar(_reason(exc)) from None


def is_empty(data: bytes) -> bool:
    """Whether a sidecar holds no property at all."""
    return not read_properties(data)


def _plan(before: Mapping[str, Any], ours: Keywords) -> tuple[dict[str, Any], dict[str, list]]:
    """pyexiv2 updates (deletions first) and the lists each managed property must then hold.

    Each managed property ends as the user's values in it, then what we add: the user's
    keywords from every other list that this one lacks (copies, so that no list a reader may
    prefer hides them), then our keywords. Both are recorded as ours; taking ours out (empty
    `ours`) adds nothing."""
    deletes: dict[str, Any] = {}
    sets: dict[str, Any] = {}
    expected: dict[str, list] = {}

    def put(key: str, kind: str, values: list[str]) -> None:
        for old in before:
            if old.startswith(key + "["):
                deletes[old] = None
        deletes[key] = None
        if values:
            # pyexiv2 writes a list as rdf:Seq; dc:subject is a Bag. exiv2's flat form
            # (the array's type, then its items by index) keeps the schema's type.
            sets[key] = f'type="{kind}"'
            sets.update({f"{key}[{i}]": v for i, v in enumerate(values, 1)})

    users = {
        prop: without_each(_as_list(before, prop), _as_list(before, mine))
        for prop, _, mine in FIELDS
    }
    paths = _user_paths(before, users) if ours else []
    for (prop, kind, mine), wanted in zip(FIELDS, ours.values, strict=True):
        current = _as_list(before, prop)
        recorded = _as_list(before, mine)
        user = users[prop]
        copies = _missing(prop, user, paths)
        added = [v for v in dict.fromkeys([*copies, *wanted]) if v not in user]
        expected[prop], expected[mine] = user + added, added
        if user + added != current:
            put(prop, kind, user + added)
        if added != recorded:
            put(mine, "Bag", added)
    return {**deletes, **sets}, expected


def _levels(value: str, separator: str) -> tuple[str, ...]:
    return tuple(level for level in value.split(separator) if level)


def _user_paths(before: Mapping[str, Any], users: Mapping[str, list[str]]) -> list[KeywordPath]:
    """The user's keywords as paths of levels, from every list a reader may show them from:
    the hierarchical lists in the order readers prefer them, then each dc:subject keyword that
    is not already a level of one of those paths (as Lightroom reads dc:subject)."""
    paths: dict[KeywordPath, None] = {}
    for key, separator in SOURCES:
        values = users[key] if key in users else _as_list(before, key)
        for value in values:
            if path := _levels(value, separator):
                paths.setdefault(path)
    levels = {level for path in paths for level in path}
    for value in users[SUBJECT]:
        path = _levels(value, "|")  # darktable writes its hierarchical tags there as a|b
        if path and path not in paths and not (len(path) == 1 and path[0] in levels):
            paths.setdefault(path)
    return list(paths)


def _missing(prop: str, user: list[str], paths: list[KeywordPath]) -> list[str]:
    """The user's keywords (`paths`) that the list `prop` does not show yet, in its own form:
    dc:subject a name (the path's last level), lr:hierarchicalSubject `a|b`, TagsList `a/b`
    (a '/' inside a level written as a backslash, as digiKam does)."""
    have = set(user)
    if prop == SUBJECT:
        return [p[-1] for p in paths if p[-1] not in have and "|".join(p) not in have]
    separator = SEPARATORS[prop]
    have_paths = {_levels(v, separator) for v in user}
    out = []
    for path in paths:
        value = separator.join(level.replace(separator, "\\") for level in path)
        if value not in have and path not in have_paths:
            out.append(value)
    return out


def _as_list(props: Mapping[str, Any], key: str) -> list[str]:
    value = props.get(key)
    if value is None:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    if isinstance(value, dict):
        raise InvalidSidecar(f"{key} is a language alternative, not a list")
    if isinstance(value, str) and value.startswith("type="):
        # exiv2's flat form, used when items carry qualifiers: rewriting would drop those.
        raise InvalidSidecar(f"{key} has items with qualifiers, which we do not rewrite")
    return [str(value)]  # a lone text value where the schema wants a list


def without_each(values: list[str], taken: list[str]) -> list[str]:
    """`values` less one occurrence of each of `taken`."""
    left = Counter(taken)
    out = []
    for v in values:
        if left[v]:
            left[v] -= 1
        else:
            out.append(v)
    return out


def _check(out: bytes, before: Mapping[str, Any], expected: Mapping[str, list]) -> None:
    """Read back what we are about to write: our lists as planned, every other property as
    it was. A surprise from exiv2 fails this file instead of reaching the disk."""
    try:
        after = read_properties(out)
    except InvalidSidecar as exc:
        raise SidecarError(f"exiv2 wrote unreadable XMP: {exc}") from None
    managed = set(expected)

    def others(props: Mapping[str, Any]) -> dict[str, Any]:
        return {
            k: v for k, v in props.items() if k not in managed and k.split("[")[0] not in managed
        }

    kept, was = others(after), others(before)
    changed = sorted(k for k in {*kept, *was} if kept.get(k) != was.get(k))
    if changed:
        raise SidecarError(f"exiv2 would change other properties: {', '.join(changed[:3])}")
    for key, values in expected.items():
        if _as_list(after, key) != values:
            raise SidecarError(f"exiv2 wrote {key} wrong")


def _reason(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


# -- files -------------------------------------------------------------------------------------


def sidecar_names(image: str) -> tuple[str, str]:
    """(IMG.jpg.xmp, IMG.xmp) of an image path."""
    return image + ".xmp", os.path.splitext(image)[0] + ".xmp"


def check_options(prefix: str, naming: str) -> None:
    """Refuse a prefix that would split into two levels, and an unknown naming."""
    if "|" in prefix or "/" in prefix:
        raise UserInputError(f"--prefix must not contain '|' or '/': {prefix!r}")
    if naming not in NAMINGS:
        raise UserInputError(f"--naming must be one of {', '.join(NAMINGS)}, not {naming!r}")


def choose_sidecars(images: Iterable[str], naming: str = "append") -> dict[str, str]:
    """The sidecar of each image: the `naming` one, or the other-named one when only that one
    exists (we merge into what darktable or Lightroom already made). IMG.xmp is never used for
    two images that share a name stem in one folder (IMG.jpg, IMG.png): each gets IMG.EXT.xmp."""
    if naming not in NAMINGS:
        raise UserInputError(f"--naming must be one of {', '.join(NAMINGS)}, not {naming!r}")
    images = sorted(set(images))
    stems = Counter(os.path.splitext(p)[0] for p in images)
    out: dict[str, str] = {}
    for image in images:
        full, stem = sidecar_names(image)
        order = [full, stem] if naming == "append" else [stem, full]
        if stems[os.path.splitext(image)[0]] > 1:
            order.remove(stem)
        out[image] = next((p for p in order if os.path.lexists(p)), order[0])
    return out


def write_atomic(path: str, data: bytes) -> None:
    """Replace `path` by `data`: a temporary file beside it, fsynced, renamed over it. A crash
    leaves the old file or the new one, never half of one (the temporary name is hidden)."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.piaa-tmp")
    # The file's permissions are kept; a new file's are the umask's, as for any the user makes.
    with atomic_write(path, tmp=tmp, exclusive=True, keep_mode=True, sync_folder=True) as fh:
        fh.write(data)


def remove_file(path: str) -> None:
    os.unlink(path)
    fsync_dir(os.path.dirname(path))


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _sha(data: bytes | None) -> str | None:
    return None if data is None else hashlib.sha256(data).hexdigest()


# -- a run over a library --------------------------------------------------------------------

OUTCOMES = (
    "written",  # new sidecars
    "updated",  # existing sidecars whose keywords from us changed
    "unchanged",
    "removed",  # sidecars we had created, deleted (nothing of the user's in them)
    "restored",  # sidecars put back byte for byte as they were before our first write
    "skipped_invalid",  # not valid XMP: left untouched
    "skipped_excluded",  # images in folders the scan excludes (NAS thumbnails, trash, .git…)
    "failed",  # could not read, write or safely rewrite
)


@dataclass
class SyncReport:
    counts: Counter[str] = field(default_factory=Counter)
    paths: dict[str, list[str]] = field(default_factory=dict)
    invalid: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add(self, outcome: str, path: str) -> None:
        self.counts[outcome] += 1
        self.paths.setdefault(outcome, []).append(path)

    def as_dict(self, list_paths: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {name: self.counts[name] for name in OUTCOMES}
        out["invalid"] = self.invalid
        out["errors"] = self.errors
        if list_paths:
            out["paths"] = {k: sorted(v) for k, v in sorted(self.paths.items())}
        return out


class Sidecars:
    """Writes and undoes our keywords in the sidecars of a library's images."""

    def __init__(self, store: Store):
        self.store = store

    def export(
        self,
        tags: Mapping[str, Sequence[str]],
        images: Iterable[str],
        prefix: str = "piaa",
        naming: str = "append",
    ) -> SyncReport:
        """Give each image's sidecar the labels in `tags` (image → present labels); images of
        `images` without labels lose what we wrote before (a vocabulary change)."""
        from piaa_index.ingest.scan import in_excluded_folder

        check_options(prefix, naming)
        report = SyncReport()
        records = self.store.sidecar_records()
        plan: dict[str, Keywords] = {}
        for image, sidecar in choose_sidecars([*images, *tags], naming).items():
            labels = tags.get(image, ())
            if in_excluded_folder(image):
                if labels:
                    report.add("skipped_excluded", image)
                continue
            if labels:
                plan[sidecar] = Keywords.for_labels(labels, prefix)
            elif sidecar in records:
                plan[sidecar] = NONE
        self._apply(plan, records, report)
        return report

    def undo(self, images: Iterable[str]) -> SyncReport:
        """Take out every keyword we wrote: the sidecars the store remembers, and any sidecar
        of `images` that carries our namespace (written with another database, say)."""
        report = SyncReport()
        records = self.store.sidecar_records()
        found = set(records)
        marker = NAMESPACE.encode()
        for image in images:
            for sidecar in sidecar_names(image):
                if sidecar in found:
                    continue
                try:
                    data = _read(sidecar)
                except OSError:
                    continue
                if data is not None and marker in data:
                    found.add(sidecar)
        self._apply(dict.fromkeys(found, NONE), records, report)
        return report

    # -- the work ------------------------------------------------------------------------------

    def _apply(
        self, plan: Mapping[str, Keywords], records: Mapping[str, SidecarRecord], report: SyncReport
    ) -> None:
        paths = sorted(plan)
        for start in range(0, len(paths), CHUNK):
            self._apply_chunk([(p, plan[p]) for p in paths[start : start + CHUNK]], records, report)

    def _apply_chunk(
        self,
        items: list[tuple[str, Keywords]],
        records: Mapping[str, SidecarRecord],
        report: SyncReport,
    ) -> None:
        new_rows: list[dict] = []
        written_rows: list[dict] = []
        # (path, new bytes or None to delete, outcome, forget the record once done)
        actions: list[tuple[str, bytes | None, str, bool]] = []
        forget: list[str] = []
        for path, ours in items:
            if os.path.islink(path):
                # Replacing it would turn the link into a file; writing through it would
                # change a file elsewhere that may not be this image's.
                self._failed(report, path, "a symbolic link, left as it is")
                continue
            try:
                current = _read(path)
            except OSError as exc:
                self._failed(report, path, exc.strerror or str(exc))
                continue
            record = records.get(path)
            if record is not None and current is None:
                # The user deleted it: nothing to take out; a new write starts a new record.
                if not ours:
                    forget.append(path)
                    report.add("unchanged", path)
                    continue
                record = None
            untouched = record is not None and _sha(current) == record.written_sha256
            if (
                ours
                and record is not None
                and untouched
                and ours.digest() == record.keywords_sha256
            ):
                report.add("unchanged", path)  # our last write, with these very keywords
                continue
            if not ours and record is not None and untouched:
                # Everything in it beyond the original is ours: back to exactly what it was.
                if record.created:
                    actions.append((path, None, "removed", True))
                    continue
                original = self.store.sidecar_original(path) if record.has_original else None
                if original is not None:
                    actions.append((path, original, "restored", True))
                    continue
            try:
                new = rewrite(current, ours)
            except InvalidSidecar as exc:
                report.add("skipped_invalid", path)
                report.invalid.append(path)
                report.errors.append(f"{path}: not valid XMP, left untouched ({exc})")
                continue
            except SidecarError as exc:
                self._failed(report, path, str(exc))
                continue
            if new is None:
                report.add("unchanged", path)
                if not ours and record is not None:
                    forget.append(path)
                continue
            if not ours:
                if record is not None and record.created and is_empty(new):
                    actions.append((path, None, "removed", True))
                else:
                    actions.append((path, new, "updated", record is not None))
                continue
            if record is None:
                new_rows.append(
                    {
                        "path": path,
                        "created": current is None,
                        "original": current,
                        "written_sha256": _sha(new),
                        "keywords_sha256": ours.digest(),
                    }
                )
            else:
                keep = untouched or (
                    record.has_original and current == self.store.sidecar_original(path)
                )
                written_rows.append(
                    {
                        "path": path,
                        "written_sha256": _sha(new),
                        "keywords_sha256": ours.digest(),
                        "keep_original": keep,
                    }
                )
            actions.append((path, new, "written" if current is None else "updated", False))
        # Remember before writing: a crash in between leaves a record whose hash the file does
        # not have, which later runs read as "touched" (or, equal to the original, as untouched).
        if new_rows or written_rows:
            self.store.record_sidecars(new_rows, written_rows)
        for path, data, outcome, done in actions:
            try:
                if data is None:
                    remove_file(path)
                else:
                    write_atomic(path, data)
            except FileNotFoundError as exc:
                if data is not None:
                    self._failed(report, path, exc.strerror or str(exc))
                    continue
            except OSError as exc:
                self._failed(report, path, exc.strerror or str(exc))
                continue
            report.add(outcome, path)
            if done:
                forget.append(path)
        if forget:
            self.store.forget_sidecars(forget)

    @staticmethod
    def _failed(report: SyncReport, path: str, reason: str) -> None:
        report.add("failed", path)
        report.errors.append(f"{path}: {reason}")
