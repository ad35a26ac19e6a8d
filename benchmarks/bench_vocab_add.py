"""What a vocabulary change costs: `vocab add` + the first query, `vocab remove` + the first
query, against a full refit, on a synthetic library built through the index write path
(tools/scale.py). Prints one JSON object.

    python benchmarks/bench_vocab_add.py --images 100000 --home /tmp/vocab-add

The first fit covers all labels but the last; then the last label is added (only it is fitted:
one pass for its bank, one to score it), then one label is removed (no patch is read), then
`fit --full` refits every label. Ratios against the full fit are within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import scale  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale.library_arguments(ap, images=20_000)
    args = ap.parse_args()

    home = Path(args.home)
    lib, world = scale.new_library(args)
    names = scale.label_names(args.labels)
    out: dict[str, Any] = {"images": args.images, "geometry": args.geometry, "labels": args.labels}
    _, out["build_s"] = scale.timed(lambda: scale.add_images(lib, world, args.images))

    lib.set_vocabulary(names[:-1])
    _, out["first_fit_s"] = scale.timed(lib.fit)
    query = f"{names[0]} AND {names[1]}"
    before = lib.search(query, limit=50)

    lib.set_vocabulary(names)  # `piaa vocab add`: the next query fits the new label alone
    _, out["add_one_label_then_query_s"] = scale.timed(lambda: lib.search(names[-1], limit=50))
    out["kept_label_results_unchanged"] = lib.search(query, limit=50) == before

    lib.set_vocabulary(names[1:])  # `piaa vocab remove`
    _, out["remove_one_label_then_query_s"] = scale.timed(lambda: lib.search(names[-1], limit=50))

    full, out["full_fit_s"] = scale.timed(lambda: lib.fit(full=True))
    out["full_fit_labels"] = len(full.fitted_labels)
    out["add_vs_full"] = round(out["add_one_label_then_query_s"] / out["full_fit_s"], 3)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    lib.close()
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
