"""Indexing throughput on CPU: decode + preprocess + one-pass encode, in images per second.

    python benchmarks/bench_index_throughput.py            # tiny 64 px ViT and ViT-B-16
    python benchmarks/bench_index_throughput.py --models tiny --images 256

Weights are random (`pretrained none`): speed does not depend on them. Photos are generated
JPEGs with EXIF, written to a temporary folder. Each row stops after --budget seconds
and no row starts after --max-model-seconds per model (ViT-B-16: about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from piaa_index.model.encoder import Encoder, ModelSpec

# The two-pass reference is a development tool in tools/, beside this script, not shipped.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from piaa_index.ingest.images import load_image
from tools.reference_encoder import encode_two_pass  # noqa: E402

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


FRONT = ("clip", "sclip")
# (front-end, encode mode, JPEG draft decoding): what each row of the table measures.
PLAN = [
    ("clip", "one-pass", False),
    ("clip", "one-pass", True),
    ("sclip", "one-pass", True),
    ("sclip", "two-pass", True),
]


@dataclass
class Row:
    """One line of the result table."""

    model: str
    front_end: str
    mode: str
    images: int
    decode_s: float
    encode_s: float

    @property
    def per_second(self) -> float:
        return self.images / max(self.decode_s + self.encode_s, 1e-9)


def make_photos(folder: Path, n: int, width: int, height: int) -> list[Path]:
    """Write n photo-like JPEGs (smooth gradients plus noise, EXIF orientation 1)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(n):
        base = np.stack(
            [xx / width * 255, yy / height * 255, np.full_like(xx, (i * 37) % 255)], axis=-1
        )
        noisy = base + rng.normal(0, 12, base.shape)
        img = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
        exif = Image.Exif()
        exif[0x0112] = 1
        path = folder / f"photo_{i:04d}.jpg"
        img.save(path, quality=90, exif=exif.tobytes())
        paths.append(path)
    return paths


def run(
    enc: Encoder,
    paths: list[Path],
    batch_size: int,
    budget_s: float,
    encode: Callable[[torch.Tensor], object],
    draft: bool,
) -> tuple[int, float, float]:
    """Decode+preprocess and encode in batches; return (images, decode seconds, encode seconds)."""
    done, decode_s, encode_s = 0, 0.0, 0.0
    draft_size = min(enc.image_size) if draft else None
    for start in range(0, len(paths), batch_size):
        t0 = time.perf_counter()
        chunk = paths[start : start + batch_size]
        batch = torch.stack([enc.preprocess(load_image(p, draft_size=draft_size)) for p in chunk])
        t1 = time.perf_counter()
        encode(batch)
        t2 = time.perf_counter()
        done, decode_s, encode_s = done + len(chunk), decode_s + t1 - t0, encode_s + t2 - t1
        if decode_s + encode_s > budget_s:
            break
    return done, decode_s, encode_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["tiny", "ViT-B-16"])
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--photo-size", default="1600x1200", help="WIDTHxHEIGHT of generated JPEGs")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--budget", type=float, default=25.0, help="seconds per row (after 1 batch)")
    ap.add_argument("--max-model-seconds", type=float, default=90.0, help="start no row after")
    ap.add_argument("--json", action="store_true", help="print rows as JSON lines")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    width, height = (int(v) for v in args.photo_size.lower().split("x"))
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="piaa-bench-") as tmp:
        folder = Path(tmp)
        paths = make_photos(folder, args.images, width, height)
        (folder / "piaa-bench-tiny.json").write_text(json.dumps(TINY_CONFIG))
        for model in args.models:
            name = str(folder / "piaa-bench-tiny.json") if model == "tiny" else model
            label = "tiny-64px" if model == "tiny" else model
            encoders = {fe: Encoder(ModelSpec(name, "none", fe), device="cpu") for fe in FRONT}
            for enc in encoders.values():
                run(enc, paths[:2], 2, 1e9, enc.encode_images, False)  # warm-up
            started = time.perf_counter()
            for front_end, mode, draft in PLAN:
                if time.perf_counter() - started > args.max_model_seconds:
                    print(f"{label}: skipping {front_end} {mode}, over --max-model-seconds")
                    continue
                enc = encoders[front_end]
                fn = (
                    functools.partial(encode_two_pass, enc)
                    if mode == "two-pass"
                    else enc.encode_images
                )
                n, dec, encd = run(enc, paths, args.batch_size, args.budget, fn, draft)
                rows.append(Row(label, front_end, mode + ("+draft" if draft else ""), n, dec, encd))
                print_row(rows[-1], args.json, header=len(rows) == 1)
    return 0


def print_row(row: Row, as_json: bool, header: bool) -> None:
    """Print one result as soon as it is measured (the ViT-B-16 rows take a while)."""
    if as_json:
        print(json.dumps({**row.__dict__, "images_per_s": round(row.per_second, 2)}), flush=True)
        return
    if header:
        print(
            f"{'model':<12} {'front':<6} {'mode':<15} {'n':>4} {'decode ms/img':>14} "
            f"{'encode ms/img':>14} {'images/s':>9}"
        )
    print(
        f"{row.model:<12} {row.front_end:<6} {row.mode:<15} {row.images:>4} "
        f"{1000 * row.decode_s / row.images:>14.1f} {1000 * row.encode_s / row.images:>14.1f} "
        f"{row.per_second:>9.1f}",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
