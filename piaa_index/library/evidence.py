"""Patch evidence maps (the paper's Figure 1): where on a photo the fitted PVCL classifier sees
a label.

The map is the quantity the image's patch score max-pools: each patch's softmax(τ · calibrated
PVCL logits) for the label (`fusion.patch_probabilities`), on the patch vectors stored at index
time, laid out on the model's patch grid (row-major). So `grid.max()` is the image's stored
patch score, and the decision shown beside it is the one `piaa tags` shows.

`evidence_png` draws it over the EXIF-upright photo: bilinear upsampling onto the part of the
photo the model saw (a centre square for open_clip's default `shortest` resize + crop), an
inferno-like colour map from 1/C (no preference among the C labels) to the label's tag
threshold or the best patch if higher (`Evidence.display_range`); what the model never saw is
dimmed.
numpy and Pillow only.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from piaa_index.errors import NotFoundError, UserInputError
from piaa_index.method.fusion import PaaParams, patch_probabilities
from piaa_index.query.language import normalize_label

if TYPE_CHECKING:
    from piaa_index.catalog.store import Store
    from piaa_index.config import ModelSpec
    from piaa_index.library.resources import Resources
    from piaa_index.library.searching import Searcher
    from piaa_index.library.tagging import Tagger

DEFAULT_PNG_SIZE = 512  # longer side of the rendered overlay, pixels
MAX_PNG_SIZE = 2048

# Inferno at nine evenly spaced stops (dark purple → yellow): readable over photos, monotone
# in lightness, so the map reads the same in greyscale.
_STOPS = np.array(
    [
        (0, 0, 4),
        (31, 12, 72),
        (85, 15, 109),
        (136, 34, 106),
        (186, 54, 85),
        (227, 89, 51),
        (249, 140, 10),
        (249, 201, 50),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


@dataclass
class Evidence:
    """One label's patch evidence on one indexed image, with its tag decision."""

    image_id: int
    path: str
    label: str
    grid: np.ndarray  # [gh, gw] float64 in [0, 1]: each patch's probability of the label
    tag: dict[str, Any] = field(default_factory=dict)  # the label's `piaa tags` row
    resize_mode: str = "shortest"  # how the model's input was cut from the photo

    @property
    def display_range(self) -> tuple[float, float]:
        """(lo, hi) mapped to the colour map's ends. lo = 1/C, what a patch with no preference
        among the C labels gets. hi = the label's tag threshold, or the best patch when that is
        higher: a map below the threshold stays dim (its best patch short of the top colour),
        a tagged one shows where its evidence is strongest. A label absent from the collection
        (no threshold) is drawn on the plain probability scale (hi = 1)."""
        n_labels = self.tag.get("n_labels") or 0
        lo = 1.0 / n_labels if n_labels else 0.0
        thr = self.tag.get("threshold")
        hi = max(float(thr), float(self.grid.max())) if thr is not None else 1.0
        return lo, (hi if hi > lo else 1.0)

    def scaled(self) -> np.ndarray:
        """The grid on the display range, clipped to [0, 1]."""
        lo, hi = self.display_range
        return np.clip((self.grid - lo) / max(hi - lo, 1e-12), 0.0, 1.0)

    def as_json(self) -> dict[str, Any]:
        """The JSON form: the grid as nested lists, its shape and range, and the decision."""
        tag = {k: v for k, v in self.tag.items() if k not in ("path", "label", "n_labels")}
        return {
            "image_id": self.image_id,
            "path": self.path,
            "label": self.label,
            "grid_shape": list(self.grid.shape),
            "min": float(self.grid.min()),
            "max": float(self.grid.max()),
            "display_range": list(self.display_range),
            "resize_mode": self.resize_mode,
            **tag,
            "grid": [[round(float(v), 6) for v in row] for row in self.grid],
        }


