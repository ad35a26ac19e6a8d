"""A parsed label query compiled to vectorised numpy over score-matrix columns.

`compile_query(node)` walks the AST once and returns a `Plan`; running it evaluates every image
at once with the semantics of `Node.evaluate` / `Node.score` (AND = all / min, OR = any / max,
NOT = not / 1 - x, scores clipped to [0, 1], float64), so results equal the per-image Python
evaluation. `top_k` ranks as `Library.search` always has: score descending, then image id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from piaa_index.errors import LibraryError, UserInputError
from piaa_index.query.language import And, Label, Node, Not, Or, QueryError, normalize_label, parse

# (present columns, score columns) by normalised label -> (match [N] bool, score [N] float64)
_Eval = Callable[
    [Mapping[str, np.ndarray], Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]
]


@dataclass(frozen=True)
class Plan:
    labels: frozenset[str]
    run: _Eval


def compile_query(node: Node) -> Plan:
    return Plan(node.labels(), _compile(node))


def _compile(node: Node) -> _Eval:
    if isinstance(node, Label):
        name = node.name

        def label(present: Mapping[str, np.ndarray], scores: Mapping[str, np.ndarray]):  # type: ignore[no-untyped-def]
            s = np.clip(np.asarray(scores[name], dtype=np.float64), 0.0, 1.0)
            return np.asarray(present[name], dtype=bool), s

        return label
    if isinstance(node, Not):
        child = _compile(node.child)

        def negate(present, scores):  # type: ignore[no-untyped-def]
            m, s = child(present, scores)
            return ~m, 1.0 - s

        return negate
    if isinstance(node, And | Or):
        children = [_compile(c) for c in node.children]
        both, pick = (
            (np.logical_and, np.minimum) if isinstance(node, And) else (np.logical_or, np.maximum)
        )

        def combine(present, scores):  # type: ignore[no-untyped-def]
            m, s = children[0](present, scores)
            for child in children[1:]:
                cm, cs = child(present, scores)
                m, s = both(m, cm), pick(s, cs)
            return m, s

        return combine
    raise TypeError(f"cannot compile {type(node).__name__}")


def top_k(ids: np.ndarray, scores: np.ndarray, k: int | None) -> np.ndarray:
    """Positions of the k best rows by (score descending, id ascending), in that order."""
    n = len(ids)
    if k is None or k >= n:
        idx = np.arange(n)
    elif k <= 0:
        return np.zeros(0, dtype=np.int64)
    else:
        # argpartition finds the k-th best score; every row tied with it competes on id.
        kth = scores[np.argpartition(-scores, k - 1)[k - 1]]
        idx = np.nonzero(scores >= kth)[0]
    order = idx[np.lexsort((ids[idx], -scores[idx]))]
    return order if k is None else order[:k]


class ScoreColumns(Protocol):
    """What a search reads: the score matrix's rows (`ids`, `valid`) and label columns."""

    ids: np.ndarray
    valid: np.ndarray

    def column(self, kind: str, label: int) -> np.ndarray: ...


def parse_query(expression: str, labels: Sequence[str]) -> Node:
    """The expression's syntax tree; a syntax error or unknown label is the user's mistake."""

    try:
        return parse(expression, known_labels=labels)
    except QueryError as exc:
        raise UserInputError(str(exc)) from None


