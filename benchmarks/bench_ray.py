"""Local engine vs Ray engine on the same ShapesWorld images: counts, tags, wall times.

    python benchmarks/bench_ray.py                          # 2,000 images, a local Ray (2 CPUs)
    python benchmarks/bench_ray.py --images 500 --address auto

Both engines index the same folder into their own library (the shipped `shapesworld` model),
fit the same vocabulary (all 24 ShapesWorld classes; the Ray library's re-tag scoring runs as
Ray tasks) and must agree: the same counts, the same present tags per image, vectors within
fp16 tolerance. Ray's start-up is timed apart from the run; the overhead per image is
(Ray index time - local index time) / images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from piaa_index.library.core import Library
from piaa_index.shapes.dataset import generate_dataset
from piaa_index.shapes.world import CLASSES


def open_library(home: Path, model: str) -> Library:
    return Library.open(home=home, db=f"sqlite:///{home / 'piaa.sqlite3'}", model=model)


def max_vector_gap(a: Library, b: Library) -> float:
    """Largest |difference| between the two libraries' stored [CLS] and patch vectors."""

    def by_path(lib: Library) -> dict[str, np.ndarray]:
        locations = lib.store.live_locations()
        paths = lib.store.paths([loc[0] for loc in locations])
        out = {}
        for chunk in lib.vectors.iter_live(locations):
            for k, image_id in enumerate(chunk.image_ids):
                flat = np.concatenate([chunk.cls[k], chunk.patches[k].ravel()])
                out[paths[int(image_id)]] = flat
        return out

    va, vb = by_path(a), by_path(b)
    assert sorted(va) == sorted(vb), "different images indexed"
    return max(float(np.abs(va[p] - vb[p]).max()) for p in va)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=224, help="scene side in pixels")
    parser.add_argument("--model", default="shapesworld")
    parser.add_argument("--address", default=None, help="a running cluster (default: start one)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the Ray started here")
    parser.add_argument("--commit-every", type=int, default=256)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("PIAA_DEVICE", "cpu")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench-ray-"))
    data = generate_dataset(work / "shapes", args.images, seed=11, size=args.size, progress=False)
    images = data / "images"

    local = open_library(work / "local", args.model)
    t = time.perf_counter()
    rep_local = local.index([images])
    local_index_s = time.perf_counter() - t
    local.set_vocabulary(CLASSES)
    fit_local = local.fit()

    t = time.perf_counter()
    if args.address:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    else:
        ray.init(num_cpus=args.cpus, logging_level="WARNING", log_to_driver=False)
    ray_start_s = time.perf_counter() - t

    remote = open_library(work / "ray", args.model)
    t = time.perf_counter()
    rep_ray = remote.index([images], engine="ray", commit_every=args.commit_every)
    ray_index_s = time.perf_counter() - t
    remote.set_vocabulary(CLASSES)
    fit_ray = remote.fit(engine="ray")
    ray.shutdown()

    keys = ("indexed", "reused", "unchanged")
    counts_local = {k: rep_local.as_dict()[k] for k in keys} | {"failed": len(rep_local.failed)}
    counts_ray = {k: rep_ray.as_dict()[k] for k in keys} | {"failed": len(rep_ray.failed)}
    tags_local = {p: [t for t, _ in v] for p, v in local.present_tags().items()}
    tags_ray = {p: [t for t, _ in v] for p, v in remote.present_tags().items()}
    same_tags = tags_local == tags_ray
    n = max(1, rep_local.indexed)
    result = {
        "images": args.images,
        "cluster": args.address or f"local Ray, {args.cpus} CPUs",
        "counts_local": counts_local,
        "counts_ray": counts_ray,
        "identical_counts": counts_local == counts_ray,
        "identical_tags": same_tags,
        "tagged_images": sum(1 for v in tags_local.values() if v),
        "tags": sum(len(v) for v in tags_local.values()),
        "max_vector_gap": max_vector_gap(local, remote),
        "local_index_s": round(local_index_s, 2),
        "ray_start_s": round(ray_start_s, 2),
        "ray_index_s": round(ray_index_s, 2),
        "ray_overhead_ms_per_image": round(1000 * (ray_index_s - local_index_s) / n, 2),
        "local_retag_s": fit_local.tag_seconds,
        "ray_retag_s": fit_ray.tag_seconds,
        "local_fit_s": fit_local.fit_seconds,
        "ray_fit_s": fit_ray.fit_seconds,
    }
    local.close()
    remote.close()
    print(
        f"{args.images} ShapesWorld images, model {args.model}, {result['cluster']}\n"
        f"  counts  local {counts_local}\n"
        f"          ray   {counts_ray}   identical: {result['identical_counts']}\n"
        f"  tags    identical: {same_tags} ({result['tags']} present tags on "
        f"{result['tagged_images']} images); max vector gap {result['max_vector_gap']:.2e}\n"
        f"  index   local {local_index_s:.1f} s, ray {ray_index_s:.1f} s "
        f"(+ {ray_start_s:.1f} s to start Ray): overhead "
        f"{result['ray_overhead_ms_per_image']:.1f} ms/image\n"
        f"  re-tag  local {fit_local.tag_seconds:.2f} s, ray {fit_ray.tag_seconds:.2f} s "
        f"(fit pass, on the driver both: {fit_local.fit_seconds:.2f} / {fit_ray.fit_seconds:.2f} s)"
    )
    print(json.dumps(result), file=sys.stderr)
    if not (result["identical_counts"] and same_tags):
        sys.exit(1)


if __name__ == "__main__":
    main()
