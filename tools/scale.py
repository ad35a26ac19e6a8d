"""Synthetic libraries at scale, for the query-engine benchmark and tests (no encoding).

Images are written through the same path as an index run: placeholder rows in SQL, a durable
vector shard (`VectorStore.write_shard`), then the rows marked indexed in one statement. The
vectors are drawn around label clusters (labels come in pairs that often co-occur) plus a few
background clusters; `SyntheticEncoder` stands in for the model where a fit needs text
prototypes, returning prototypes that sit near the clusters (with a small modality gap).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.config import ModelSpec

if TYPE_CHECKING:
    from piaa_index.library.core import Library

GEOMETRIES = {"shapesworld": (8, 128), "vit-b-16": (14, 512)}  # grid side, dim
MODEL = "synthetic"
PRETRAINED = "synthetic"


def label_names(n: int) -> list[str]:
    return [f"l{c:03d}" for c in range(n)]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


@dataclass
class World:
    means: np.ndarray  # [C, d] label clusters
    text: np.ndarray  # [C, d] text prototypes
    bg: np.ndarray  # [B, d] background clusters
    grid: int

    @classmethod
    def make(cls, n_labels: int, geometry: str = "shapesworld", seed: int = 0) -> World:
        side, d = GEOMETRIES[geometry]
        rng = np.random.default_rng(seed)
        means = _unit(rng.normal(size=(n_labels, d)))
        gap = _unit(rng.normal(size=d))
        text = _unit(means + 0.3 * gap + 0.2 * _unit(rng.normal(size=(n_labels, d))))
        bg = _unit(rng.normal(size=(6, d)))
        return cls(means, text.astype(np.float32), bg, side)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    def images(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """[CLS] [n, d], patches [n, M, d] (float32, unit rows) and labels [n, C] bool."""
        C, d, M = self.means.shape[0], self.dim, self.grid * self.grid
        # 1-3 labels by Zipf-like frequency; a label's pair partner joins 60% of the time.
        freq = 1.0 / np.arange(1, C + 1)
        freq /= freq.sum()
        Y = np.zeros((n, C), bool)
        k = np.minimum(1 + rng.poisson(0.7, n), 3)
        for j in range(3):
            picks = rng.choice(C, size=n, p=freq)
            Y[np.arange(n)[k > j], picks[k > j]] = True
        partner = np.arange(C) ^ 1
        partner[partner >= C] = C - 1
        joins = Y & (rng.random((n, C)) < 0.6)
        Y[np.nonzero(joins)[0], partner[np.nonzero(joins)[1]]] = True
        count = Y.sum(axis=1)
        ranked = np.argsort(~Y, axis=1, kind="stable")  # present labels first
        slot = (rng.random((n, M)) * (count[:, None] + 2)).astype(np.int64)
        is_obj = slot < count[:, None]
        lab = np.take_along_axis(ranked, np.minimum(slot, C - 1), axis=1)
        bg = self.bg[rng.integers(len(self.bg), size=n)]
        centres = np.where(is_obj[..., None], self.means[lab], bg[:, None, :])
        noise = rng.standard_normal((n, M, d), dtype=np.float32) * np.float32(0.9 / np.sqrt(d))
        patches = _unit((centres + noise).astype(np.float32))
        glob = (Y @ self.means) / np.maximum(count, 1)[:, None] + 0.3 * bg
        cls = _unit(glob + 0.3 * rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
        return cls, patches, Y


class SyntheticEncoder:
    """The model stand-in: the world's geometry and text prototypes; it cannot see images."""

    def __init__(self, spec: ModelSpec, world: World):
        self.spec = spec
        self.world = world
        self.dim = world.dim
        self.grid = (world.grid, world.grid)
        self.n_patches = world.grid * world.grid

    def identity(self) -> dict[str, Any]:
        return {
            "model": MODEL,
            "pretrained": PRETRAINED,
            "front_end": self.spec.front_end,
            "dim": self.dim,
            "grid": list(self.grid),
        }

    def text_prototypes(self, names: Sequence[str], templates: Sequence[str]) -> np.ndarray:
        index = {name: c for c, name in enumerate(label_names(len(self.world.text)))}
        return self.world.text[[index[n] for n in names]]

    def encode_images(self, batch: Any) -> Any:
        raise NotImplementedError("the synthetic encoder has no images to encode")


