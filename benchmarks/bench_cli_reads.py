"""Wall time and peak RSS of the read commands a user types, each a fresh `piaa` process, on a
kept library (issue 23 item 1 and 2): the read-only path (catalog/readonly.py and
readonly_vectors.py: sqlite3, the saved indexes, the cached numpy text tower) against the
Library path (SQLAlchemy; forced by turning the read-only answers off in that process), median
of --runs each, `piaa --version` as the interpreter-start baseline. Prints JSON.

    python benchmarks/bench_scale.py --images 20000 --home /tmp/l20k --keep
    python benchmarks/bench_cli_reads.py --home /tmp/l20k --runs 5

A synthetic library (tools/scale.py) has no text tower of its own: the shipped shapesworld
model's (the same 128 dimensions; at ViT-B/16 geometry, ViT-B-16's with random weights) is
cached under its key first, so text search times the real numpy forward and the real index; its
rankings mean nothing, its times do.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

QUICK = "import sys; from piaa_index.cli import main; sys.exit(main())"
FULL = (
    "import sys\n"
    "from piaa_index.catalog import readonly as r, readonly_vectors as v\n"
    "none = lambda *a, **k: None\n"
    "r.search = r.tags = r.status = r.vocabulary_listing = v.similar = v.text_search = none\n"
    "from piaa_index.cli import main\n"
    "sys.exit(main())\n"
)
# Times and measures one child process: {"wall_s", "rss_mb", "rc"}.
WRAPPER = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
wall = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
print(json.dumps({"wall_s": wall, "rss_mb": rss, "rc": rc}))
"""


def measure(code: str, args: list[str]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", WRAPPER, sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    row = json.loads(out.stdout)
    if row["rc"] != 0:
        raise SystemExit(f"piaa {' '.join(args)} exited {row['rc']}")
    return row


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "wall_s": round(statistics.median(r["wall_s"] for r in rows), 3),
        "rss_mb": round(statistics.median(r["rss_mb"] for r in rows), 1),
        "all_wall_s": [round(r["wall_s"], 3) for r in rows],
    }


def cache_shipped_tower(home: Path) -> None:
    """For a synthetic library: the shapesworld text tower under the library's model key."""
    from piaa_index.config import ModelSpec
    from piaa_index.library.core import Library
    from piaa_index.model import text_tower
    from piaa_index.model.encoder import Encoder

    with Library.open(home=home) as lib:
        record = lib.store.get_setting("model") or {}
    spec = ModelSpec(record["model"], record["pretrained"], record["front_end"])
    path = text_tower.cache_path(home, spec, record)
    if path is None or text_tower.load_text_tower(path) is not None:
        return
    # The tower of the library's width: the shipped model's (128) or ViT-B/16's (512, random
    # weights: the same forward, 12 layers of width 512, whatever the weights)
    tower = ModelSpec("shapesworld", "default", "clip")
    lib_dim = int((record.get("identity") or {}).get("dim") or 128)
    if lib_dim == 512:
        tower = ModelSpec("ViT-B-16", "none", "clip")
    encoder = Encoder(tower, device="cpu")
    if encoder.dim != lib_dim:
        raise SystemExit(f"no text tower of width {lib_dim} to cache")
    if text_tower.save_text_tower(encoder, path) is None:
        raise SystemExit(f"the {tower.model} text tower could not be cached")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a kept library's home")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--text", default="a red car next to a house")
    ap.add_argument("--no-full", action="store_true", help="time the read-only path only")
    ap.add_argument("--only", help="comma-separated command names (default: all)")
    args = ap.parse_args()

    home = args.home
    cache_shipped_tower(home)
    from piaa_index.library.core import Library

    with Library.open(home=home) as lib:
        image = lib.store.indexed_paths()[0]
        labels = lib.vocab.require_vocabulary().names
    base = ["--home", str(home)]
    commands = {
        "search A AND B": ["search", f"{labels[0]} AND {labels[1]}", "--json"],
        "tags IMG": ["tags", image, "--json"],
        "status": ["status", "--json"],
        "similar IMG": ["similar", image, "--json"],
        "vocab list": ["vocab", "list", "--json"],
        "search --text": ["search", "--text", args.text, "--json"],
    }
    report: dict[str, Any] = {"home": str(home), "runs": args.runs}
    report["piaa --version"] = summary([measure(QUICK, ["--version"]) for _ in range(args.runs)])
    for name, argv in commands.items():
        if args.only and name not in args.only.split(","):
            continue
        row = {"read_only": summary([measure(QUICK, base + argv) for _ in range(args.runs)])}
        if not args.no_full:
            row["library"] = summary([measure(FULL, base + argv) for _ in range(args.runs)])
        report[name] = row
        print(name, json.dumps(row), file=sys.stderr, flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
