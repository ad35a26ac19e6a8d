"""XMP sidecar throughput: export, re-export, vocabulary change, undo (ms per sidecar).

Makes N image files (empty: sidecars do not read pixels), half of them with a darktable-style
sidecar already there, and times each pass of `piaa_index.xmp.sidecars.Sidecars` over a SQLite store:

    python -m benchmarks.bench_xmp --images 2000   # from the repository root
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    args = parser.parse_args()

    from piaa_index.catalog.store import Store
    from piaa_index.xmp.sidecars import Sidecars
    from tests.xmp_files import DARKTABLE_SIDECAR

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images = []
        for i in range(args.images):
            image = root / f"d{i // 500:03d}" / f"IMG_{i:05d}.jpg"
            image.parent.mkdir(exist_ok=True)
            image.touch()
            if i % 2:
                Path(f"{image}.xmp").write_text(DARKTABLE_SIDECAR, encoding="utf-8")
            images.append(str(image))
        store = Store.open(f"sqlite:///{root / 'piaa.sqlite3'}")
        sidecars = Sidecars(store)
        first = {p: ["cat", "dog", "bicycle"] for p in images}
        changed = {p: ["cat", "tree"] for p in images}
        passes = [
            ("export", lambda: sidecars.export(first, images)),
            ("re-export, nothing changed", lambda: sidecars.export(first, images)),
            ("re-export, vocabulary changed", lambda: sidecars.export(changed, images)),
            ("undo", lambda: sidecars.undo(images)),
        ]
        print(f"{args.images} images, half with a darktable sidecar already there")
        for name, run in passes:
            started = time.perf_counter()
            report = run()
            seconds = time.perf_counter() - started
            counts = {k: v for k, v in report.as_dict().items() if isinstance(v, int) and v}
            per = 1000 * seconds / args.images
            print(f"{name:32s} {seconds:7.2f} s  {per:6.2f} ms/sidecar  {counts}")
        store.close()


if __name__ == "__main__":
    main()
