"""GPU indexing throughput: ViT-B/16 geometry end to end against the bare encoder (issue 23, item 5).

    python benchmarks/bench_gpu.py --device cuda --precision bf16 --json out.json
    python benchmarks/bench_gpu.py --images 32 --device cpu          # a CPU smoke run
    bash benchmarks/gpu_run.sh                                       # the GPU machine (offline)

Weights are random (`--pretrained none`, the spelling of bench_index_throughput.py): speed does
not depend on them, and nothing is downloaded. Photos are generated JPEGs (1024x768, EXIF), each
file's bytes distinct (a numbered EXIF ImageDescription), so the index run's content hash never
reuses vectors. They are in the page cache when read: disk speed is not measured.

Rows (images/s, and the ratio to the bare encoder):
  bare        `Encoder.encode_images` on preprocessed tensors already on the device (fp16/bf16,
              --batch per call, warm-up excluded, synchronised), [CLS] + patches back as numpy.
  pipelined   a bench-only reference, not the product: a torch DataLoader decodes and
              preprocesses in processes on every core while the device encodes; nothing is
              written. It shows what the machine allows when decode and encode overlap.
  e2e-cores   the product's index path (`piaa_index.engines.indexer.Indexer`, what `Library.index`
              runs) with decode threads on every core: hash, decode + preprocess, encode, SQ4
              patch shards, [CLS] shards and SQLite rows, in a fresh library.
  e2e-cli     `Library.index` exactly as `piaa index` calls it (4 decode threads), on
              --cli-images of the photos (half of them, at most 2048), in another library.
  similar     the product's [CLS] `similar` index (piaa_index/vectors/similar.py) built over the e2e
              library, and `Library.similar` per query (CPU FAISS: the product has no GPU path).
  faiss       exact [CLS] search, --faiss-vectors x d, --faiss-queries queries, k=20: FAISS on
              the CPU against FAISS on the GPU when this faiss build has GPUs
              (`index_cpu_to_gpu`), else the same exact search as torch matmul + top-k on the
              device, and the line says why FAISS did not run there.

The product's index path (`Indexer._index_files`) takes --batch files at a time. The main
thread hashes chunk n+1 (threads) and looks up what it can reuse, hands its files to a
background thread that decodes and preprocesses them (open_clip's transform, in the same decode
threads, right after each decode), then waits for chunk n's tensors, encodes them, and every
--commit group writes a shard and its SQL rows. So decoding overlaps encoding and writing;
hashing, encoding and writing do not overlap each other (all in the main thread).
The e2e rows time each stage by wrapping the indexer's stage functions (not changing them).
`decode+preprocess (background)` runs beside the main thread, so it is not part of the wall
time's sum: the main thread's share of it is `wait for decode`; the main-thread stages (hash+
reuse, wait, stack, encode, write, other) add up to the wall time. The pipelined row says what
full overlap without writes gives.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import multiprocessing
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from piaa_index.config import default_front_end
from piaa_index.ingest.images import load_image
from piaa_index.model.encoder import Encoder, ModelSpec, _pick_device, _pick_precision

TARGET_IMAGES_PER_S = 2000.0  # issue 23: end to end on an H100/H200
TARGET_RATIO = 0.9  # end to end / bare encoder
PLACEHOLDER = b"piaa-bench-00000000"  # EXIF ImageDescription, numbered per file (same length)
CLI_WORKERS = 4  # Indexer's default: Library.index (so `piaa index`) passes no workers


# -- photos ------------------------------------------------------------------------------------


def _base_photo(seed: int, width: int, height: int) -> bytes:
    """One photo-like JPEG (gradients, a few shapes, sensor-like noise) with EXIF."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi, 3)
    base = np.stack(
        [
            127
            + 100 * np.sin(xx / width * (2 + c) * np.pi + phase[c]) * np.cos(yy / height * np.pi)
            for c in range(3)
        ],
        axis=-1,
    )
    for _ in range(6):  # a few flat blocks: edges, like objects
        x0, y0 = int(rng.integers(0, width - 64)), int(rng.integers(0, height - 64))
        base[y0 : y0 + int(rng.integers(32, 256)), x0 : x0 + int(rng.integers(32, 256))] = (
            rng.uniform(0, 255, 3)
        )
    noisy = base + rng.normal(0, 6, base.shape).astype(np.float32)
    img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 1  # orientation
    exif[0x010E] = PLACEHOLDER.decode()  # ImageDescription: made unique per file
    exif[0x0110] = "piaa bench camera"  # Model
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    data = buf.getvalue()
    assert data.count(PLACEHOLDER) == 1
    return data


