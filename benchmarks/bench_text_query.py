"""Wall time and peak memory of `piaa search --text` from the CLI: the first query of a library
(no cached text tower: torch and the whole model load, the tower is written to the home) against
later ones (the numpy text tower from the cache, no torch), median of --runs fresh processes
each; `piaa --version` as the interpreter-start baseline. Prints JSON.

    python benchmarks/bench_text_query.py --images 20 --seed 3 --runs 5

Each call runs under a small wrapper process that times its one child and reads the child's
peak RSS from getrusage(RUSAGE_CHILDREN), so every number is one `piaa` process's own.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PIAA = [sys.executable, "-c", "import sys; from piaa_index.cli import main; sys.exit(main())"]
# Times and measures one child process: {"wall_s", "rss_mb", "rc"}.
WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mb": rss, "rc": rc}))
"""


def measure(args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, *PIAA, *args], capture_output=True, text=True, check=True
    )
    row = json.loads(out.stdout)
    if row["rc"] != 0:
        raise SystemExit(f"piaa {' '.join(args)} exited {row['rc']}")
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "wall_s_median": round(statistics.median(r["wall_s"] for r in rows), 3),
        "rss_mb_median": round(statistics.median(r["rss_mb"] for r in rows), 1),
        "wall_s": [round(r["wall_s"], 3) for r in rows],
        "rss_mb": [round(r["rss_mb"], 1) for r in rows],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--model", default="shapesworld")
    ap.add_argument("--text", default="a red car next to a house")
    ap.add_argument("--home", type=Path, help="an indexed library's home (default: make one)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="piaa-bench-text-"))
    try:
        home = args.home
        if home is None:
            home = tmp / "home"
            data = tmp / "data"
            gen = ["shapes", "generate", str(data), "--images", str(args.images)]
            subprocess.run([*PIAA, *gen, "--seed", str(args.seed)], check=True, capture_output=True)
            index = ["--home", str(home), "index", str(data / "images"), "--model", args.model]
            subprocess.run([*PIAA, *index, "-q"], check=True, capture_output=True)
        cache = home / "cache" / "text-tower"
        query = ["--home", str(home), "search", "--text", args.text, "--json"]
        version = [measure(["--version"]) for _ in range(args.runs)]
        first = []
        for _ in range(args.runs):
            shutil.rmtree(cache, ignore_errors=True)  # as a library's first text query
            first.append(measure(query))
        later = [measure(query) for _ in range(args.runs)]
        report = {
            "images": None if args.home else args.images,
            "model": args.model,
            "runs": args.runs,
            "piaa_version": summary(version),
            "first_query_torch": summary(first),
            "later_query_numpy": summary(later),
            "cache_mb": round(sum(f.stat().st_size for f in cache.glob("*")) / 2**20, 1),
        }
        print(json.dumps(report, indent=2))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
