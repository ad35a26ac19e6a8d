"""ShapesWorld: a procedural multi-object scene generator with exact multi-label ground truth.

Every class is recognisable from its local texture / parts (what a 12-px patch sees) as well as
from its outline, because a prototype whose classes differed by colour + outline alone gave patch
tokens that could not tell classes apart (see docs/shared DESIGN.md, "Pitfalls already measured").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

CLASSES: list[str] = [
    "striped fish",
    "spotted mushroom",
    "checkered flag",
    "wheel",
    "star",
    "leaf",
    "brick wall",
    "ladder",
    "clock face",
    "grid window",
    "honeycomb",
    "beach ball",
    "sun",
    "pine tree",
    "house",
    "car",
    "apple",
    "mug",
    "pizza slice",
    "traffic light",
    "snail",
    "cactus",
    "butterfly",
    "book",
]

# Co-occurrence structure: a scene usually draws most of its objects from one group.
GROUPS: dict[str, list[str]] = {
    "kitchen": ["mug", "apple", "pizza slice", "clock face", "book", "grid window"],
    "street": ["car", "traffic light", "house", "brick wall", "wheel", "ladder", "grid window"],
    "garden": ["pine tree", "leaf", "spotted mushroom", "butterfly", "snail", "sun", "cactus"],
    "fun": ["beach ball", "checkered flag", "star", "striped fish", "honeycomb", "sun"],
}
_GROUP_IDS: list[list[int]] = [[CLASSES.index(n) for n in g] for g in GROUPS.values()]

RGB = tuple[int, int, int]


@dataclass
class Scene:
    """One rendered scene: the image, its sorted label ids and (class_id, area_fraction) objects."""

    image: Image.Image
    labels: list[int]
    objects: list[tuple[int, float]] = field(default_factory=list)


# ----------------------------------------------------------------------------- colour helpers


def _jit(rng: np.random.Generator, c: RGB, amt: int = 28) -> RGB:
    """Jitter a colour channel-wise."""
    d = rng.integers(-amt, amt + 1, size=3)
    return tuple(int(min(255, max(0, c[i] + d[i]))) for i in range(3))  # type: ignore[return-value]


def _pick(rng: np.random.Generator, cols: list[RGB], amt: int = 28) -> RGB:
    """Pick one palette colour and jitter it."""
    return _jit(rng, cols[int(rng.integers(len(cols)))], amt)


def _shade(c: RGB, f: float) -> RGB:
    """Darken (f<1) or lighten (f>1) a colour."""
    if f <= 1:
        return (int(c[0] * f), int(c[1] * f), int(c[2] * f))
    g = f - 1
    return tuple(int(v + (255 - v) * g) for v in c)  # type: ignore[return-value]


def _rand_col(rng: np.random.Generator) -> RGB:
    """Any colour."""
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


# ----------------------------------------------------------------------------- object painters
# Each painter gets a blank RGB tile, an 'L' mask (0 = transparent) and their draw handles;
# it paints the pattern into rgb and the silhouette into mask. Coordinates scale with w, h.

Painter = Callable[[ImageDraw.ImageDraw, ImageDraw.ImageDraw, int, int, np.random.Generator], None]


def _fish(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Striped fish: ellipse body + tail, bold vertical stripes, eye."""
    base = _pick(rng, [(250, 140, 20), (250, 210, 40), (40, 120, 230), (230, 60, 60)])
    stripe = _pick(rng, [(20, 20, 20), (250, 250, 250)], 10)
    d.rectangle([0, 0, w, h], fill=base)
    period = max(4, int(w * rng.uniform(0.11, 0.16)))
    sw = max(2, period // 2)
    for x in range(int(w * 0.12), int(w * 0.78), period):
        d.rectangle([x, 0, x + sw - 1, h], fill=stripe)
    m.ellipse([0, h * 0.18, w * 0.78, h * 0.82], fill=255)
    m.polygon([(w * 0.7, h * 0.5), (w, h * 0.15), (w * 0.95, h * 0.5), (w, h * 0.85)], fill=255)
    r = max(1.5, w * 0.05)
    ex, ey = w * 0.15, h * 0.42
    d.ellipse([ex - r, ey - r, ex + r, ey + r], fill=(255, 255, 255))
    d.ellipse([ex - r / 2, ey - r / 2, ex + r / 2, ey + r / 2], fill=(0, 0, 0))


def _mushroom(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Spotted mushroom: half-dome cap with white spots on a cream stem."""
    cap = _pick(rng, [(210, 30, 30), (150, 80, 30), (140, 40, 160)])
    stem = _pick(rng, [(235, 225, 195)], 15)
    d.rectangle([0, 0, w, h], fill=stem)
    cy = h * 0.55
    d.rectangle([0, 0, w, cy], fill=cap)
    m.chord([0, 0, w, 2 * cy], 180, 360, fill=255)
    m.rectangle([w * 0.36, cy - 1, w * 0.64, h], fill=255)
    for _ in range(int(rng.integers(5, 10))):
        r = w * rng.uniform(0.05, 0.09)
        x, y = w * rng.uniform(0.15, 0.85), cy * rng.uniform(0.25, 0.85)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(250, 250, 245))
    d.line([(w * 0.1, cy), (w * 0.9, cy)], fill=_shade(cap, 0.5), width=max(1, int(h * 0.03)))


def _flag(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Checkered flag on a pole."""
    a, b = [
        ((20, 20, 20), (250, 250, 250)),
        ((220, 30, 30), (250, 250, 250)),
        ((30, 60, 200), (250, 220, 40)),
    ][int(rng.integers(3))]
    pw = max(2, int(w * 0.07))
    d.rectangle([0, 0, pw, h], fill=_pick(rng, [(120, 120, 120), (110, 70, 30)]))
    m.rectangle([0, 0, pw, h], fill=255)
    x0, y1 = pw + 1, h * 0.62
    n = int(rng.integers(4, 7))
    cw, ch = (w - x0) / n, y1 / max(3, n - 1)
    for i in range(n):
        for j in range(max(3, n - 1)):
            d.rectangle(
                [x0 + i * cw, j * ch, x0 + (i + 1) * cw, (j + 1) * ch],
                fill=a if (i + j) % 2 == 0 else b,
            )
    m.rectangle([x0, 0, w, y1], fill=255)


def _wheel(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Wheel: thick dark rim, thin radial spokes, hub (open between spokes)."""
    rim = _pick(rng, [(25, 25, 25), (60, 60, 70)], 15)
    spoke = _pick(rng, [(200, 200, 205), (230, 200, 60)], 20)
    t = max(2, int(w * 0.1))
    d.ellipse([0, 0, w - 1, h - 1], fill=rim)
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    m.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    cx, cy = w / 2, h / 2
    n = int(rng.integers(6, 11))
    off = rng.uniform(0, math.pi)
    sw = max(1, int(w * 0.03))
    for k in range(n):
        ang = off + 2 * math.pi * k / n
        p = (cx + math.cos(ang) * (w / 2 - t / 2), cy + math.sin(ang) * (h / 2 - t / 2))
        d.line([(cx, cy), p], fill=spoke, width=sw)
        m.line([(cx, cy), p], fill=255, width=sw)
    r = w * 0.12
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=spoke)
    d.ellipse([cx - r / 2, cy - r / 2, cx + r / 2, cy + r / 2], fill=rim)
    m.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)


def _star_pts(cx: float, cy: float, ro: float, ri: float, off: float) -> list[tuple[float, float]]:
    """Vertices of a five-pointed star."""
    pts = []
    for k in range(10):
        r = ro if k % 2 == 0 else ri
        a = off + math.pi * k / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    return pts


def _star(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Faceted five-pointed star: light/dark facets meeting in the centre."""
    base = _pick(rng, [(250, 200, 30), (240, 120, 30), (200, 40, 180), (60, 200, 230)])
    cx, cy, ro = w / 2, h / 2, w / 2
    off = -math.pi / 2 + rng.uniform(-0.3, 0.3)
    pts = _star_pts(cx, cy, ro, ro * 0.42, off)
    m.polygon(pts, fill=255)
    for k in range(10):
        tri = [(cx, cy), pts[k], pts[(k + 1) % 10]]
        d.polygon(tri, fill=_shade(base, 1.45) if k % 2 == 0 else _shade(base, 0.62))


def _leaf(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Leaf: pointed lens outline, light midrib, diagonal veins."""
    base = _pick(rng, [(50, 150, 40), (110, 170, 30), (200, 120, 20)])
    vein = _shade(base, 1.6)
    d.rectangle([0, 0, w, h], fill=base)
    pts = []
    for k in range(25):
        t = k / 24
        pts.append((w * t, h / 2 - h * 0.45 * math.sin(math.pi * t) ** 0.8))
    for k in range(25):
        t = 1 - k / 24
        pts.append((w * t, h / 2 + h * 0.45 * math.sin(math.pi * t) ** 0.8))
    m.polygon(pts, fill=255)
    lw = max(1, int(h * 0.05))
    d.line([(0, h / 2), (w, h / 2)], fill=vein, width=lw)
    step = max(3, int(w * rng.uniform(0.1, 0.14)))
    for x in range(int(w * 0.1), int(w * 0.9), step):
        d.line([(x, h / 2), (x + w * 0.14, h * 0.12)], fill=vein, width=max(1, lw // 2))
        d.line([(x, h / 2), (x + w * 0.14, h * 0.88)], fill=vein, width=max(1, lw // 2))
    m.line([(-w * 0.05, h / 2), (w * 0.1, h / 2)], fill=255, width=lw)


def _bricks(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Brick wall: staggered rows of bricks with light mortar."""
    brick = _pick(rng, [(170, 60, 40), (140, 80, 50), (190, 110, 70), (110, 110, 120)])
    d.rectangle([0, 0, w, h], fill=_pick(rng, [(215, 210, 200)], 15))
    m.rectangle([0, 0, w, h], fill=255)
    rows = int(rng.integers(5, 9))
    bh = h / rows
    bw = bh * rng.uniform(1.8, 2.5)
    g = bh * 0.12
    for r in range(rows):
        x = -bw / 2 * (r % 2)
        while x < w:
            d.rectangle(
                [x + g, r * bh + g, x + bw - g, (r + 1) * bh - g], fill=_jit(rng, brick, 14)
            )
            x += bw


def _ladder(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Ladder: two rails and evenly spaced rungs."""
    c = _pick(rng, [(150, 100, 50), (170, 170, 180), (230, 150, 30)])
    rw = max(2, int(w * 0.14))
    n = int(rng.integers(5, 9))
    for dd, fill in ((d, c), (m, 255)):
        dd.rectangle([0, 0, rw, h], fill=fill)
        dd.rectangle([w - rw, 0, w, h], fill=fill)
        for k in range(n):
            y = h * (k + 0.5) / n
            dd.rectangle([rw, y - max(1, h * 0.025), w - rw, y + max(1, h * 0.025)], fill=fill)
    d.line([(rw, 0), (rw, h)], fill=_shade(c, 0.6), width=1)


def _clock(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Clock face: light dial, dark ring, 12 ticks, two hands."""
    ring = _pick(rng, [(30, 30, 30), (160, 40, 40), (40, 60, 150)], 20)
    dial = _pick(rng, [(245, 245, 235), (240, 225, 180)], 10)
    t = max(2, int(w * 0.07))
    d.ellipse([0, 0, w - 1, h - 1], fill=ring)
    d.ellipse([t, t, w - 1 - t, h - 1 - t], fill=dial)
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    cx, cy, r = w / 2, h / 2, w / 2 - t
    for k in range(12):
        a = 2 * math.pi * k / 12
        r0 = r * (0.72 if k % 3 == 0 else 0.82)
        d.line(
            [
                (cx + r0 * math.cos(a), cy + r0 * math.sin(a)),
                (cx + r * 0.95 * math.cos(a), cy + r * 0.95 * math.sin(a)),
            ],
            fill=(20, 20, 20),
            width=max(1, int(w * 0.03)),
        )
    for ln, wd in ((0.5, 0.06), (0.8, 0.035)):
        a = rng.uniform(0, 2 * math.pi)
        d.line(
            [(cx, cy), (cx + r * ln * math.cos(a), cy + r * ln * math.sin(a))],
            fill=(15, 15, 15),
            width=max(1, int(w * wd)),
        )


def _window(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Grid window: thick frame and mullions around sky-blue panes with a glare streak."""
    frame = _pick(rng, [(245, 245, 245), (120, 80, 40), (40, 40, 40)], 15)
    pane = _pick(rng, [(140, 200, 240), (170, 220, 250)], 15)
    d.rectangle([0, 0, w, h], fill=pane)
    m.rectangle([0, 0, w, h], fill=255)
    for k in range(-2, 4):
        x = w * k / 3
        d.polygon(
            [(x, h), (x + w * 0.12, h), (x + w * 0.52, 0), (x + w * 0.4, 0)], fill=_shade(pane, 1.5)
        )
    t = max(2, int(w * 0.08))
    nx, ny = int(rng.integers(2, 4)), int(rng.integers(2, 4))
    d.rectangle([0, 0, w - 1, h - 1], outline=frame, width=t)
    for i in range(1, nx):
        x = w * i / nx
        d.rectangle([x - t / 3, 0, x + t / 3, h], fill=frame)
    for j in range(1, ny):
        y = h * j / ny
        d.rectangle([0, y - t / 3, w, y + t / 3], fill=frame)


def _honeycomb(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Honeycomb: hexagonal outline filled with small hexagonal cells."""
    base = _pick(rng, [(240, 170, 30), (220, 140, 20)], 18)
    wall = _shade(base, 0.55)
    d.rectangle([0, 0, w, h], fill=wall)
    cx, cy, R = w / 2, h / 2, w / 2
    m.polygon(
        [
            (cx + R * math.cos(math.pi / 3 * k), cy + R * math.sin(math.pi / 3 * k))
            for k in range(6)
        ],
        fill=255,
    )
    r = max(2.5, w * rng.uniform(0.07, 0.1))
    dx, dy = 1.5 * r, math.sqrt(3) * r
    i = 0
    x = 0.0
    while x < w + r:
        y = (dy / 2) * (i % 2)
        while y < h + r:
            rc = 0.8 * r  # cell drawn slightly smaller than its pitch: the gap is the wax wall
            pts = [
                (x + rc * math.cos(math.pi / 3 * k), y + rc * math.sin(math.pi / 3 * k))
                for k in range(6)
            ]
            d.polygon(pts, fill=_shade(base, rng.uniform(0.95, 1.25)))
            y += dy
        x += dx
        i += 1


def _beachball(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Beach ball: six bright wedges of different colours and a white cap."""
    cols = [
        (230, 40, 40),
        (250, 220, 30),
        (40, 100, 230),
        (250, 250, 250),
        (40, 180, 70),
        (250, 130, 20),
    ]
    order = rng.permutation(len(cols))
    off = rng.uniform(0, 60)
    for k in range(6):
        d.pieslice(
            [0, 0, w - 1, h - 1],
            off + 60 * k,
            off + 60 * (k + 1),
            fill=_jit(rng, cols[order[k]], 15),
        )
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    r = w * 0.1
    d.ellipse([w / 2 - r, h / 2 - r, w / 2 + r, h / 2 + r], fill=(250, 250, 250))


def _sun(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Sun: disc with a concentric halo and triangular rays."""
    core = _pick(rng, [(250, 210, 30), (250, 160, 20)], 15)
    ray = _pick(rng, [(250, 120, 20), (250, 230, 80)], 15)
    cx, cy = w / 2, h / 2
    n = int(rng.integers(8, 13))
    off = rng.uniform(0, math.pi)
    ri = w * 0.3
    for k in range(n):
        a = off + 2 * math.pi * k / n
        da = math.pi / n * 0.6
        tri = [
            (cx + ri * math.cos(a - da), cy + ri * math.sin(a - da)),
            (cx + w / 2 * math.cos(a), cy + h / 2 * math.sin(a)),
            (cx + ri * math.cos(a + da), cy + ri * math.sin(a + da)),
        ]
        d.polygon(tri, fill=ray)
        m.polygon(tri, fill=255)
    rr = w * 0.33
    d.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=_shade(core, 0.85))
    m.ellipse([cx - rr, cy - rr, cx + rr, cy + rr], fill=255)
    rr2 = w * 0.25
    d.ellipse([cx - rr2, cy - rr2, cx + rr2, cy + rr2], fill=_shade(core, 1.3))


def _tree(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Pine tree: three stacked dark-green tiers with light needle chevrons and a trunk."""
    g = _pick(rng, [(20, 100, 40), (40, 120, 60)], 18)
    trunk = _pick(rng, [(100, 60, 30)], 15)
    tw = w * 0.16
    for dd, f1, f2 in ((d, trunk, g), (m, 255, 255)):
        dd.rectangle([w / 2 - tw / 2, h * 0.8, w / 2 + tw / 2, h], fill=f1)
        for k in range(3):
            top, bot = h * (0.28 * k), h * (0.36 + 0.22 * k)
            half = w * (0.3 + 0.1 * k)
            dd.polygon([(w / 2, top), (w / 2 + half, bot), (w / 2 - half, bot)], fill=f2)
    needle = _shade(g, 1.6)
    step = max(3, int(h * 0.07))
    for y in range(int(h * 0.1), int(h * 0.8), step):
        hw = w * 0.08
        d.line(
            [(w / 2 - hw, y + hw), (w / 2, y), (w / 2 + hw, y + hw)],
            fill=needle,
            width=max(1, int(w * 0.025)),
        )


def _house(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """House: wall block, tiled roof with shingle rows, door, small window."""
    wall = _pick(rng, [(230, 220, 190), (200, 170, 130), (170, 200, 220)], 15)
    roof = _pick(rng, [(170, 40, 30), (90, 60, 50), (60, 70, 90)], 15)
    ry = h * 0.42
    d.rectangle([w * 0.08, ry, w * 0.92, h], fill=wall)
    m.rectangle([w * 0.08, ry, w * 0.92, h], fill=255)
    d.polygon([(0, ry), (w / 2, 0), (w, ry)], fill=roof)
    m.polygon([(0, ry), (w / 2, 0), (w, ry)], fill=255)
    step = max(3, int(h * 0.07))
    for y in range(step, int(ry), step):
        hw = w / 2 * y / ry
        d.line([(w / 2 - hw, y), (w / 2 + hw, y)], fill=_shade(roof, 0.6), width=1)
    d.rectangle([w * 0.58, h * 0.62, w * 0.78, h], fill=_pick(rng, [(110, 60, 30), (40, 70, 40)]))
    d.rectangle(
        [w * 0.18, h * 0.55, w * 0.42, h * 0.75],
        fill=(150, 200, 240),
        outline=(250, 250, 250),
        width=max(1, int(w * 0.025)),
    )


def _car(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Car: coloured body, cabin with blue windows, two black tyres with grey hubs."""
    body = _pick(
        rng, [(210, 30, 30), (30, 80, 200), (240, 200, 30), (230, 230, 230), (40, 150, 60)], 20
    )
    for dd, f in ((d, body), (m, 255)):
        dd.rounded_rectangle([0, h * 0.4, w, h * 0.8], radius=max(1, int(h * 0.08)), fill=f)
        dd.polygon(
            [(w * 0.2, h * 0.42), (w * 0.32, h * 0.1), (w * 0.7, h * 0.1), (w * 0.82, h * 0.42)],
            fill=f,
        )
    d.polygon(
        [(w * 0.27, h * 0.4), (w * 0.35, h * 0.17), (w * 0.49, h * 0.17), (w * 0.49, h * 0.4)],
        fill=(140, 200, 240),
    )
    d.polygon(
        [(w * 0.53, h * 0.4), (w * 0.53, h * 0.17), (w * 0.67, h * 0.17), (w * 0.76, h * 0.4)],
        fill=(140, 200, 240),
    )
    d.rectangle([w * 0.92, h * 0.48, w, h * 0.58], fill=(250, 240, 120))
    r = h * 0.19
    for cx in (w * 0.22, w * 0.78):
        for dd, f in ((d, (20, 20, 20)), (m, 255)):
            dd.ellipse([cx - r, h * 0.8 - r, cx + r, h * 0.8 + r], fill=f)
        d.ellipse([cx - r / 2, h * 0.8 - r / 2, cx + r / 2, h * 0.8 + r / 2], fill=(170, 170, 170))


def _apple(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Apple: round red/green fruit with fine speckles, a highlight, stem and small leaf."""
    base = _pick(rng, [(200, 20, 30), (120, 190, 40), (230, 60, 40)], 18)
    d.rectangle([0, 0, w, h], fill=base)
    m.ellipse([0, h * 0.15, w * 0.62, h], fill=255)
    m.ellipse([w * 0.38, h * 0.15, w, h], fill=255)
    for _ in range(int(rng.integers(25, 45))):
        x, y = w * rng.random(), h * (0.2 + 0.8 * rng.random())
        rr = max(0.6, w * 0.015)
        d.ellipse([x - rr, y - rr, x + rr, y + rr], fill=(245, 230, 150))
    d.ellipse([w * 0.15, h * 0.3, w * 0.33, h * 0.55], fill=_shade(base, 1.55))
    d.line([(w / 2, h * 0.25), (w * 0.55, 0)], fill=(90, 50, 20), width=max(1, int(w * 0.05)))
    m.line([(w / 2, h * 0.25), (w * 0.55, 0)], fill=255, width=max(1, int(w * 0.05)))
    lf = [(w * 0.56, h * 0.1), (w * 0.8, h * 0.0), (w * 0.72, h * 0.14)]
    d.polygon(lf, fill=(40, 150, 40))
    m.polygon(lf, fill=255)


def _mug(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Mug: cylinder body with two horizontal bands, side handle, coffee at the rim."""
    body = _pick(rng, [(240, 240, 235), (60, 110, 200), (220, 80, 60), (250, 210, 60)], 15)
    band = _pick(rng, [(30, 30, 30), (220, 30, 30), (40, 150, 200)], 20)
    bx = w * 0.72
    d.rectangle([0, 0, bx, h], fill=body)
    m.rectangle([0, h * 0.05, bx, h], fill=255)
    t = max(2, int(w * 0.09))
    d.ellipse([bx - w * 0.12, h * 0.25, w, h * 0.75], outline=body, width=t)
    m.ellipse([bx - w * 0.12, h * 0.25, w, h * 0.75], outline=255, width=t)
    d.ellipse([0, 0, bx, h * 0.12], fill=(90, 50, 20), outline=_shade(body, 0.7))
    for yb in (0.35, 0.7):
        d.rectangle([0, h * yb, bx, h * (yb + 0.09)], fill=band)


def _pizza(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Pizza slice: cheese triangle, brown crust band, pepperoni discs."""
    cheese = _pick(rng, [(250, 200, 60), (245, 180, 40)], 12)
    d.rectangle([0, 0, w, h], fill=cheese)
    tri = [(0, 0), (w, 0), (w / 2, h)]
    m.polygon(tri, fill=255)
    d.rectangle([0, 0, w, h * 0.13], fill=_pick(rng, [(170, 100, 40)], 15))
    for _ in range(int(rng.integers(3, 7))):
        y = h * rng.uniform(0.22, 0.7)
        half = w / 2 * (1 - y / h)
        x = w / 2 + half * rng.uniform(-0.7, 0.7)
        r = w * rng.uniform(0.06, 0.09)
        d.ellipse([x - r, y - r, x + r, y + r], fill=(190, 30, 30))
        d.ellipse([x - r / 3, y - r / 3, x, y], fill=(120, 15, 15))


def _traffic(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Traffic light: dark housing with red, amber and green lamps stacked vertically."""
    house = _pick(rng, [(30, 30, 30), (60, 60, 60), (200, 170, 30)], 12)
    for dd, f in ((d, house), (m, 255)):
        dd.rounded_rectangle([0, 0, w, h], radius=max(1, int(w * 0.2)), fill=f)
    r = min(w * 0.34, h / 7)
    for k, c in enumerate(((240, 30, 30), (250, 190, 20), (40, 220, 80))):
        cy = h * (k + 0.5) / 3
        lit = rng.random() < 0.6
        col = c if lit else _shade(c, 0.45)
        d.ellipse(
            [w / 2 - r * 1.15, cy - r * 1.15, w / 2 + r * 1.15, cy + r * 1.15],
            fill=_shade(house, 0.5),
        )
        d.ellipse([w / 2 - r, cy - r, w / 2 + r, cy + r], fill=col)


def _snail(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Snail: spiral-lined round shell on a grey-green foot with eye stalks."""
    shell = _pick(rng, [(210, 160, 100), (230, 180, 190), (180, 120, 60)], 18)
    foot = _pick(rng, [(150, 160, 120), (170, 150, 130)], 15)
    for dd, f in ((d, foot), (m, 255)):
        dd.rounded_rectangle([0, h * 0.72, w, h * 0.95], radius=max(1, int(h * 0.1)), fill=f)
        dd.line([(w * 0.12, h * 0.75), (w * 0.05, h * 0.45)], fill=f, width=max(1, int(w * 0.03)))
        dd.line([(w * 0.18, h * 0.75), (w * 0.2, h * 0.45)], fill=f, width=max(1, int(w * 0.03)))
    cx, cy, R = w * 0.58, h * 0.45, min(w * 0.4, h * 0.42)
    d.ellipse([cx - R, cy - R, cx + R, cy + R], fill=shell)
    m.ellipse([cx - R, cy - R, cx + R, cy + R], fill=255)
    pts = []
    turns = 3.0
    for k in range(80):
        t = k / 79
        a = t * turns * 2 * math.pi
        r = R * 0.92 * (1 - t)
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    d.line(pts[::-1], fill=_shade(shell, 0.45), width=max(1, int(w * 0.04)))


def _cactus(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Cactus: ribbed green column with two arms, white spines, terracotta pot."""
    g = _pick(rng, [(60, 150, 70), (90, 160, 60)], 15)
    pot = _pick(rng, [(190, 90, 50)], 15)
    parts = [
        [w * 0.35, 0, w * 0.65, h * 0.8],
        [w * 0.05, h * 0.25, w * 0.25, h * 0.55],
        [w * 0.75, h * 0.15, w * 0.95, h * 0.45],
    ]
    for dd, f in ((d, g), (m, 255)):
        for p in parts:
            dd.rounded_rectangle(p, radius=max(1, int(w * 0.08)), fill=f)
        dd.rectangle([w * 0.05, h * 0.47, w * 0.35, h * 0.55], fill=f)
        dd.rectangle([w * 0.65, h * 0.37, w * 0.95, h * 0.45], fill=f)
    for x in (0.45, 0.55):
        d.line([(w * x, h * 0.05), (w * x, h * 0.78)], fill=_shade(g, 0.6), width=1)
    for _ in range(int(rng.integers(12, 22))):
        p = parts[int(rng.integers(3))]
        x, y = rng.uniform(p[0], p[2]), rng.uniform(p[1], p[3])
        s = max(1.0, w * 0.03)
        d.line([(x - s, y - s), (x + s, y + s)], fill=(245, 245, 220), width=1)
        d.line([(x - s, y + s), (x + s, y - s)], fill=(245, 245, 220), width=1)
    for dd, f in ((d, pot), (m, 255)):
        dd.polygon([(w * 0.22, h * 0.78), (w * 0.78, h * 0.78), (w * 0.7, h), (w * 0.3, h)], fill=f)


def _butterfly(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Butterfly: four symmetric wings with eye spots, dark body, antennae."""
    wing = _pick(rng, [(240, 130, 20), (60, 120, 230), (230, 60, 160), (250, 220, 40)], 18)
    spot = _pick(rng, [(20, 20, 20), (250, 250, 250)], 10)
    wings = [
        [0, 0, w * 0.5, h * 0.6],
        [w * 0.5, 0, w, h * 0.6],
        [w * 0.08, h * 0.45, w * 0.5, h],
        [w * 0.5, h * 0.45, w * 0.92, h],
    ]
    for p in wings:
        d.ellipse(p, fill=wing, outline=_shade(wing, 0.35), width=max(1, int(w * 0.03)))
        m.ellipse(p, fill=255)
    for cx, cy, r in ((0.25, 0.28, 0.1), (0.75, 0.28, 0.1), (0.3, 0.73, 0.07), (0.7, 0.73, 0.07)):
        for rr, col in ((r, spot), (r * 0.5, _shade(wing, 1.5))):
            d.ellipse([w * (cx - rr), h * cy - w * rr, w * (cx + rr), h * cy + w * rr], fill=col)
    for dd, f in ((d, (30, 20, 20)), (m, 255)):
        dd.rounded_rectangle(
            [w * 0.46, h * 0.1, w * 0.54, h * 0.95], radius=max(1, int(w * 0.04)), fill=f
        )


def _book(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """Book: coloured cover with spine band and title bars, cream page block with fine lines."""
    cover = _pick(rng, [(40, 60, 150), (150, 30, 40), (30, 120, 80), (90, 50, 110)], 18)
    d.rectangle([0, 0, w, h], fill=cover)
    m.rectangle([0, 0, w, h], fill=255)
    d.rectangle([0, 0, w * 0.14, h], fill=_shade(cover, 0.55))
    pw = w * 0.12
    d.rectangle([w - pw, h * 0.03, w, h * 0.97], fill=(240, 232, 205))
    for y in range(int(h * 0.05), int(h * 0.96), 2):
        d.line([(w - pw, y), (w, y)], fill=(190, 180, 160), width=1)
    gold = (230, 200, 90)
    d.rectangle([w * 0.28, h * 0.2, w * 0.76, h * 0.27], fill=gold)
    d.rectangle([w * 0.34, h * 0.33, w * 0.7, h * 0.37], fill=gold)
    d.rectangle([w * 0.2, h * 0.8, w * 0.82, h * 0.82], fill=gold)


# name -> (painter, aspect w/h range, max rotation in degrees)
_PAINTERS: dict[str, tuple[Painter, tuple[float, float], float]] = {
    "striped fish": (_fish, (1.5, 1.9), 25),
    "spotted mushroom": (_mushroom, (0.9, 1.2), 12),
    "checkered flag": (_flag, (1.0, 1.3), 10),
    "wheel": (_wheel, (1.0, 1.0), 0),
    "star": (_star, (1.0, 1.0), 0),
    "leaf": (_leaf, (1.8, 2.3), 180),
    "brick wall": (_bricks, (1.1, 1.8), 0),
    "ladder": (_ladder, (0.4, 0.55), 15),
    "clock face": (_clock, (1.0, 1.0), 0),
    "grid window": (_window, (0.75, 1.2), 0),
    "honeycomb": (_honeycomb, (1.0, 1.0), 30),
    "beach ball": (_beachball, (1.0, 1.0), 0),
    "sun": (_sun, (1.0, 1.0), 0),
    "pine tree": (_tree, (0.65, 0.8), 5),
    "house": (_house, (0.9, 1.15), 0),
    "car": (_car, (1.7, 2.1), 5),
    "apple": (_apple, (0.95, 1.1), 15),
    "mug": (_mug, (1.05, 1.25), 8),
    "pizza slice": (_pizza, (0.8, 1.0), 180),
    "traffic light": (_traffic, (0.38, 0.48), 0),
    "snail": (_snail, (1.2, 1.4), 8),
    "cactus": (_cactus, (0.7, 0.85), 5),
    "butterfly": (_butterfly, (1.1, 1.3), 25),
    "book": (_book, (0.7, 0.85), 20),
}
assert set(_PAINTERS) == set(CLASSES)

# ----------------------------------------------------------------------------- novel kinds
# Object kinds the shipped model never saw in training (`piaa shapes generate --novel K`), to
# measure learning from user keywords. They are not in CLASSES: a dataset that holds them lists
# them after the 24 classes, so novel kind j (0-based) has class id len(CLASSES) + j.


def _target(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """novel-1, bullseye target: 4-6 concentric rings in two alternating colours."""
    a, b = [
        ((220, 30, 30), (250, 250, 250)),
        ((30, 60, 200), (250, 220, 40)),
        ((20, 130, 60), (245, 240, 220)),
    ][int(rng.integers(3))]
    a, b = _jit(rng, a, 15), _jit(rng, b, 10)
    n = int(rng.integers(4, 7))
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    for k in range(n):
        f = k / n / 2
        d.ellipse([w * f, h * f, (w - 1) * (1 - f), (h - 1) * (1 - f)], fill=a if k % 2 == 0 else b)


def _zigzag(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """novel-2, zigzag rug: a band of horizontal zigzag (chevron) stripes in three colours."""
    cols = [_pick(rng, p, 15) for p in ([(30, 30, 90)], [(240, 200, 60)], [(200, 60, 40)])]
    d.rectangle([0, 0, w, h], fill=cols[0])
    m.rectangle([0, 0, w, h], fill=255)
    period = max(4.0, h * rng.uniform(0.2, 0.28))
    amp = period * 0.45
    step = max(2.0, w * rng.uniform(0.09, 0.13))
    k, y0 = 0, -amp
    while y0 < h + amp:
        top = [(x * step, y0 + (amp if x % 2 else 0)) for x in range(int(w / step) + 2)]
        bot = [(x, y + period * 0.5) for x, y in top[::-1]]
        d.polygon(top + bot, fill=cols[1 + k % 2])
        y0 += period
        k += 1
    t = max(1, int(h * 0.05))
    d.rectangle([0, 0, w - 1, h - 1], outline=_shade(cols[0], 0.6), width=t)


def _hatched_diamond(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """novel-3, crosshatched diamond: light rhombus, dark diagonal crosshatch, thick border."""
    fill = _pick(rng, [(240, 235, 210), (200, 230, 240), (240, 210, 230)], 12)
    ink = _pick(rng, [(40, 30, 90), (90, 30, 30), (20, 70, 40)], 15)
    pts = [(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)]
    d.rectangle([0, 0, w, h], fill=fill)
    m.polygon(pts, fill=255)
    step = max(3.0, w * rng.uniform(0.1, 0.14))
    lw = max(1, int(w * 0.025))
    x = -float(h)
    while x < w + h:
        d.line([(x, 0), (x + h, h)], fill=ink, width=lw)
        d.line([(x, h), (x + h, 0)], fill=ink, width=lw)
        x += step
    d.polygon(pts, outline=ink, width=max(1, int(w * 0.06)))


def _donut(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """novel-4, sprinkled donut: tan dough ring, glazed top with bright sprinkle dashes, hole."""
    dough = _pick(rng, [(200, 150, 90)], 15)
    glaze = _pick(rng, [(240, 140, 180), (110, 60, 40), (150, 200, 240)], 15)
    cx, cy = w / 2, h / 2
    hole = 0.17
    d.ellipse([0, 0, w - 1, h - 1], fill=dough)
    m.ellipse([0, 0, w - 1, h - 1], fill=255)
    g = 0.07
    d.ellipse([w * g, h * g, w * (1 - g), h * (1 - g)], fill=glaze)
    sprinkles = [(250, 250, 250), (240, 60, 60), (60, 200, 80), (250, 220, 40), (70, 90, 230)]
    ln, lw = max(2.0, w * 0.07), max(1, int(w * 0.03))
    for _ in range(int(rng.integers(14, 24))):
        a, r = rng.uniform(0, 2 * math.pi), rng.uniform(hole + 0.07, 0.38)
        x, y = cx + w * r * math.cos(a), cy + h * r * math.sin(a)
        t = rng.uniform(0, math.pi)
        dx, dy = ln / 2 * math.cos(t), ln / 2 * math.sin(t)
        col = sprinkles[int(rng.integers(len(sprinkles)))]
        d.line([(x - dx, y - dy), (x + dx, y + dy)], fill=col, width=lw)
    d.ellipse([cx - w * hole, cy - h * hole, cx + w * hole, cy + h * hole], fill=(0, 0, 0))
    m.ellipse([cx - w * hole, cy - h * hole, cx + w * hole, cy + h * hole], fill=0)


def _hazard_bolt(
    d: ImageDraw.ImageDraw, m: ImageDraw.ImageDraw, w: int, h: int, rng: np.random.Generator
) -> None:
    """novel-5, hazard bolt: lightning-bolt outline with diagonal yellow/black hazard stripes."""
    a = _pick(rng, [(250, 210, 20), (250, 140, 20)], 12)
    b = _pick(rng, [(20, 20, 20)], 10)
    d.rectangle([0, 0, w, h], fill=b)
    period = max(4.0, w * rng.uniform(0.24, 0.32))
    x = -float(h)
    while x < w + h:
        d.polygon([(x, h), (x + period / 2, h), (x + period / 2 + h, 0), (x + h, 0)], fill=a)
        x += period
    pts = [
        (w * 0.55, 0),
        (w * 0.05, h * 0.58),
        (w * 0.45, h * 0.55),
        (w * 0.25, h),
        (w * 0.95, h * 0.38),
        (w * 0.55, h * 0.42),
        (w * 0.85, 0),
    ]
    m.polygon(pts, fill=255)


NOVEL: list[str] = ["novel-1", "novel-2", "novel-3", "novel-4", "novel-5"]
_NOVEL_PAINTERS: dict[str, tuple[Painter, tuple[float, float], float]] = {
    "novel-1": (_target, (1.0, 1.0), 0),
    "novel-2": (_zigzag, (1.5, 2.0), 10),
    "novel-3": (_hatched_diamond, (0.7, 0.85), 10),
    "novel-4": (_donut, (1.0, 1.0), 0),
    "novel-5": (_hazard_bolt, (0.6, 0.75), 10),
}
assert list(_NOVEL_PAINTERS) == NOVEL
# Probability that a scene with `novel=K` holds novel kind j (each kind independently).
NOVEL_P = 0.15


def class_name(class_id: int) -> str:
    """Name of a class id: the 24 world classes, then the novel kinds (ids 24, 25, ...)."""
    if class_id < len(CLASSES):
        return CLASSES[class_id]
    return NOVEL[class_id - len(CLASSES)]


def _spec(class_id: int) -> tuple[Painter, tuple[float, float], float]:
    """(painter, aspect range, max rotation) of a world class or a novel kind."""
    if class_id < len(CLASSES):
        return _PAINTERS[CLASSES[class_id]]
    return _NOVEL_PAINTERS[NOVEL[class_id - len(CLASSES)]]


_FILL: dict[int, float] = {}


def render_object(
    class_id: int, rng: np.random.Generator, w: int, h: int
) -> tuple[Image.Image, Image.Image]:
    """Paint one object of the class into a (w, h) RGB tile and its 'L' silhouette mask."""
    painter, _, rot = _spec(class_id)
    rgb = Image.new("RGB", (w, h), (0, 0, 0))
    mask = Image.new("L", (w, h), 0)
    painter(ImageDraw.Draw(rgb), ImageDraw.Draw(mask), w, h, rng)
    if rng.random() < 0.5:
        rgb = rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        mask = mask.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rot > 0:
        ang = float(rng.uniform(-rot, rot))
        if abs(ang) > 3:
            rgb = rgb.rotate(ang, resample=Image.Resampling.BILINEAR, expand=True)
            mask = mask.rotate(ang, resample=Image.Resampling.BILINEAR, expand=True)
    return rgb, mask


def _fill_ratio(class_id: int) -> float:
    """Mean fraction of its bounding box that a class's silhouette covers (cached)."""
    if class_id not in _FILL:
        rng = np.random.default_rng(1234 + class_id)
        _, (a0, a1), _ = _spec(class_id)
        fr = []
        for _ in range(4):
            a = float(rng.uniform(a0, a1))
            w, h = int(64 * math.sqrt(a)), int(64 / math.sqrt(a))
            _, mask = render_object(class_id, rng, w, h)
            fr.append((np.asarray(mask) > 127).sum() / (w * h))
        _FILL[class_id] = float(np.mean(fr))
    return _FILL[class_id]


# ----------------------------------------------------------------------------- background


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient + blotchy low-frequency colour + pixel noise + non-class distractors."""
    c0 = rng.integers(0, 256, size=3).astype(np.float32)
    c1 = np.clip(c0 + rng.normal(0, 70, size=3), 0, 255).astype(np.float32)
    t = np.linspace(0.0, 1.0, size, dtype=np.float32)
    if rng.random() < 0.5:
        g = t[:, None, None] * np.ones((1, size, 1), np.float32)
    else:
        g = t[None, :, None] * np.ones((size, 1, 1), np.float32)
    img = c0 * (1 - g) + c1 * g
    if rng.random() < 0.6:  # low-frequency blotches
        k = int(rng.integers(3, 7))
        low = rng.normal(0, rng.uniform(10, 35), size=(k, k, 3)).astype(np.float32)
        low_img = Image.fromarray(np.clip(low + 128, 0, 255).astype(np.uint8))
        low = np.asarray(low_img.resize((size, size), Image.Resampling.BILINEAR), np.float32) - 128
        img = img + low
    img = img + rng.normal(0, rng.uniform(2, 14), size=(size, size, 1)).astype(np.float32)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    _distractors(ImageDraw.Draw(im), rng, size, int(rng.integers(1, 8)))
    return im


def _distractors(d: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, n: int) -> None:
    """Random plain blobs, polygons, lines and arcs that belong to no class."""
    for _ in range(n):
        col = _rand_col(rng)
        kind = int(rng.integers(4))
        x, y = rng.uniform(0, size, size=2)
        s = size * rng.uniform(0.05, 0.35)
        if kind == 0:
            d.ellipse(
                [x - s, y - s * rng.uniform(0.3, 1), x + s, y + s * rng.uniform(0.3, 1)], fill=col
            )
        elif kind == 1:
            k = int(rng.integers(3, 7))
            angs = np.sort(rng.uniform(0, 2 * math.pi, size=k))
            rr = s * rng.uniform(0.4, 1.0, size=k)
            pts = [
                (x + r * math.cos(a), y + r * math.sin(a)) for a, r in zip(angs, rr, strict=True)
            ]
            d.polygon(pts, fill=col)
        elif kind == 2:
            x2, y2 = rng.uniform(0, size, size=2)
            d.line([(x, y), (x2, y2)], fill=col, width=int(rng.integers(1, max(2, size // 40))))
        else:
            a0 = float(rng.uniform(0, 360))
            d.arc(
                [x - s, y - s, x + s, y + s],
                a0,
                a0 + float(rng.uniform(60, 240)),
                fill=col,
                width=int(rng.integers(1, max(2, size // 50))),
            )


# ----------------------------------------------------------------------------- scenes


def _sample_classes(
    rng: np.random.Generator,
    n: int,
    allowed: Sequence[int] | None = None,
    weights: np.ndarray | None = None,
) -> list[int]:
    """n distinct classes; with p=0.7 most come from one co-occurrence group.

    With `allowed`, only those classes are drawn (the groups cut down to them), so a library can
    hold a subset of the world; without it the draws are exactly the full world's.

    With `weights` (one per world class, see `long_tail_weights`) every pick is weighted: the
    group is chosen in proportion to its members' total weight and each class within the group
    or the pool in proportion to its own, so a class's share of first picks is its weight (times
    the number of groups it is in). Equal weights draw exactly as without them (same RNG calls).
    """
    if allowed is None:
        pool, groups = list(range(len(CLASSES))), _GROUP_IDS
    else:
        pool = sorted(set(allowed))
        groups = [g for g in ([c for c in grp if c in pool] for grp in _GROUP_IDS) if g]
    if weights is not None:
        w = np.asarray(weights, dtype=np.float64)
        pool = [c for c in pool if w[c] > 0]
        groups = [g for g in ([c for c in grp if w[c] > 0] for grp in groups) if g]
        if len({float(w[c]) for c in pool}) > 1:
            return _sample_weighted(rng, min(n, len(pool)), pool, groups, w)
    if allowed is not None or weights is not None:
        n = min(n, len(pool))
    group = groups[int(rng.integers(len(groups)))] if groups and rng.random() < 0.7 else None
    out: list[int] = []
    while len(out) < n:
        if group is not None and rng.random() < 0.8:
            c = group[int(rng.integers(len(group)))]
        else:
            c = pool[int(rng.integers(len(pool)))]
        if c not in out:
            out.append(c)
    return out


def _weighted_pick(rng: np.random.Generator, ids: Sequence[int], w: np.ndarray) -> int:
    """One of ids, drawn in proportion to w[id]."""
    p = np.cumsum(w[list(ids)])
    return ids[min(int(np.searchsorted(p, rng.random() * p[-1], side="right")), len(ids) - 1)]


def _sample_weighted(
    rng: np.random.Generator, n: int, pool: list[int], groups: list[list[int]], w: np.ndarray
) -> list[int]:
    """`_sample_classes` with weighted picks (the same group / pool structure, see there)."""
    group = None
    if groups and rng.random() < 0.7:
        gw = np.array([w[g].sum() for g in groups])
        group = groups[_weighted_pick(rng, range(len(groups)), gw)]
    out: list[int] = []
    while len(out) < n:
        if group is not None and rng.random() < 0.8:
            c = _weighted_pick(rng, group, w)
        else:
            c = _weighted_pick(rng, pool, w)
        if c not in out:
            out.append(c)
    return out


def long_tail_order(seed: int, allowed: Sequence[int] | None = None) -> list[int]:
    """The head-to-tail order of the world classes (or of `allowed`) for a seed.

    A permutation drawn from its own generator (not the scenes'), so head and tail classes
    differ between seeds and the order does not depend on the number of images.
    """
    ids = list(range(len(CLASSES))) if allowed is None else sorted(set(allowed))
    rng = np.random.default_rng([seed, 0x4C4F4E47, 0x5441494C])  # "LONG", "TAIL"
    return [ids[int(i)] for i in rng.permutation(len(ids))]


def long_tail_weights(order: Sequence[int], ratio: float) -> np.ndarray:
    """Draw weight per world class: RATIO**(-rank/(C-1)) along `order`, 0 for classes not in it.

    The head class weighs 1 and the tail class 1/RATIO (as in VOC-LT / COCO-LT).
    """
    if ratio < 1:
        raise ValueError(f"the long-tail ratio must be at least 1, not {ratio}")
    w = np.zeros(len(CLASSES))
    span = max(1, len(order) - 1)
    for rank, c in enumerate(order):
        w[c] = float(ratio) ** (-rank / span)
    return w


def class_subset(classes: Sequence[str] = (), groups: Sequence[str] = ()) -> list[int] | None:
    """Class ids named directly or through co-occurrence groups; None when nothing is named."""
    if not classes and not groups:
        return None
    ids: set[int] = set()
    for g in groups:
        if g not in GROUPS:
            raise ValueError(f"unknown group {g!r}; known: {', '.join(GROUPS)}")
        ids.update(CLASSES.index(n) for n in GROUPS[g])
    for name in classes:
        if name not in CLASSES:
            raise ValueError(f"unknown class {name!r}")
        ids.add(CLASSES.index(name))
    return sorted(ids)


def render_scene(
    rng: np.random.Generator,
    size: int = 224,
    classes_allowed: Sequence[int] | None = None,
    *,
    weights: np.ndarray | None = None,
    novel: int = 0,
) -> Scene:
    """Render a scene of 1–5 objects (≈2% to >40% of the image) over a cluttered background.

    `classes_allowed` restricts which classes may appear (labels keep the full world's ids).
    `weights` (one per world class, `long_tail_weights`) weights the class draws. With `novel=K`
    the scene also holds novel kind j < K (class id len(CLASSES) + j) with probability NOVEL_P
    each, as extra objects. The defaults draw exactly as before these options existed.
    """
    if not 0 <= novel <= len(NOVEL):
        raise ValueError(f"novel must be 0..{len(NOVEL)}, not {novel}")
    n = int(rng.choice(5, p=[0.22, 0.3, 0.24, 0.14, 0.10])) + 1
    classes = _sample_classes(rng, n, classes_allowed, weights)
    for j in range(novel):
        if rng.random() < NOVEL_P:
            classes.append(len(CLASSES) + j)
    n = len(classes)  # a subset smaller than n caps the count; novel kinds add to it
    # Target silhouette areas as image fractions: one dominant object, the rest smaller.
    areas = [float(np.exp(rng.uniform(np.log(0.06), np.log(0.5))))]
    areas += [float(np.exp(rng.uniform(np.log(0.018), np.log(0.22)))) for _ in range(n - 1)]
    order = np.argsort(areas)[::-1]  # big first so small objects stay visible on top
    im = _background(rng, size)
    owner = np.full((size, size), -1, np.int16)
    drawn: list[tuple[int, int]] = []  # (class_id, own pixel count)
    for idx in order:
        cid = classes[idx]
        _, (a0, a1), _ = _spec(cid)
        asp = float(rng.uniform(a0, a1))
        box = areas[idx] * size * size / _fill_ratio(cid)
        w = int(min(size * 0.98, math.sqrt(box * asp)))
        h = int(min(size * 0.98, math.sqrt(box / asp)))
        w, h = max(w, 10), max(h, 10)
        rgb, mask = render_object(cid, rng, w, h)
        tw, th = rgb.size
        mk = np.asarray(mask) > 127
        # Choose among a few positions the one least covering what is already drawn.
        best, best_ov = (0, 0), None
        for _ in range(4):
            x = int(rng.integers(-tw // 8, max(size - tw + tw // 8, -tw // 8 + 1)))
            y = int(rng.integers(-th // 8, max(size - th + th // 8, -th // 8 + 1)))
            sub = _crop(owner, x, y, tw, th)
            ov = int((sub[0] >= 0).sum())
            if best_ov is None or ov < best_ov:
                best, best_ov = (x, y), ov
        x, y = best
        im.paste(rgb, (x, y), mask.point(lambda v: 255 if v > 127 else 0))
        view, (ys, xs) = _crop(owner, x, y, tw, th)
        view[mk[ys, xs]] = len(drawn)
        drawn.append((cid, int(mk[ys, xs].sum())))
    if rng.random() < 0.3:  # clutter on top: thin lines and arcs over the objects
        _distractors(ImageDraw.Draw(im), rng, size, int(rng.integers(1, 3)))
    counts = np.bincount(owner[owner >= 0].ravel(), minlength=len(drawn))
    objects: list[tuple[int, float]] = []
    for k, (cid, own) in enumerate(drawn):
        vis = int(counts[k])
        # An object mostly hidden by others is not a label (too little of it shows).
        if own > 0 and vis >= 0.4 * own and vis >= 0.004 * size * size:
            objects.append((cid, vis / (size * size)))
    objects.sort(key=lambda o: -o[1])
    return Scene(image=im, labels=sorted({c for c, _ in objects}), objects=objects)


def _crop(a: np.ndarray, x: int, y: int, w: int, h: int) -> tuple[np.ndarray, tuple[slice, slice]]:
    """View of a[y:y+h, x:x+w] clipped to the array, and the matching slices into the tile."""
    H, W = a.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    x1, y1 = max(x1, x0), max(y1, y0)
    return a[y0:y1, x0:x1], (slice(y0 - y, y1 - y), slice(x0 - x, x1 - x))


# ----------------------------------------------------------------------------- captions


def _a(name: str) -> str:
    """Name with its indefinite article."""
    return ("an " if name[0] in "aeiou" else "a ") + name


def _join(names: list[str]) -> str:
    """'a X', 'a X and a Y', 'a X, a Y and a Z'."""
    items = [_a(n) for n in names]
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


_TEMPLATES = [
    "a photo of {}.",
    "{}",
    "{} on a messy background",
    "a picture of {}.",
    "an image with {}.",
    "{}, close up",
    "my photo of {}",
    "look at {}!",
]


def caption_with_ids(scene: Scene, rng: np.random.Generator) -> tuple[str, list[int]]:
    """Alt-text-like caption and the class ids it mentions (dominant objects first)."""
    objs = [c for c, _ in scene.objects]
    if not objs:
        return str(rng.choice(["a photo.", "an empty scene", "background texture"])), []
    r = rng.random()
    if r < 0.5:  # the one or two dominant objects, like typical alt-text
        k = 1
        second_big = len(objs) > 1 and scene.objects[1][1] > 0.4 * scene.objects[0][1]
        if len(objs) > 1 and (second_big or rng.random() < 0.3):
            k = 2
        names = objs[:k]
    elif r < 0.8:  # every object
        names = objs
    else:  # the dominant object and one other, template style
        names = objs[:1] + ([objs[int(rng.integers(1, len(objs)))]] if len(objs) > 1 else [])
    text = _join([class_name(c) for c in names])
    tpl = _TEMPLATES[0] if r >= 0.8 else _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
    return tpl.format(text), list(names)


def caption(scene: Scene, rng: np.random.Generator) -> str:
    """Image-level alt-text-like caption naming dominant (or all) objects verbatim."""
    return caption_with_ids(scene, rng)[0]
