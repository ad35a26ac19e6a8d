"""Text search alone, against a library kept by bench_scale.py (no rebuild). Prints JSON.

    python benchmarks/bench_scale.py --images 20000 --geometry vit-b-16 --home /tmp/l20k --keep
    python benchmarks/bench_text_scale.py --home /tmp/l20k --geometry vit-b-16

The patch index under `<vectors>/text/` is deleted first and built again as `index` builds it
(timed), then the first call is timed
unless --reuse-index. The exact scan's top 20 per phrase, the reference for recall@20, is
cached in `<home>/text-exact.json` for the library's data version (it reads every vector).
Warm timings cycle over all the phrases, frequent to rare labels.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from piaa_index.library.core import Library
from piaa_index.vectors import text_search

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import scale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True)
    ap.add_argument("--geometry", choices=sorted(scale.GEOMETRIES), default="vit-b-16")
    ap.add_argument("--labels", type=int, default=80)
    ap.add_argument("--db", default=None)
    ap.add_argument("--runs", type=int, default=5, help="warm runs per phrase")
    ap.add_argument("--reuse-index", action="store_true", help="keep the patch index on disk")
    args = ap.parse_args()

    home = Path(args.home)
    world = scale.World.make(args.labels, args.geometry)
    lib = Library.open(
        home=home,
        db=args.db or f"sqlite:///{home / 'piaa.sqlite3'}",
        encoder_factory=scale.encoder_factory(world),
    )
    phrases = [scale.label_names(args.labels)[i] for i in (0, 1, 5, 20, 40, args.labels - 1)]
    out: dict[str, Any] = {"images": lib.store.indexed_count()}
    if not args.reuse_index:
        shutil.rmtree(lib.vectors_dir / "text", ignore_errors=True)
    # `index` builds it at its end (no query does).
    t = time.perf_counter()
    lib.update_indexes()
    out["index_build_ms"] = round(1000 * (time.perf_counter() - t), 1)
    t = time.perf_counter()
    lib.text_search(phrases[0])
    out["first_call_ms"] = round(1000 * (time.perf_counter() - t), 1)

    times = []
    for _ in range(args.runs):
        for p in phrases:
            t = time.perf_counter()
            lib.text_search(p)
            times.append(time.perf_counter() - t)
    times.sort()
    out["warm_ms"] = {
        "p50": round(1000 * statistics.median(times), 1),
        "p95": round(1000 * times[min(len(times) - 1, int(0.95 * len(times)))], 1),
        "max": round(1000 * times[-1], 1),
        "runs": len(times),
    }

    exact = _exact(lib, home, phrases, out)
    recall = {}
    for p in phrases:
        got = {r["path"] for r in lib.text_search(p)}
        recall[p] = len(got & set(exact[p])) / 20
    out["recall_at_20"] = recall
    out["recall_at_20_min"] = min(recall.values())
    n = max(1, len(lib.searcher._text_index.ids))
    out["patch_index_bytes_per_image"] = round(
        sum(f.stat().st_size for f in (lib.vectors_dir / "text").rglob("*") if f.is_file()) / n
    )
    lib.close()
    print(json.dumps(out, indent=1))


def _exact(lib: Library, home: Path, phrases: list[str], out: dict) -> dict[str, list[str]]:
    cache = home / "text-exact.json"
    version = lib.store.data_version()
    try:
        saved = json.loads(cache.read_text())
        if saved["version"] == version and set(phrases) <= set(saved["top"]):
            return dict(saved["top"])
    except (OSError, ValueError, KeyError):
        pass
    saved_below = text_search.EXACT_BELOW
    text_search.EXACT_BELOW = 10**12
    try:
        t = time.perf_counter()
        top = {p: [r["path"] for r in lib.text_search(p)] for p in phrases}
        out["exact_scan_ms"] = round(1000 * (time.perf_counter() - t) / len(phrases), 1)
    finally:
        text_search.EXACT_BELOW = saved_below
    cache.write_text(json.dumps({"version": version, "top": top}))
    return top


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    np.seterr(all="ignore")
    main()
