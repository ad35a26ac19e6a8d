"""Learning from users' labels in the library: the stored vectors of the labelled images in,
a classifier and tag rule with the learnt labels installed out (the method: learning.py).

Nothing here re-reads an image: the labelled images' patches and [CLS] vectors come from the
vector store, and what is learnt is the same per-label parameters a training-free fit makes
(patch row, [CLS] prototype, calibration), so every query works on learnt labels unchanged.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Container, Iterable, Mapping, Sequence
from dataclasses import replace
from hashlib import blake2b
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.durable import write_bytes_atomic
from piaa_index.errors import UserInputError
from piaa_index.method.learning import Examples, LearnParams, Learnt, learn
from piaa_index.query.language import normalize_label
from piaa_index.spill import SpilledArray

if TYPE_CHECKING:
    from piaa_index.method.decisions import Decisions
    from piaa_index.method.pvcl import Classifier
    from piaa_index.vectors.shards import VectorStore

# Images of the collection whose training-free scores set the learnt labels' z-scores.
REFERENCE_IMAGES = 2000
# Library images presumed absent for a label that has positives but too few negatives.
PRESUMED_NEGATIVES = 512


def read_examples(
    vectors: VectorStore,
    classifier: Classifier,
    locations: Sequence[tuple[int, int, int]],
    labels: dict[int, np.ndarray],
    folder: Path | None = None,
) -> Examples:
    """The labelled images' vectors, in `locations` order; `labels` maps image id to its
    [C] int8 row (1 present, 0 absent, -1 not labelled). The patches go to an unnamed file in
    `folder` (float16: 10,000 labelled ViT-B/16 images are 2 GB, 50,000 would be 10), of which
    learning reads the rows it works on; the rest is small and held."""
    M, d = vectors.n_patches, vectors.dim
    patches = SpilledArray((M, d), np.float16, folder)
    background: list[np.ndarray] = [np.zeros((0, M), np.float32)]
    cls: list[np.ndarray] = [np.zeros((0, d), np.float32)]
    rows: list[np.ndarray] = [np.zeros((0, classifier.n_classes), np.int8)]
    for chunk in vectors.iter_live(list(locations)):
        n = len(chunk.image_ids)
        flat = np.asarray(chunk.patches, np.float32).reshape(n * M, d)
        patches.append(flat.reshape(n, M, d))
        background.append(classifier.background_logdensity(flat).reshape(n, M))
        cls.append(np.asarray(chunk.cls, np.float32))
        rows.append(np.stack([labels[int(i)] for i in chunk.image_ids]).astype(np.int8))
    return Examples(patches, np.concatenate(background), np.concatenate(cls), np.concatenate(rows))


def reference_scores(
    vectors: VectorStore,
    classifier: Classifier,
    T: np.ndarray,
    locations: Sequence[tuple[int, int, int]],
    limit: int = REFERENCE_IMAGES,
) -> tuple[np.ndarray, np.ndarray]:
    """(E, C) [n, C] of up to `limit` images of the collection (evenly spread) under the
    training-free classifier: what the learnt labels' z-scores are relative to."""
    from piaa_index.method import fusion

    locs = list(locations)
    if len(locs) > limit:
        pick = np.linspace(0, len(locs) - 1, limit).round().astype(int)
        locs = [locs[i] for i in np.unique(pick)]
    E, C = [], []
    for chunk in vectors.iter_live(locs):
        scores = fusion.score_images(chunk.cls, chunk.patches, T, classifier)
        E.append(scores.patch)
        C.append(scores.cls)
    return np.concatenate(E), np.concatenate(C)


def learn_labels(
    vectors: VectorStore,
    classifier: Classifier,
    T: np.ndarray,
    labelled: Sequence[tuple[int, int, int]],
    labels: dict[int, np.ndarray],
    collection: Sequence[tuple[int, int, int]],
    params: LearnParams | None = None,
    folder: Path | None = None,
) -> Learnt:
    """Learn from the labelled images (`labelled` locations, `labels` rows by image id); their
    patches wait in an unnamed file in `folder` meanwhile (read_examples)."""
    ex = read_examples(vectors, classifier, labelled, labels, folder)
    try:
        reference = reference_scores(vectors, classifier, T, collection)
        return learn(ex, classifier.W, classifier.b, T, classifier.scale, reference, params)
    finally:
        if isinstance(ex.patches, SpilledArray):
            ex.patches.close()


