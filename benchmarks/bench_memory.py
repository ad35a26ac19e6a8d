"""Peak memory of the writers on a kept synthetic library (issue 23 item 4): a full fit, and an
index run's write path adding images (shards, SQL, the derived indexes' sync), each in a fresh
process. Prints JSON.

    python benchmarks/bench_scale.py --images 1000000 --home /work/lib1m --keep
    python benchmarks/bench_memory.py --home /work/lib1m --add 20000

Two peaks per step, sampled every 50 ms from /proc/self/status: VmHWM (the kernel's peak
resident set, which counts the pages of memory-mapped shard files the pass has touched: the
kernel drops those under pressure, they are not allocations) and the largest RssAnon seen
(memory the process allocated itself: what a memory limit kills for). The query commands'
peaks are `benchmarks/bench_cli_reads.py`'s rss_mb (ru_maxrss: VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

STEP = """
import json, sys, threading, time
from pathlib import Path
sys.path.insert(0, {root!r})
from tools import scale

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB -> MB
    return 0.0

peak = [0.0]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], status("RssAnon"))
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
world = scale.World.make({labels}, {geometry!r})
lib = scale.open_library(Path({home!r}), world)
n0 = lib.store.indexed_count()
t = time.perf_counter()
if {step!r} == "fit":
    lib.fit(full=True)
else:
    scale.add_images(lib, world, {add}, start=n0 + 10_000_000, group=1000, seed=7)
    lib.update_indexes()
wall = time.perf_counter() - t
done.set()
peak[0] = max(peak[0], status("RssAnon"))
print(json.dumps({{"images": n0, "wall_s": round(wall, 1), "peak_anon_mb": round(peak[0]),
                  "peak_rss_mb": round(status("VmHWM"))}}))
lib.close()
"""


def run_step(step: str, args: argparse.Namespace) -> dict[str, Any]:
    code = STEP.format(
        root=str(Path(__file__).resolve().parents[1]),
        labels=args.labels,
        geometry=args.geometry,
        home=str(args.home),
        step=step,
        add=args.add,
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{step} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--labels", type=int, default=80, help="as bench_scale.py made it")
    ap.add_argument("--geometry", default="shapesworld", help="as bench_scale.py made it")
    ap.add_argument("--add", type=int, default=20_000, help="images the index step adds")
    ap.add_argument("--steps", default="fit,index")
    args = ap.parse_args()
    report: dict[str, Any] = {"home": str(args.home)}
    for step in args.steps.split(","):
        report[step] = run_step(step, args)
        print(step, json.dumps(report[step]), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
