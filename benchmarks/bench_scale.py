"""The query engine at scale: a synthetic library built through the index write path, timed
through the public Python API. Prints one JSON object.

    python benchmarks/bench_scale.py --images 100000 --geometry shapesworld --home /tmp/lib

Vectors are drawn around label clusters (tools/scale.py) instead of being encoded; the
fit uses a stand-in encoder that returns text prototypes near those clusters. With --keep the
library stays in --home and the CLI can query it (`piaa --home DIR search "l000 AND l001"`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.library.core import Library

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import scale  # noqa: E402


def _timed(fn: Any, runs: int) -> dict[str, float]:
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return {
        "p50_ms": round(1000 * statistics.median(times), 3),
        "p95_ms": round(1000 * times[min(len(times) - 1, int(0.95 * len(times)))], 3),
        "runs": runs,
    }


def _once(fn: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn()
    return out, round(1000 * (time.perf_counter() - t), 3)


def _disk(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale.library_arguments(ap, images=10_000)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument(
        "--codec", default=None, help="patch codec of the new library (default: the default)"
    )
    args = ap.parse_args()

    if args.codec:
        os.environ["PIAA_VECTOR_CODEC"] = args.codec
    home = Path(args.home)
    lib, world = scale.new_library(args)
    out: dict[str, Any] = {
        "images": args.images,
        "geometry": args.geometry,
        "labels": args.labels,
        "database": lib.store.engine.dialect.name,
    }
    t = time.perf_counter()
    scale.add_images(lib, world, args.images)
    out["build_s"] = round(time.perf_counter() - t, 2)
    # What `index` pays at its end: the [CLS] and text-search indexes (no query builds them).
    _, out["derived_indexes_ms"] = _once(lib.update_indexes)
    lib.set_vocabulary(scale.label_names(args.labels))
    report = lib.fit()
    out["fit"] = {
        "stream_pass_s": report.fit_seconds,
        "retag_s": report.tag_seconds,
        "total_s": report.seconds,
    }
    query = "l000 AND l001"
    _, out["search_cold_ms"] = _once(lambda: lib.search(query))
    out["search_warm"] = _timed(lambda: lib.search(query), args.runs)
    out["search_or_not_warm"] = _timed(lambda: lib.search("(l002 OR l003) AND NOT l000"), 10)
    probe = lib.search(query, limit=1)[0]["path"]
    out["tags_warm"] = _timed(lambda: lib.tags(probe), args.runs)
    out["status_warm"] = _timed(lambda: lib.status(), args.runs)
    # Reopened: what a fresh CLI process pays (classifier and matrix loaded once).
    lib2 = Library.open(home=home, db=args.db, encoder_factory=scale.encoder_factory(world))
    _, out["tags_fresh_process_ms"] = _once(lambda: lib2.tags(probe))
    lib2.close()

    _, out["similar_first_ms"] = _once(lambda: lib.similar(probe))
    out["similar_kind"] = lib.searcher._similar.kind
    out["similar_warm"] = _timed(lambda: lib.similar(probe), args.runs)
    out["similar_recall_at_20"] = _recall(lib, 20)
    if lib.searcher._similar.kind == "flat" and args.images >= 50_000:
        out["similar_ivf"] = _ivf(lib, probe, args.runs)

    out["text_search"] = _text_search(lib, args.labels, args.runs)

    scale.add_images(lib, world, 1000, start=args.images, seed=1)
    _, out["text_search_after_adding_1000_ms"] = _once(lambda: lib.text_search("l005"))
    _, out["search_after_adding_1000_ms"] = _once(lambda: lib.search(query))
    _, out["similar_after_adding_1000_ms"] = _once(lambda: lib.similar(probe))
    # (the two queries above answered before the sync: the 1,000 scored exactly)
    _, out["derived_indexes_after_adding_1000_ms"] = _once(lib.update_indexes)
    out["search_warm_after_add"] = _timed(lambda: lib.search(query), args.runs)

    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    n = args.images + 1000
    vec = (
        _disk(lib.vectors_dir)
        - _disk(lib.tagger.scores_dir)
        - _disk(lib.vectors_dir / "similar")
        - _disk(lib.vectors_dir / "text")
    )
    db_file = home / "piaa.sqlite3"
    out["bytes_per_image"] = {
        "vector_shards": round(vec / n),
        "score_matrix": round(_disk(lib.tagger.scores_dir) / n),
        "similar_index": round(_disk(lib.vectors_dir / "similar") / n),
        "text_patch_index": round(_disk(lib.vectors_dir / "text") / n),
        "sqlite": round(sum(_disk_file(p) for p in home.glob("piaa.sqlite3*")) / n)
        if db_file.exists()
        else None,
    }
    out["sparse_tags_rows"] = sum(lib.store.tag_counts().values())
    lib.close()
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out, indent=1))


def _disk_file(p: Path) -> int:
    return p.stat().st_size if p.is_file() else 0


def _recall(lib: Library, k: int, probes: int = 20) -> float:
    """Mean overlap of `similar` with the exact scan, over probe images spread across ids."""
    rows = lib.search("l000 OR NOT l000", limit=None, include_absent=True)
    paths = [r["path"] for r in rows]
    picks = [paths[i] for i in np.linspace(0, len(paths) - 1, probes).astype(int)]
    got = []
    for p in picks:
        a = {r["path"] for r in lib.similar(p, limit=k)}
        b = {r["path"] for r in scale.similar_exact(lib, p, limit=k)}
        got.append(len(a & b) / k)
    return round(float(np.mean(got)), 4)


def _text_search(lib: Library, labels: int, runs: int) -> dict[str, Any]:
    """Open-vocabulary search: the ANN path (patch index + [CLS] index, exact re-rank) against
    the exact scan of every vector, over phrases from frequent to rare labels."""
    from piaa_index.vectors import text_search

    phrases = [scale.label_names(labels)[i] for i in (0, 1, 5, 20, 40, labels - 1)]
    _, first = _once(lambda: lib.text_search(phrases[0]))
    out: dict[str, Any] = {"first_call_ms": first}  # the index was built by update_indexes
    out["warm"] = _timed(lambda: lib.text_search(phrases[2]), runs)
    saved = text_search.EXACT_BELOW
    text_search.EXACT_BELOW = 10**12
    try:
        exact, out["exact_scan_ms"] = _once(lambda: [lib.text_search(p) for p in phrases])
    finally:
        text_search.EXACT_BELOW = saved
    out["exact_scan_ms"] = round(out["exact_scan_ms"] / len(phrases), 3)
    recall = {}
    for p, want in zip(phrases, exact, strict=True):
        got = {r["path"] for r in lib.text_search(p)}
        recall[p] = len(got & {r["path"] for r in want}) / 20
    out["recall_at_20"] = recall
    out["recall_at_20_mean"] = round(float(np.mean(list(recall.values()))), 4)
    out["patch_index_bytes_per_image"] = round(
        _disk(lib.vectors_dir / "text") / max(1, len(lib.searcher._text_index.ids))
    )
    return out


def _ivf(lib: Library, probe: str, runs: int) -> dict[str, Any]:
    """The same collection with the IVF index forced, for its speed and recall."""
    from piaa_index.vectors import similar

    saved = similar.MAX_FLAT_CELLS
    similar.MAX_FLAT_CELLS = 0
    shutil.rmtree(lib.vectors_dir / "similar", ignore_errors=True)
    lib.searcher._similar = None
    try:
        _, build = _once(lib.update_indexes)
        out = {"build_ms": build, "warm": _timed(lambda: lib.similar(probe), runs)}
        out["recall_at_20"] = _recall(lib, 20)
    finally:
        similar.MAX_FLAT_CELLS = saved
        shutil.rmtree(lib.vectors_dir / "similar", ignore_errors=True)
        lib.searcher._similar = None
        lib.update_indexes()
        lib.searcher._similar = None
    return out


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
