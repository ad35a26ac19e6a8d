"""The fit alone (streaming pass, then re-tag) on a library kept by bench_scale.py, timed per
phase with a breakdown of where each phase spends its time. Prints one JSON object.

    python benchmarks/bench_scale.py --images 10000 --geometry vit-b-16 --home /tmp/lib --keep
    python benchmarks/bench_retag.py --home /tmp/lib --geometry vit-b-16 --runs 2

The breakdown wraps the functions a fit goes through with timers (inclusive times, by phase:
"pass" until the re-tag starts, "retag" after); `--profile N` also prints the N costliest
functions of the last run's re-tag under cProfile (to stderr).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import importlib
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# What a fit goes through: (module, attribute path) pairs; missing ones are skipped, so the
# script keeps working as the code moves.
TIMED = [
    ("piaa_index.vectors.shards", "VectorStore.read_shard"),
    ("piaa_index.method.pvcl", "BankBuilder.update"),
    ("piaa_index.method.pvcl", "fit_from_banks"),
    ("piaa_index.method.pvcl", "Classifier.raw_logits"),
    ("piaa_index.method.fusion", "score_images"),
    ("piaa_index.method.fusion", "cls_scores"),
    ("piaa_index.method.fusion", "patch_evidence"),
    ("piaa_index.method.fusion", "text_support"),
    ("piaa_index.method.fusion", "fuse"),
    ("piaa_index.vectors.scores", "SegmentWriter.write"),
    ("piaa_index.vectors.scores", "SegmentWriter.finish"),
    ("piaa_index.method.decisions", "label_decisions"),
    ("piaa_index.catalog.vocabularies", "VocabulariesMixin.install_classifier"),
    ("piaa_index.vectors.scores", "cleanup"),
]


class Timers:
    def __init__(self) -> None:
        self.phase = "pass"
        self.totals: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, module: str, path: str) -> None:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
            if owner is None:
                return
        fn = owner.__dict__.get(name) if isinstance(owner, type) else getattr(owner, name, None)
        if fn is None:
            return
        timers = self

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                timers.totals[timers.phase][path] += time.perf_counter() - t

        self._undo.append((owner, name, fn))
        setattr(owner, name, timed)

    def undo(self) -> None:
        for owner, name, fn in reversed(self._undo):
            setattr(owner, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, help="a library kept by bench_scale.py --keep")
    ap.add_argument("--geometry", default="shapesworld")
    ap.add_argument("--labels", type=int, default=80)
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --home)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--profile", type=int, default=0, help="print the top N re-tag functions")
    ap.add_argument("--save", default=None, help="save the fitted score matrix here (.npz)")
    ap.add_argument(
        "--compare", default=None, help="compare the score matrix with one saved by --save"
    )
    args = ap.parse_args()

    from piaa_index.library import tagging
    from tools import scale

    world = scale.World.make(args.labels, args.geometry)
    lib = scale.open_library(Path(args.home), world, args.db)
    out: dict[str, Any] = {"home": args.home, "geometry": args.geometry}
    out["images"] = len(lib.store.live_locations())
    out["database"] = lib.store.engine.dialect.name
    runs = []
    breakdown: dict[str, dict[str, float]] = {}
    for run in range(args.runs):
        timers = Timers()
        for module, path in TIMED:
            timers.wrap(module, path)
        original = tagging.Tagger._tag_all
        prof = cProfile.Profile() if args.profile and run == args.runs - 1 else None

        def tag_all(
            self: Any,
            *a: Any,
            _t: Timers = timers,
            _orig: Any = original,
            _prof: cProfile.Profile | None = prof,
            **k: Any,
        ) -> Any:
            _t.phase = "retag"
            if _prof is None:
                return _orig(self, *a, **k)
            _prof.enable()
            try:
                return _orig(self, *a, **k)
            finally:
                _prof.disable()

        tagging.Tagger._tag_all = tag_all  # type: ignore[method-assign]
        try:
            report = lib.fit()
        finally:
            tagging.Tagger._tag_all = original  # type: ignore[method-assign]
            timers.undo()
        runs.append(
            {
                "stream_pass_s": report.fit_seconds,
                "retag_s": report.tag_seconds,
                "ratio": round(report.tag_seconds / max(report.fit_seconds, 1e-9), 3),
            }
        )
        breakdown = {
            phase: {k: round(v, 3) for k, v in sorted(t.items(), key=lambda kv: -kv[1])}
            for phase, t in timers.totals.items()
        }
        out["tagged_present_rows"] = sum(report.tagged_present.values())
        if prof is not None:
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
            print(buf.getvalue(), file=sys.stderr)
    out["runs"] = runs
    if args.save or args.compare:
        mats = _matrix(lib)
        if args.save:
            np.savez(args.save, **mats)
        if args.compare:
            out["compare"] = _compare(mats, dict(np.load(args.compare)))
    out["ratio_median"] = round(statistics.median(r["ratio"] for r in runs), 3)
    out["breakdown_last_run_s"] = breakdown
    out["load_avg"] = os.getloadavg()
    lib.close()
    print(json.dumps(out, indent=1))


def _matrix(lib: Any) -> dict[str, np.ndarray]:
    """The current classifier's score matrix (every segment), rows sorted by image id."""
    from piaa_index.vectors.scores import Segment

    row = lib.store.latest_classifier()
    folder = lib.tagger.scores_dir / row.scores_key
    segs = [Segment.open(folder, name) for name in row.score_segments]
    ids = np.concatenate([s.ids for s in segs])
    order = np.argsort(ids, kind="stable")
    out = {"ids": ids[order]}
    for kind in ("S", "E", "C", "U", "present"):
        out[kind] = np.concatenate([np.asarray(s.mats[kind]) for s in segs], axis=1)[:, order]
    return out


def _compare(new: dict[str, np.ndarray], old: dict[str, np.ndarray]) -> dict[str, Any]:
    """How far the new matrix is from the old: max abs / relative differences, flipped tags."""
    if not np.array_equal(new["ids"], old["ids"]):
        return {"error": "different images"}
    out: dict[str, Any] = {}
    for kind in ("S", "E", "C", "U"):
        a, b = new[kind].astype(np.float64), old[kind].astype(np.float64)
        diff = np.abs(a - b)
        out[kind] = {
            "max_abs": float(diff.max()),
            "max_rel": float((diff / np.maximum(np.abs(b), 1e-30)).max()),
            "identical_fraction": float((a == b).mean()),
        }
    flips = new["present"] != old["present"]
    out["present_flips"] = int(flips.sum())
    out["present_cells"] = int(old["present"].sum())
    # Rank agreement of the top 100 per label by fused score.
    top = [
        len(set(np.argsort(-new["S"][c])[:100]) & set(np.argsort(-old["S"][c])[:100])) / 100
        for c in range(len(new["S"]))
    ]
    out["top100_overlap_min"] = float(min(top))
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