def with_learnt(classifier: Classifier, learnt: Learnt, T: np.ndarray) -> Classifier:
    """The classifier with the chosen labels' patch rows and [CLS] prototypes learnt (the
    others keep theirs: `T`, the text prototypes, unless taught before)."""
    chosen = learnt.chosen
    if not chosen.any():
        return classifier
    W, b = classifier.W.copy(), classifier.b.copy()
    W[chosen], b[chosen] = learnt.W[chosen], learnt.b[chosen]
    before = T if classifier.cls_protos is None else classifier.cls_protos
    protos = np.array(before, np.float32)
    protos[chosen] = learnt.cls_protos[chosen]
    return replace(classifier, W=W, b=b, cls_protos=protos)


def learnt_decisions(decisions: Decisions, learnt: Learnt) -> Decisions:
    """The tag rule with the chosen labels' confidence being the learnt one: their calibration
    is what the learning fitted, and their status says so (no text gate: the user's own
    labels say the collection holds them). Every label that tried to learn has its record in
    its status, used or not."""
    from piaa_index.method.decisions import Calibration, Decisions

    cal = decisions.calibration
    if cal is None:
        return decisions
    arrays = {k: np.array(v, np.float64) for k, v in vars(cal).items() if k != "alpha"}
    thresholds, gate = decisions.thresholds.copy(), decisions.support_gate.copy()
    status = [dict(r) for r in decisions.status]
    for c in (int(k) for k in np.flatnonzero(learnt.chosen)):
        for name in ("e_center", "e_scale", "c_center", "c_scale", "slope", "intercept"):
            arrays[name][c] = getattr(learnt, name)[c]
        thresholds[c], gate[c] = 0.5, -np.inf
        status[c] = {**status[c], "status": "present", "source": "learnt"}
    for key, rec in learnt.report.items():
        status[int(key)] = {**status[int(key)], "learning": rec}
    return Decisions(
        thresholds, gate, status, dict(decisions.info), Calibration(**arrays, alpha=cal.alpha)
    )


def complete_rows(image_labels: dict[int, set[str]], names: Sequence[str]) -> dict[int, np.ndarray]:
    """Rows for completely labelled images: each label present where listed, else absent."""

    column = {normalize_label(n): c for c, n in enumerate(names)}
    out: dict[int, np.ndarray] = {}
    for image_id, listed in image_labels.items():
        row = np.zeros(len(names), np.int8)
        for name in listed:
            c = column.get(normalize_label(name))
            if c is not None:
                row[c] = 1
        out[image_id] = row
    return out


def user_label_rows(
    entries: Iterable[tuple[int, str, str, bool, str]],
    names: Sequence[str],
    live: Container[int],
) -> dict[int, np.ndarray]:
    """The user's labels (`Store.user_labels` rows) of live images as [C] int8 rows by image
    id: 1 present, 0 absent, -1 not labelled (labels outside the vocabulary are left out)."""
    column = {normalize_label(n): c for c, n in enumerate(names)}
    rows: dict[int, np.ndarray] = {}
    for image_id, key, _name, present, _source in entries:
        c = column.get(key)
        if c is None or image_id not in live:
            continue
        rows.setdefault(image_id, np.full(len(column), -1, np.int8))[c] = int(present)
    return rows


def presume_negatives(
    rows: Mapping[int, np.ndarray], live_ids: Sequence[int], params: LearnParams | None = None
) -> tuple[dict[int, np.ndarray], dict[int, int]]:
    """The user's label rows, plus presumed negatives: for each label with enough positives
    but too few negatives to learn (a concept taught from examples alone, tags only ever
    confirmed), up to PRESUMED_NEGATIVES live images not labelled for it, as absent. Most of
    a library lacks any one label, so a sample of it stands for "elsewhere"; held-out
    validation still decides whether what is learnt is used. The sample is fixed by the live
    ids. Returns (rows, presumed negatives per label column)."""
    p = params or LearnParams()
    out = dict(rows)
    if not rows:
        return out, {}
    Y = np.stack(list(rows.values()))
    wanting = np.flatnonzero(((Y == 1).sum(axis=0) >= p.min_positives)
                             & ((Y == 0).sum(axis=0) < p.min_negatives))  # fmt: skip
    if not len(wanting):
        return out, {}
    ids = np.asarray(sorted(live_ids), np.int64)
    order = ids[np.random.default_rng(0).permutation(len(ids))]
    C = Y.shape[1]
    presumed = {}
    for c in (int(k) for k in wanting):
        taken = 0
        for i in (int(k) for k in order):
            if taken == PRESUMED_NEGATIVES:
                break
            row = out.get(i)
            if row is not None and row[c] >= 0:
                continue
            row = np.full(C, -1, np.int8) if row is None else row.copy()
            row[c] = 0
            out[i] = row
            taken += 1
        presumed[c] = taken
    return out, presumed