def resolve_image_id(store: Store, searcher: Searcher, image: int | str | Path) -> int:
    """An indexed image's id from an id (looked up in `store`) or a path (`searcher`'s
    `image_id`); NotFoundError for anything else."""
    from piaa_index.catalog.schema import INDEXED

    if not isinstance(image, (str, Path)):
        row = store.image_by_id(int(image))
        if row is None or row.status != INDEXED:
            raise NotFoundError(f"no indexed image with id {int(image)}")
        return int(image)
    try:
        return searcher.image_id(image)
    except UserInputError as exc:
        raise NotFoundError(str(exc)) from None


def label_column(names: list[str], label: str) -> int:
    """The vocabulary column of `label` (matched as the query language matches names)."""

    wanted = normalize_label(label)
    for c, name in enumerate(names):
        if normalize_label(name) == wanted:
            return c
    shown = ", ".join(names[:20]) + (", …" if len(names) > 20 else "")
    raise UserInputError(f"label {label!r} is not in the vocabulary ({shown})")


def evidence(
    resources: Resources, tagger: Tagger, searcher: Searcher, image: int | str | Path, label: str
) -> Evidence:
    """The per-patch evidence grid of `label` on an indexed image (by id or path): the
    library's store, vectors and model spec (`resources`), its fitted state (`tagger`) and the
    image's tag row (`searcher`)."""

    image_id = resolve_image_id(resources.store, searcher, image)
    state = tagger.state()
    c = label_column(state.vocab.names, label)
    loc = resources.store.location(image_id)
    if loc is None:
        raise NotFoundError(f"no indexed image with id {image_id}")
    vectors = resources.vectors
    with vectors.reading():  # a vacuum meanwhile must not delete the shard
        got = vectors.read_shard(loc[0], [loc[1]])
    if int(got.image_ids[0]) != image_id:  # SQL and the shard disagree: damage, not the user
        raise NotFoundError(f"image {image_id} is not where the index says; run `piaa db check`")
    gh, gw = (int(v) for v in vectors.identity["grid"])
    classifier = state.fitted.classifier
    calibration = state.fitted.decisions.calibration
    if classifier.open_world and calibration is not None:
        # Each patch's log-odds against the background, relative to the best patch of a typical
        # image of this collection: above one half, the patch is more like the label than a
        # typical image's best patch is. Its brightest patch is `tags`' patch score.
        logits = classifier.logits(got.patches)[0, :, c].astype(np.float64)
        grid = calibration.relative_evidence(logits, c).reshape(gh, gw)
    else:
        probs = patch_probabilities(got.patches, classifier, PaaParams().tau_evidence)
        grid = probs[0, :, c].reshape(gh, gw)  # [1, M, C] -> the label's map
    rows = searcher.tags_of(image_id)
    tag = next(r for r in rows if r["label"] == state.vocab.names[c])
    # Open world: each patch's own probability against the background, no 1/C floor.
    tag["n_labels"] = 0 if classifier.open_world else len(rows)
    return Evidence(
        image_id=image_id,
        path=tag["path"],
        label=state.vocab.names[c],
        grid=grid,
        tag=tag,
        resize_mode=resize_mode(resources.spec),
    )


def resize_mode(spec: ModelSpec) -> str:
    """open_clip's `resize_mode` for the model, read from its config file without loading torch:
    `shortest` (resize, centre crop: open_clip's default), `longest` (pad) or `squash`."""
    if spec.model in ("shapesworld", "shapesworld-gap"):  # encoder.SHIPPED_MODELS (imports torch)
        assets = Path(__file__).resolve().parents[1] / "model" / "assets"
        config = assets / "shapesworld" / "shapesworld.json"
    elif spec.model.lower().endswith(".json"):
        config = Path(spec.model).expanduser()
    else:
        return "shortest"
    try:
        cfg = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "shortest"
    mode = str((cfg.get("preprocess_cfg") or {}).get("resize_mode", "shortest"))
    return mode if mode in ("shortest", "longest", "squash") else "shortest"


# ------------------------------------------------------------------------------- rendering


