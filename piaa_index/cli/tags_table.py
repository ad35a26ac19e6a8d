"""The human table of `piaa tags IMAGE`: what a person reads in a terminal.

The query's rows carry every number (fused, patch, [CLS] and text scores, threshold, gate,
the label's status, a reason); `--json` and `--csv` keep them all. The table keeps what a
person decides with — label, score, whether it is tagged, the label's status, why in a few
words — and names the image once, so it fits a normal terminal.
"""

from __future__ import annotations

from typing import Any

from piaa_index.cli.common import format_table

WHY_WIDTH = 34

# The reasons of piaa_index.library.searching._why, shortened; the label's status (weak, absent) has
# its own column, so the "(weak label…)" remarks are dropped.
_SHORT = (
    ("confidence at or above one half", "confidence >= 0.5"),
    ("confidence below one half", "confidence < 0.5"),
    ("best patch short of the label's text level", "patch short of the label's text level"),
    ("label absent from the collection", "label absent from the collection"),
    ("patch evidence at or above the threshold", "evidence >= threshold"),
    ("patch evidence below the threshold", "evidence < threshold"),
    ("text support below the gate", "text support < gate"),
)


def short_why(why: Any) -> str:
    """A few words for the `why` of a tags row; an unknown reason is cut to WHY_WIDTH."""
    text = "" if why is None else str(why)
    for long, short in _SHORT:
        if text.startswith(long):
            return short
    return text if len(text) <= WHY_WIDTH else text[: WHY_WIDTH - 1].rstrip() + "…"


def tags_table(rows: list[dict[str, Any]]) -> str:
    """The image's path once, then one short line per label."""
    paths = list(dict.fromkeys(str(r.get("path", "")) for r in rows))
    present = sum(1 for r in rows if r.get("present"))
    head = f"{', '.join(paths)}  ({present} of {len(rows)} labels present)"
    columns = ["label", "score", "present", "label status", "why"]
    table = [
        {
            "label": r.get("label"),
            "score": _score(r.get("score")),
            "present": bool(r.get("present")),
            "label status": (r.get("label_status") or "")
            + (" (learnt)" if r.get("learnt") else ""),
            "why": short_why(r.get("why")),
        }
        for r in rows
    ]
    return head + "\n" + format_table(table, columns)


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))