def label_digests(rows: Mapping[int, np.ndarray], names: Sequence[str]) -> dict[str, str]:
    """Per label (by name), a digest of its own labels (image id, present): what its learning
    read. A label re-learns when its digest moves, and only then (`Tagger.fit`)."""
    ids = np.array(sorted(rows), np.int64)
    if not len(ids):
        return {n: "" for n in names}
    Y = np.stack([rows[int(i)] for i in ids])
    out = {}
    for c, name in enumerate(names):
        known = Y[:, c] >= 0
        pairs = np.stack([ids[known], Y[known, c].astype(np.int64)], axis=1)
        out[name] = blake2b(pairs.tobytes(), digest_size=12).hexdigest() if known.any() else ""
    return out


def widened(learnt: Learnt, columns: Sequence[int], n_labels: int) -> Learnt:
    """A `Learnt` of some labels (learnt alone: label j is column columns[j]) as one of all
    `n_labels`, the others not chosen (their parameters zero: never installed)."""
    cols = np.asarray(columns, np.int64)

    def placed(a: np.ndarray) -> np.ndarray:
        out = np.zeros((n_labels, *a.shape[1:]), a.dtype)
        out[cols] = a
        return out

    names = ("W", "b", "cls_protos", "e_center", "e_scale", "c_center", "c_scale", "slope",
             "intercept", "chosen")  # fmt: skip
    arrays: dict[str, Any] = {name: placed(getattr(learnt, name)) for name in names}
    report = {str(int(cols[int(j)])): rec for j, rec in learnt.report.items()}
    return replace(learnt, **arrays, report=report)


def summary(learnt: Learnt, names: Sequence[str]) -> dict[str, Any]:
    """Which labels use what was learnt, and why (per label, by name)."""
    return {
        "learnt": [names[int(c)] for c in np.flatnonzero(learnt.chosen)],
        "seconds": round(learnt.seconds, 2),
        "labels": {names[int(c)]: rec for c, rec in learnt.report.items()},
    }


def read_label_csv(path: str | Path) -> dict[str, set[str]]:
    """A `path,label` CSV (header first, one row per image and label; a row with an empty
    label lists an image that has none of the vocabulary's labels): labels by absolute path.
    Relative paths are relative to the CSV's folder. Malformed files raise UserInputError
    naming the line."""

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise UserInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
    rows = list(csv.reader(text.splitlines()))
    if not rows or [c.strip().lower() for c in rows[0][:2]] != ["path", "label"]:
        raise UserInputError(f"{path}: line 1 must be the header `path,label`")
    out: dict[str, set[str]] = {}
    for line, row in enumerate(rows[1:], start=2):
        if not row or not any(cell.strip() for cell in row):
            continue
        if len(row) > 2:
            raise UserInputError(
                f"{path}: line {line} has {len(row)} fields, expected 2 (path,label); quote "
                "a label that holds a comma"
            )
        image = row[0].strip()
        if not image:
            raise UserInputError(f"{path}: line {line} has no path")
        label = row[1].strip() if len(row) > 1 else ""
        full = Path(image)
        if not full.is_absolute():
            full = path.parent / full
        labels = out.setdefault(str(full.resolve()), set())
        if label:
            labels.add(label)
    return out


def label_csv(rows: Mapping[str, Sequence[str]]) -> tuple[str, int]:
    """Labels by path as `path,label` CSV text (an image with none: one empty-label row), and
    the number of rows under the header."""

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label"])
    n = 0
    for image, labels in rows.items():
        for label in labels or [""]:
            writer.writerow([image, label])
            n += 1
    return buf.getvalue(), n


def write_label_csv(path: str | Path, rows: Mapping[str, Sequence[str]]) -> int:
    """Write `label_csv(rows)` to `path` atomically; returns the rows written."""

    text, n = label_csv(rows)
    write_bytes_atomic(text.encode(), Path(path))
    return n