def make_photos(folder: Path, n: int, width: int, height: int, workers: int) -> list[Path]:
    """n JPEGs in `folder` (kept ones reused): 16 distinct pictures, every file's bytes unique."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"photo_{i:06d}.jpg" for i in range(n)]
    todo = [i for i, p in enumerate(paths) if not p.is_file()]
    if not todo:
        return paths
    kinds = min(16, n)
    with ProcessPoolExecutor(max_workers=max(1, min(workers, kinds))) as pool:
        bases = list(pool.map(_base_photo, range(kinds), [width] * kinds, [height] * kinds))

    def write(i: int) -> None:
        tag = f"piaa-bench-{i:08d}".encode()
        paths[i].write_bytes(bases[i % kinds].replace(PLACEHOLDER, tag))

    with ThreadPoolExecutor(max_workers=max(1, min(workers, 8))) as pool:
        list(pool.map(write, todo))
    return paths


# -- device ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU: {line.split(':', 1)[1].strip()}"
    return f"CPU: {platform.processor() or platform.machine()}"


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def faiss_info() -> dict[str, Any]:
    import faiss

    gpu_build = hasattr(faiss, "StandardGpuResources")
    gpus = int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    return {"version": faiss.__version__, "gpu_build": gpu_build, "gpus": gpus}


# -- rows --------------------------------------------------------------------------------------


def bare_encoder(
    enc: Encoder, paths: list[Path], batch: int, min_seconds: float, warm_up: int, min_batches: int
) -> dict[str, Any]:
    """`encode_images` on one preprocessed batch already on the device, called repeatedly."""
    draft = max(enc.image_size)
    chosen = [paths[i % len(paths)] for i in range(batch)]
    tensors = torch.stack([enc.preprocess(load_image(p, draft_size=draft)) for p in chosen])
    on_device = tensors.to(enc.device)
    for _ in range(warm_up):  # kernels, allocator, cuBLAS handles
        enc.encode_images(on_device)
    synchronize(enc.device)
    calls = 0
    started = time.perf_counter()
    while calls < min_batches or time.perf_counter() - started < min_seconds:
        enc.encode_images(on_device)  # returns numpy: waits for the device each call
        calls += 1
    synchronize(enc.device)
    seconds = time.perf_counter() - started
    images = calls * batch
    return {
        "row": "bare",
        "what": "Encoder.encode_images on preprocessed tensors on the device",
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
    }


class _Decoded(torch.utils.data.Dataset):
    """Decode + preprocess one file in a DataLoader worker (the bench's pipelined reference)."""

    def __init__(self, paths: list[Path], draft: int, preprocess: Callable[[Any], torch.Tensor]):
        self.paths, self.draft, self.preprocess = paths, draft, preprocess

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.preprocess(load_image(self.paths[i], draft_size=self.draft))


def pipelined(enc: Encoder, paths: list[Path], batch: int, workers: int) -> dict[str, Any]:
    """Decode and preprocess in processes on every core while the device encodes; no writes."""
    fork = "fork" in multiprocessing.get_all_start_methods()
    n_workers = workers if fork else 0  # the preprocess transform is not sent to spawned workers
    loader = torch.utils.data.DataLoader(
        _Decoded(paths, max(enc.image_size), enc.preprocess),
        batch_size=batch,
        num_workers=n_workers,
        pin_memory=enc.device.type == "cuda",
        prefetch_factor=4 if n_workers else None,
        multiprocessing_context="fork" if n_workers else None,
    )
    images = 0
    started = time.perf_counter()
    for tensors in loader:
        enc.encode_images(tensors)
        images += len(tensors)
    synchronize(enc.device)
    seconds = time.perf_counter() - started
    return {
        "row": "pipelined",
        "what": f"bench reference: DataLoader, {n_workers} decode processes, encode, no writes",
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 1),
        "workers": n_workers,
    }