def colormap(values: np.ndarray) -> np.ndarray:
    """[..., 3] uint8 colours of values in [0, 1] (inferno-like, linear between stops)."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0) * (len(_STOPS) - 1)
    i = np.minimum(v.astype(np.int64), len(_STOPS) - 2)
    t = (v - i)[..., None]
    return np.rint(_STOPS[i] * (1 - t) + _STOPS[i + 1] * t).astype(np.uint8)


def seen_box(width: int, height: int, mode: str) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) in photo pixels of the square the model's input covered (may extend
    beyond the photo for `longest`, which pads)."""
    if mode == "squash":
        return 0.0, 0.0, float(width), float(height)
    side = float(min(width, height) if mode == "shortest" else max(width, height))
    x0, y0 = (width - side) / 2, (height - side) / 2
    return x0, y0, x0 + side, y0 + side


def _axis_weights(n_out: int, start: float, stop: float, n_grid: int) -> tuple[Any, Any, Any]:
    """Bilinear sampling of `n_grid` cells spread over [start, stop) at n_out pixel centres:
    (lower index, upper index, upper weight), clamped at the edges (cell centres are exact)."""
    u = (np.arange(n_out) + 0.5 - start) / max(stop - start, 1e-9) * n_grid - 0.5
    u = np.clip(u, 0.0, n_grid - 1.0)
    lo = np.floor(u).astype(np.int64)
    hi = np.minimum(lo + 1, n_grid - 1)
    return lo, hi, u - lo


def upsample(grid: np.ndarray, width: int, height: int, box: tuple[float, ...]) -> np.ndarray:
    """The grid bilinearly upsampled onto `box` of a width × height image, [height, width]."""
    gh, gw = grid.shape
    x0, y0, x1, y1 = box
    xl, xh, xt = _axis_weights(width, x0, x1, gw)
    yl, yh, yt = _axis_weights(height, y0, y1, gh)
    g = np.asarray(grid, dtype=np.float64)
    top = g[yl][:, xl] * (1 - xt) + g[yl][:, xh] * xt
    bottom = g[yh][:, xl] * (1 - xt) + g[yh][:, xh] * xt
    return top * (1 - yt)[:, None] + bottom * yt[:, None]


def render_overlay(photo: Any, grid: np.ndarray, mode: str = "shortest") -> Any:
    """A PIL RGB image: `grid` (values in [0, 1]) over the photo; outside what the model saw,
    dimmed."""
    from PIL import Image

    rgb = np.asarray(photo.convert("RGB"), dtype=np.float32)
    h, w = rgb.shape[:2]
    box = seen_box(w, h, mode)
    heat = upsample(grid, w, h, box).astype(np.float32)
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5
    inside = ((ys >= box[1]) & (ys <= box[3]))[:, None] & ((xs >= box[0]) & (xs <= box[2]))[None]
    # Opacity grows with the evidence: patches the classifier ignores leave the photo visible.
    alpha = (0.5 + 0.15 * np.clip(heat, 0.0, 1.0))[..., None]
    out = rgb * (1 - alpha) + colormap(heat).astype(np.float32) * alpha
    out = np.where(inside[..., None], out, rgb * np.float32(0.35))
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), mode="RGB")


def evidence_png(ev: Evidence, size: int = DEFAULT_PNG_SIZE) -> bytes:
    """PNG bytes of the evidence map over the EXIF-upright photo, longer side `size` at most."""
    from PIL import Image

    from piaa_index.ingest.images import ImageDecodeError, load_image

    if not 16 <= size <= MAX_PNG_SIZE:
        raise UserInputError(f"size must be between 16 and {MAX_PNG_SIZE}, not {size}")
    try:
        photo = load_image(ev.path, draft_size=size)
    except ImageDecodeError as exc:
        raise NotFoundError(f"cannot read image {ev.image_id} ({ev.path}): {exc.reason}") from None
    photo.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    # zlib level 1: a photo-like overlay compresses only ~12% better at the default level 6,
    # which takes ~4x longer (measured on 512 px maps).
    render_overlay(photo, ev.scaled(), ev.resize_mode).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