def encoder_factory(world: World) -> Callable[[ModelSpec], Any]:
    return lambda spec: SyntheticEncoder(spec, world)


def open_library(home: Path, world: World, db: str | None = None) -> Library:
    """A library of this world's synthetic images in `home` (SQLite there unless `db`)."""
    from piaa_index.library.core import Library

    return Library.open(
        home=home,
        db=db or f"sqlite:///{Path(home) / 'piaa.sqlite3'}",
        model=MODEL,
        pretrained=PRETRAINED,
        front_end="clip",
        encoder_factory=encoder_factory(world),
    )


def library_arguments(ap: argparse.ArgumentParser, images: int) -> None:
    """The arguments of a benchmark that builds a synthetic library of its own (`new_library`)."""
    ap.add_argument("--images", type=int, default=images)
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="shapesworld")
    ap.add_argument("--labels", type=int, default=80)
    ap.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in --home)")
    ap.add_argument("--home", required=True)
    ap.add_argument("--keep", action="store_true", help="leave the library in --home")


def new_library(args: argparse.Namespace) -> tuple[Library, World]:
    """An empty library of `library_arguments`' world in --home; exits when --home holds
    anything (a benchmark never writes into a library it did not make)."""
    home = Path(args.home)
    if home.exists() and any(home.iterdir()):
        sys.exit(f"{home} is not empty")
    world = World.make(args.labels, args.geometry)
    return open_library(home, world, args.db), world


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(fn(), its wall seconds to the millisecond)."""
    t = time.perf_counter()
    out = fn()
    return out, round(time.perf_counter() - t, 3)


def add_images(
    library: Any,
    world: World,
    n: int,
    start: int = 0,
    group: int = 1000,
    seed: int = 0,
    prefix: str = "/synthetic",
) -> np.ndarray:
    """Index `n` synthetic images as an index run would (shard first, SQL second), in commit
    groups of `group`; returns their true labels [n, C]."""
    vectors = library.vectors
    rng = np.random.default_rng([seed, start])
    truth = []
    with vectors.writer_lock():
        for a in range(start, start + n, group):
            b = min(start + n, a + group)
            paths = [f"{prefix}/{i // 10_000:04d}/{i:08d}.jpg" for i in range(a, b)]
            ids = library.store.reserve_images(paths)
            cls, patches, Y = world.images(b - a, rng)
            shard = vectors.next_shard_id()
            vectors.write_shard(shard, ids, cls, patches)
            commit_indexed(library.store, ids, shard, [100_000] * len(ids))
            truth.append(Y)
    return np.concatenate(truth) if truth else np.zeros((0, len(world.means)), bool)


def commit_indexed(store: Any, ids: Sequence[int], shard: int, sizes: Sequence[int]) -> None:
    """Mark images indexed at rows 0..n-1 of a durable shard, through the store's commit of an
    index run's rows (synthetic images have no file: the commit time stands in for mtime)."""
    from piaa_index.catalog.common import utcnow
    from piaa_index.catalog.status import INDEXED

    now = utcnow()
    store.commit_images(
        [
            {
                "id": int(i),
                "size": int(size),
                "mtime": float(now.timestamp()),
                "status": INDEXED,
                "error": None,
                "shard": shard,
                "shard_row": row_no,
                "indexed_at": now,
            }
            for row_no, (i, size) in enumerate(zip(ids, sizes, strict=True))
        ]
    )


def similar_exact(library: Any, path: str, limit: int | None = 20) -> list[dict[str, Any]]:
    """`similar` by an exact scan over every [CLS] vector: the reference the index's answers
    are checked against (tests, benchmarks)."""
    from piaa_index.vectors.similar import cls_of

    query_id = library.image_id(path)
    loc = library.store.location(query_id)
    assert loc is not None
    q = library.vectors.read_shard(loc[0], [loc[1]], with_patches=False).cls[0]
    ids, _, vecs = cls_of(library.vectors, library.store.live_locations())
    keep = ids != query_id
    ids, scores = ids[keep], (vecs @ q)[keep]
    order = np.lexsort((ids, -scores))
    if limit is not None:
        order = order[:limit]
    paths = library.store.paths([int(ids[i]) for i in order])
    return [{"path": paths[int(ids[i])], "score": round(float(scores[i]), 6)} for i in order]
