"""A parsed label query compiled to vectorised numpy over score-matrix columns.

`compile_query(node)` walks the AST once and returns a `Plan`; running it evaluates every image
at once with the semantics of `Node.evaluate` / `Node.score` (AND = all / min, OR = any / max,
NOT = not / 1 - x, scores clipped to [0, 1], float64), so results equal the per-image Python
evaluation. `top_k` ranks as `Library.search` always has: score descending, then image id.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from piaa_index.query_language import And, Label, Node, Not, Or

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
    from piaa_index.errors import UserInputError
    from piaa_index.query_language import QueryError, parse

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
    of a fresh process (piaa_index/store_readonly.py), so both answer alike.
    """
    from piaa_index.query_language import normalize_label

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
        from piaa_index.errors import LibraryError

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