def search_rows(
    node: Node,
    labels: Sequence[str],
    view: ScoreColumns,
    paths_of: Callable[[list[int]], Mapping[int, str]],
    limit: int | None = 20,
    include_absent: bool = False,
) -> list[dict[str, Any]]:
    """`Library.search` of a parsed query (`parse_query`) over a score matrix whose column c is
    label `labels[c]`.

    Matching uses the tag decisions, ranking the fused scores (AND = weakest label); with
    `include_absent` the other valid rows are ranked below the matches. Paths are fetched
    (`paths_of(ids)`) for the returned rows only. Shared by `Searcher` and the read-only path
    of a fresh process (piaa_index/catalog/readonly.py), so both answer alike.
    """

    plan = compile_query(node)
    # The parser normalises names; rows show them as the vocabulary spells them.
    column = {normalize_label(name): c for c, name in enumerate(labels)}
    present = {key: view.column("present", column[key]) for key in plan.labels}
    fused = {key: view.column("S", column[key]) for key in plan.labels}
    match, score = plan.run(present, fused)
    match = match & view.valid
    hit_rows = np.nonzero(match)[0]
    rows = hit_rows[top_k(view.ids[hit_rows], score[hit_rows], limit)]
    if include_absent and (limit is None or len(rows) < limit):
        rest = np.nonzero(view.valid & ~match)[0]
        more = None if limit is None else limit - len(rows)
        rows = np.concatenate([rows, rest[top_k(view.ids[rest], score[rest], more)]])
    ids = [int(i) for i in view.ids[rows]]
    paths = paths_of(ids)
    lost = [i for i in ids if i not in paths]
    if lost:
        raise LibraryError(
            f"the database has no image {lost[0]} that the score matrix holds: the database "
            "file is damaged, or the image was removed meanwhile (`piaa db check` tells)"
        )
    wanted = sorted((labels[column[key]], key) for key in plan.labels)
    return [
        {
            "path": paths[image_id],
            "score": round(float(score[r]), 6),
            "match": bool(match[r]),
            "labels": {
                name: {
                    "score": round(float(fused[key][r]), 6),
                    "present": bool(present[key][r]),
                }
                for name, key in wanted
            },
        }
        for r, image_id in zip(rows, ids, strict=True)
    ]


# --------------------------------------------------------------------- tags of one image


def path_candidates(path: str | Path) -> list[str]:
    """The stored paths a path the user typed may be, in order: the absolute path with links
    kept (a link indexed in a walked folder is its own row), as typed, then resolved (a root
    given through a link is stored resolved)."""
    given = Path(path).expanduser()
    return list(dict.fromkeys([os.path.abspath(given), str(path), str(given.resolve())]))


def tag_rows(
    names: list[str], rule: Any, mats: dict[str, np.ndarray], r: int, stored_path: str
) -> list[dict[str, Any]]:
    """`tags` rows of the image at column r of a score segment's matrices (S, E, C, U,
    present: [C, n]) under the tag rule `rule` (`Decisions`): best first, vocabulary order on
    ties. The one home of the row format, for the library and the read-only path."""
    S = np.asarray(mats["S"][:, r], dtype=np.float64)
    E = np.asarray(mats["E"][:, r], dtype=np.float64)
    Cs = np.asarray(mats["C"][:, r], dtype=np.float64)
    U = np.asarray(mats["U"][:, r], dtype=np.float64)
    present = np.asarray(mats["present"][:, r], dtype=bool)
    # Open world: the best patch's log-odds on the collection's scale for that label
    # (`Calibration.relative_evidence`, what the evidence map shows); gates read the raw E.
    shown_E = E if rule.calibration is None else rule.calibration.relative_evidence(E)
    order = np.lexsort((np.arange(len(S)), -S))
    return [
        {
            "path": stored_path,
            "label": names[c],
            "score": float(S[c]),
            "patch_score": float(shown_E[c]),
            "cls_score": float(Cs[c]),
            "present": bool(present[c]),
            "threshold": _bound(rule.thresholds[c]),
            "text_support": float(U[c]),
            "support_gate": _bound(rule.support_gate[c]),
            "label_status": rule.status[c].get("status", "present"),
            # The label's score was learnt from the user's labels (keywords.py).
            "learnt": rule.status[c].get("source") == "learnt",
            "why": _why(bool(present[c]), rule, c, float(E[c]), float(U[c]), float(S[c])),
        }
        for c in order
    ]


def _why(present: bool, rule: Any, c: int, evidence: float, support: float, score: float) -> str:
    """One phrase on why a label is or is not tagged on an image."""
    status = rule.status[c].get("status", "present")
    if status == "absent":
        return "label absent from the collection"
    weak = " (weak label: surest images only)" if status == "weak" else ""
    if rule.calibration is not None:
        if present:
            return "confidence at or above one half" + weak
        if support < rule.support_gate[c]:
            return "best patch short of the label's text level (confidence halved)" + weak
        return "confidence below one half"
    if present:
        return "patch evidence at or above the threshold" + (
            " (weak label: surest images only)" if status == "weak" else ""
        )
    if evidence < rule.thresholds[c]:
        return "patch evidence below the threshold"
    return "text support below the gate" + (" (weak label)" if status == "weak" else "")


def _bound(value: float) -> float | None:
    """A threshold or gate for output: None where it is infinite (JSON has no infinity; an
    absent label's threshold is +inf, "no gate" is -inf, and `label_status` says which)."""
    return float(value) if np.isfinite(value) else None
