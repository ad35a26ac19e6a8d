"""What a correction costs: a fit after one user label changed, which learns that label again
and re-scores it alone, against a full refit (what every change of the user's labels cost
before learning was incremental), on a synthetic library built through the index write path
(tools/scale.py). Prints one JSON object.

    python benchmarks/bench_relearn.py --images 20000 --home /tmp/relearn

Steps: a training-free fit; the true labels of --labelled of the images stored as the user's
(complete: every label of each); a fit, which learns every label; one label of one image
flipped; a fit (incremental: that label only); `fit --full` from the same labels. The
incremental fit's rows and tags are compared with the full fit's. Ratios are within one run.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

# tools/ (development only, not shipped) sits beside benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tools import scale  # noqa: E402


def _state(lib: Any) -> tuple[np.ndarray, Any]:
    fitted = lib.tagger.fitted_for(lib.store.latest_classifier())
    return fitted.classifier.W.copy(), lib.tag_matrix()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    scale.library_arguments(ap, images=20_000)
    ap.add_argument("--labelled", type=float, default=0.1, help="share of images labelled")
    args = ap.parse_args()

    home = Path(args.home)
    lib, world = scale.new_library(args)
    names = scale.label_names(args.labels)
    out: dict[str, Any] = {"images": args.images, "geometry": args.geometry, "labels": args.labels}
    truth, out["build_s"] = scale.timed(lambda: scale.add_images(lib, world, args.images))
    lib.set_vocabulary(names)
    _, out["training_free_fit_s"] = scale.timed(lib.fit)

    rng = np.random.default_rng(0)
    ids = np.array(sorted(lib.store.image_ids_by_path(
        [f"/synthetic/{i // 10_000:04d}/{i:08d}.jpg" for i in range(args.images)]
    ).values()))  # fmt: skip
    chosen = np.sort(rng.choice(args.images, int(args.labelled * args.images), replace=False))
    rows = [(int(ids[i]), names[c], bool(truth[i, c])) for i in chosen for c in range(len(names))]
    lib.set_user_labels(rows, "import")
    out["labelled_images"] = len(chosen)
    first, out["first_learning_fit_s"] = scale.timed(lib.fit)
    out["learnt_labels"] = len(first.learning["learnt"])

    image, c = int(ids[chosen[0]]), int(np.flatnonzero(truth[chosen[0]])[0])
    lib.set_user_labels([(image, names[c], False)], "gallery")  # one correction
    again, out["correction_fit_s"] = scale.timed(lib.fit)
    out["correction_relearnt"] = again.learning["relearnt"]
    W_inc, M_inc = _state(lib)

    full, out["full_fit_s"] = scale.timed(lambda: lib.fit(full=True))
    W_full, M_full = _state(lib)
    out["correction_vs_full"] = round(out["correction_fit_s"] / out["full_fit_s"], 3)
    out["max_row_difference"] = float(np.abs(W_inc - W_full).max())
    out["tags_differing"] = int((M_inc.present != M_full.present).sum())
    out["tags"] = int(M_full.present.sum())
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    lib.close()
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