@contextlib.contextmanager
def stage_times(enc: Encoder) -> Iterator[collections.Counter[str]]:
    """Seconds spent in each stage of the product's index path, by wrapping (not changing) the
    indexer's stage functions and the encoder's encode call for the duration. `decode` runs in
    the indexer's background thread, beside the others (its wrapper times it there)."""
    import piaa_index.engines.indexer as ix

    times: collections.Counter[str] = collections.Counter()

    def timed(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                times[label] += time.perf_counter() - t0

        return wrapper

    functions = {"decode_files": "decode", "encode_decoded": "stack+encode"}
    methods = {"_plan_chunk": "hash+reuse", "_decoded": "wait", "_commit": "write shards+SQL"}
    saved = {name: getattr(ix, name) for name in functions}
    saved_methods = {name: getattr(ix.Indexer, name) for name in methods}
    for name, label in functions.items():
        setattr(ix, name, timed(label, saved[name]))
    for name, label in methods.items():
        setattr(ix.Indexer, name, timed(label, saved_methods[name]))
    enc.encode_images = timed("encode", enc.encode_images)  # type: ignore[method-assign]
    try:
        yield times
    finally:
        for name, fn in saved.items():
            setattr(ix, name, fn)
        for name, fn in saved_methods.items():
            setattr(ix.Indexer, name, fn)
        del enc.encode_images  # the class's method again


BACKGROUND = "decode+preprocess (background)"


def _stages(times: collections.Counter[str], total: float, images: int) -> dict[str, float]:
    """ms per image of each stage. The main thread's (hash+reuse, its wait for the background
    decode, stack = stack+encode - encode, encode, write) and the rest (scan, plan, the
    library's opening of its stores, the progress loop) add up to the wall time; the background
    decode+preprocess overlaps them and is left out of that sum."""
    main = {
        "hash+reuse": times["hash+reuse"],
        "wait for decode": times["wait"],
        "stack": times["stack+encode"] - times["encode"],
        "encode": times["encode"],
        "write shards+SQL": times["write shards+SQL"],
    }
    main["scan, plan, other"] = total - sum(main.values())
    out = {BACKGROUND: times["decode"], **main}
    return {k: round(1000 * v / max(images, 1), 3) for k, v in out.items()}


def end_to_end(
    enc: Encoder,
    home: Path,
    targets: list[str],
    batch: int,
    workers: int | None,
    model: str,
    front_end: str,
) -> dict[str, Any]:
    """Index `targets` into a fresh library at `home` through the product's code: Indexer with
    `workers` decode threads, or (workers None) Library.index exactly as `piaa index` calls it."""
    from piaa_index.engines.indexer import Indexer
    from piaa_index.library.core import Library

    lib = Library.open(
        home=home,
        model=model,
        pretrained="none",
        front_end=front_end,
        device=str(enc.device),
        encoder_factory=lambda spec: enc,  # the warmed-up encoder, at the asked precision
    )
    try:
        _ = lib.vectors  # opens the vector store and records the model, as the first run does
        with stage_times(enc) as times:
            started = time.perf_counter()
            if workers is None:
                report = lib.index(targets, batch_size=batch)
                label, what = "e2e-cli", f"Library.index as `piaa index` ({CLI_WORKERS} threads)"
            else:
                indexer = Indexer(
                    lib.store, lib.vectors, lambda: lib.encoder, batch_size=batch, workers=workers
                )
                report = indexer.run(targets, progress=False)
                label, what = "e2e-cores", f"Indexer, {workers} decode threads (every core)"
            seconds = time.perf_counter() - started
        if report.failed:
            raise RuntimeError(f"{len(report.failed)} files failed: {report.failed[:3]}")
        return {
            "row": label,
            "what": what,
            "images": report.indexed,
            "seconds": round(seconds, 3),
            "images_per_s": round(report.indexed / seconds, 1),
            "ms_per_image": _stages(times, seconds, report.indexed),
            "vector_bytes": lib.vectors.disk_bytes(),
        }
    finally:
        lib.close()


def similar_product(home: Path, enc: Encoder, model: str, front_end: str, queries: int) -> dict:
    """The product's [CLS] `similar` index over an indexed library: build, then query it."""
    from piaa_index.library.core import Library

    lib = Library.open(
        home=home,
        model=model,
        pretrained="none",
        front_end=front_end,
        encoder_factory=lambda s: enc,
    )
    try:
        ids = [image_id for image_id, _, _ in lib.store.live_locations()[: max(queries, 1)]]
        paths = sorted(lib.store.paths(ids).values())
        started = time.perf_counter()
        index = lib.searcher._similar_index()  # built from the shards, saved beside them
        build = time.perf_counter() - started
        picked = [paths[i % len(paths)] for i in range(queries)]
        started = time.perf_counter()
        for path in picked:
            lib.similar(path, limit=20)
        per_query = (time.perf_counter() - started) / max(len(picked), 1)
        return {
            "row": "similar",
            "what": f"product [CLS] index ({index.kind}, CPU FAISS) + Library.similar",
            "vectors": len(index.ids),
            "build_s": round(build, 3),
            "query_ms": round(1000 * per_query, 3),
            "queries": len(picked),
        }
    finally:
        lib.close()


def torch_search(base: torch.Tensor, queries: np.ndarray, k: int) -> np.ndarray:
    """Exact inner-product top-k of `queries` in `base` (on its device): ids [q, k]."""
    q = torch.from_numpy(queries).to(base.device)
    ids = [torch.topk(q[s : s + 256] @ base.T, k, dim=1).indices for s in range(0, len(q), 256)]
    return torch.cat(ids).cpu().numpy()


def faiss_search(dim: int, n: int, n_queries: int, device: torch.device, k: int = 20) -> dict:
    """Exact [CLS] search: FAISS flat on the CPU against the same search on the device."""
    import faiss

    rng = np.random.default_rng(1)
    base = rng.standard_normal((n, dim), dtype=np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    queries = base[rng.choice(n, size=n_queries, replace=n_queries > n)]
    queries = queries + 0.05 * rng.standard_normal(queries.shape, dtype=np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    out: dict[str, Any] = {"row": "faiss", "vectors": n, "dim": dim, "queries": n_queries, "k": k}

    started = time.perf_counter()
    cpu_index = faiss.IndexFlatIP(dim)
    cpu_index.add(base)
    out["cpu_build_s"] = round(time.perf_counter() - started, 3)
    started = time.perf_counter()
    _, cpu_ids = cpu_index.search(queries, k)
    out["cpu_search_s"] = round(time.perf_counter() - started, 3)
    out["cpu_threads"] = faiss.omp_get_max_threads()

    info = faiss_info()
    if device.type == "cuda" and info["gpus"] > 0:
        res = faiss.StandardGpuResources()
        started = time.perf_counter()
        gpu_index = faiss.index_cpu_to_gpu(res, device.index or 0, cpu_index)
        out["gpu_build_s"] = round(time.perf_counter() - started, 3)
        gpu_index.search(queries[:8], k)  # warm-up
        started = time.perf_counter()
        _, gpu_ids = gpu_index.search(queries, k)
        out["gpu_search_s"] = round(time.perf_counter() - started, 3)
        out["gpu_backend"] = "faiss-gpu (index_cpu_to_gpu of IndexFlatIP)"
    elif device.type in ("cuda", "mps"):
        why = (
            "this faiss build has no GPU support"
            if not info["gpu_build"]
            else "faiss sees no GPU (get_num_gpus() == 0)"
        )
        out["gpu_backend"] = f"torch fp32 matmul + topk on {device.type} (FAISS not on GPU: {why})"
        started = time.perf_counter()
        on_device = torch.from_numpy(base).to(device)
        synchronize(device)
        out["gpu_build_s"] = round(time.perf_counter() - started, 3)

        torch_search(on_device, queries[:8], k)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        gpu_ids = torch_search(on_device, queries, k)
        out["gpu_search_s"] = round(time.perf_counter() - started, 3)
    else:
        out["gpu_backend"] = "none (no GPU device)"
        return out
    # Same neighbours? (ties aside, both are exact)
    out["top1_agree"] = round(float(np.mean(cpu_ids[:, 0] == gpu_ids[:, 0])), 4)
    hits = [len(set(a) & set(b)) for a, b in zip(cpu_ids.tolist(), gpu_ids.tolist(), strict=True)]
    out["recall_at_k"] = round(float(np.mean(hits)) / k, 4)
    out["speedup"] = round(out["cpu_search_s"] / max(out["gpu_search_s"], 1e-9), 1)
    return out


# -- report ------------------------------------------------------------------------------------


def print_table(result: dict[str, Any]) -> None:
    env = result["environment"]
    print()
    print(f"device     {env['device']} ({env['device_name']})")
    print(
        f"torch      {env['torch']}  cuda {env['cuda']}  open_clip {env['open_clip']}  "
        f"faiss {env['faiss']['version']} (gpu build: {env['faiss']['gpu_build']}, "
        f"gpus: {env['faiss']['gpus']})"
    )
    print(
        f"model      {env['model']} ({env['front_end']}, random weights), precision "
        f"{env['precision']}, batch {env['batch']}, workers {env['workers']} of {env['cores']} "
        f"cores, {env['images']} photos {env['photo_size']}"
    )
    print()
    bare = next((r for r in result["rows"] if r["row"] == "bare"), None)
    print(f"{'row':<11} {'images':>7} {'seconds':>8} {'images/s':>9} {'x bare':>7}  what")
    for r in result["rows"]:
        if "images_per_s" not in r:
            continue
        ratio = r["images_per_s"] / bare["images_per_s"] if bare else float("nan")
        print(
            f"{r['row']:<11} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} "
            f"{ratio:>7.2f}  {r['what']}"
        )
    staged = [r for r in result["rows"] if "ms_per_image" in r]
    for r in staged:
        ms = dict(r["ms_per_image"])
        background = ms.pop(BACKGROUND, None)
        parts = ", ".join(f"{k} {v:.2f}" for k, v in ms.items())
        print(f"  {r['row']} ms/image, main thread: {parts}")
        if background is not None:
            print(f"  {r['row']} ms/image, {BACKGROUND}: {background:.2f}")
    if staged:
        print(
            "  (the background decode+preprocess overlaps the main thread's stages, which add "
            "up to the wall time; 'wait for decode' is the main thread's share of it)"
        )
    for r in result["rows"]:
        if r["row"] == "similar":
            print(
                f"similar    {r['vectors']} vectors: build {r['build_s']:.3f} s, "
                f"{r['query_ms']:.2f} ms per Library.similar ({r['what']})"
            )
        if r["row"] == "faiss":
            line = (
                f"faiss      exact search of {r['queries']} queries in {r['vectors']} x {r['dim']}, "
                f"k={r['k']}: CPU {r['cpu_search_s']:.3f} s ({r['cpu_threads']} threads, add "
                f"{r['cpu_build_s']:.3f} s)"
            )
            if "gpu_search_s" in r:
                line += (
                    f"; GPU {r['gpu_search_s']:.4f} s (to device {r['gpu_build_s']:.3f} s), "
                    f"x{r['speedup']}, recall@k {r['recall_at_k']}"
                )
            print(line)
            print(f"           GPU side: {r['gpu_backend']}")
    for line in result["verdict"]:
        print(line)


def verdict(rows: list[dict[str, Any]], device: torch.device) -> list[str]:
    by = {r["row"]: r for r in rows}
    if "bare" not in by or "e2e-cores" not in by:
        return []
    e2e, bare = by["e2e-cores"]["images_per_s"], by["bare"]["images_per_s"]
    lines = [f"end to end {e2e:.0f} images/s = {e2e / bare:.2f} x bare encoder ({bare:.0f}/s)"]
    if device.type == "cuda":
        ok = e2e >= TARGET_IMAGES_PER_S and e2e / bare >= TARGET_RATIO
        lines.append(
            f"target (>= {TARGET_IMAGES_PER_S:.0f}/s and >= {TARGET_RATIO} x bare on an "
            f"H100/H200): {'met' if ok else 'NOT met'}"
        )
    else:
        lines.append(f"ran on {device.type}: the GPU targets do not apply to this run")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda, else mps, else cpu), cuda[:N]")
    ap.add_argument("--precision", default="auto", help="auto (fp16 on cuda), fp16, bf16, fp32")
    ap.add_argument("--model", default="ViT-B-16", help="open_clip name (random weights)")
    ap.add_argument("--images", type=int, help="photos (default 8192 on a GPU, 64 on cpu)")
    ap.add_argument("--batch", type=int, help="images per forward pass (256 on a GPU, 16 cpu)")
    ap.add_argument("--workers", type=int, default=cores(), help="decode workers (every core)")
    ap.add_argument("--photo-size", default="1024x768", help="WIDTHxHEIGHT of generated JPEGs")
    ap.add_argument("--photos", type=Path, help="keep the photos here and reuse them next run")
    ap.add_argument("--bare-seconds", type=float, default=5.0, help="time the bare encoder for")
    ap.add_argument("--cli-images", type=int, help="photos for e2e-cli (half, at most 2048)")
    ap.add_argument("--no-cli-row", action="store_true", help="skip the e2e-cli row")
    ap.add_argument("--no-pipelined", action="store_true", help="skip the pipelined row")
    ap.add_argument("--faiss-vectors", type=int, help="[CLS] vectors (1M on a GPU, 20k cpu)")
    ap.add_argument("--faiss-queries", type=int, default=1000)
    ap.add_argument("--similar-queries", type=int, default=100, help="Library.similar calls")
    ap.add_argument("--json", dest="json_path", help="write the results as JSON here (- stdout)")
    args = ap.parse_args(argv)

    device = _pick_device(args.device)
    precision = _pick_precision(args.precision, device)
    on_gpu = device.type != "cpu"
    n_images = args.images or (8192 if on_gpu else 64)
    batch = args.batch or (256 if on_gpu else 16)
    faiss_vectors = args.faiss_vectors or (1_000_000 if on_gpu else 20_000)
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    front_end = default_front_end(args.model)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="piaa-bench-gpu-") as tmp:
        work = Path(tmp)
        folder = args.photos or work / "photos"
        t0 = time.perf_counter()
        paths = make_photos(folder, n_images, width, height, args.workers)
        photo_s = time.perf_counter() - t0
        photo_mb = sum(p.stat().st_size for p in paths) / 2**20
        print(
            f"photos: {len(paths)} in {folder} ({photo_mb:.0f} MiB, {photo_s:.1f} s to make)",
            flush=True,
        )

        t0 = time.perf_counter()
        enc = Encoder(ModelSpec(args.model, "none", front_end), str(device), precision)
        print(
            f"encoder: {args.model} on {enc.device}, {enc.precision}, "
            f"{time.perf_counter() - t0:.1f} s to build",
            flush=True,
        )
        import faiss  # noqa: F401 - fail here, before the long rows, when it is missing
        import open_clip

        env = {
            "device": str(enc.device),
            "device_name": device_name(enc.device),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "open_clip": open_clip.__version__,
            "faiss": faiss_info(),
            "python": platform.python_version(),
            "precision": enc.precision,
            "model": args.model,
            "front_end": front_end,
            "batch": batch,
            "workers": args.workers,
            "cores": cores(),
            "images": len(paths),
            "photo_size": args.photo_size,
            "photo_mib": round(photo_mb, 1),
        }
        rows: list[dict[str, Any]] = []

        def step(row: dict[str, Any]) -> None:
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json_path and args.json_path != "-":  # what is done survives a timeout
                partial = {"environment": env, "rows": rows, "complete": False}
                Path(args.json_path).write_text(json.dumps(partial, indent=1) + "\n")

        warm_up, min_batches = (2, 3) if on_gpu else (1, 1)
        step(bare_encoder(enc, paths, batch, args.bare_seconds, warm_up, min_batches))
        if not args.no_pipelined:
            step(pipelined(enc, paths, batch, args.workers))
        step(
            end_to_end(
                enc, work / "lib-cores", [str(folder)], batch, args.workers, args.model, front_end
            )
        )
        if not args.no_cli_row:
            cli_images = args.cli_images or min(2048, max(1, n_images // 2))
            subset = [str(p) for p in paths[:cli_images]]
            step(end_to_end(enc, work / "lib-cli", subset, batch, None, args.model, front_end))
        step(similar_product(work / "lib-cores", enc, args.model, front_end, args.similar_queries))
        step(faiss_search(enc.dim, faiss_vectors, args.faiss_queries, enc.device))

        result = {
            "environment": env,
            "rows": rows,
            "verdict": verdict(rows, enc.device),
            "seconds": round(time.perf_counter() - started, 1),
            "complete": True,
        }
        print_table(result)
        print(f"total {result['seconds']:.0f} s", flush=True)
        if args.json_path == "-":
            print(json.dumps(result, indent=1))
        elif args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=1) + "\n")
        if args.photos is None:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
