"""Procedural "shapes" dataset with exact ground-truth object masks.

Each image is 128x128 RGB: one or more flat-coloured filled shapes on a
textured, cluttered background. Every image is a pure function of its integer
seed, so datasets are described by seed ranges instead of files on disk.

Seed split: training uses seeds ``TRAIN_SEED_OFFSET + i`` with
``i < HELDOUT_SEED_OFFSET``; held-out (evaluation) images use seeds from
``HELDOUT_SEED_OFFSET`` (10_000_000) on. Training code must never go there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

LABELS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "heart")

IMAGE_SIZE = 128
MIN_SHAPE_SIZE = 24
MAX_SHAPE_SIZE = 56

TRAIN_SEED_OFFSET = 0
HELDOUT_SEED_OFFSET = 10_000_000

# Maximum fraction of the smaller shape that another shape may cover before
# a placement is retried; keeps both objects of a pair clearly visible.
_MAX_OVERLAP_FRACTION = 0.02
_PLACEMENT_TRIES = 60
# Minimum RGB distance between a shape colour and the background under it,
# so that the object is visible against any texture.
_MIN_COLOUR_CONTRAST = 110.0


@dataclass(frozen=True)
class ShapeObject:
    """One drawn shape: its class and its visible pixel mask."""

    label: str
    class_index: int
    mask: np.ndarray  # HxW bool, visible pixels only (occlusion removed)
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), inclusive-exclusive


@dataclass(frozen=True)
class Sample:
    """A generated image, its primary label and all objects in it."""

    image: np.ndarray  # HxWx3 uint8
    label: int
    objects: tuple[ShapeObject, ...]

    @property
    def mask(self) -> np.ndarray:
        """Mask of the primary object (the one whose class is ``label``)."""
        for obj in self.objects:
            if obj.class_index == self.label:
                return obj.mask
        raise ValueError("sample has no object of its own label")


def train_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds for ``n`` training images, starting at index ``start``."""
    if start < 0 or start + n > HELDOUT_SEED_OFFSET - TRAIN_SEED_OFFSET:
        raise ValueError("training seeds must stay below the held-out range")
    return list(range(TRAIN_SEED_OFFSET + start, TRAIN_SEED_OFFSET + start + n))


def heldout_seeds(n: int, start: int = 0) -> list[int]:
    """Seeds for ``n`` held-out images, starting at index ``start``."""
    if start < 0:
        raise ValueError("start must be non-negative")
    return list(range(HELDOUT_SEED_OFFSET + start, HELDOUT_SEED_OFFSET + start + n))


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    rotated: np.ndarray = points @ np.array([[c, s], [-s, c]])
    return rotated


def _shape_outline(label: str, radius: float, angle: float) -> np.ndarray | None:
    """Polygon vertices (Kx2, centred at 0) or None for round shapes."""
    if label == "square":
        # Corners on the circumscribed circle; slightly larger so that its
        # area is comparable to the other classes.
        r = radius * 1.05
        t = np.array([0.25, 0.75, 1.25, 1.75]) * math.pi
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * r
    elif label == "triangle":
        t = np.array([0.5, 0.5 + 2 / 3, 0.5 + 4 / 3]) * math.pi
        pts = np.stack([np.cos(t), np.sin(t)], axis=1) * radius * 1.1
    elif label == "star":
        # A fairly fat star (inner/outer radius 0.5): thin spikes would leave
        # most of its convex hull as background.
        spokes = np.arange(10) * (math.pi / 5) + math.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, radius * 1.1, radius * 0.55)
        pts = np.stack([np.cos(spokes) * radii, np.sin(spokes) * radii], axis=1)
    elif label == "heart":
        # Classic parametric heart, recentred on its bounding box and scaled
        # to the requested radius.
        t = np.linspace(0, 2 * math.pi, 48, endpoint=False)
        x = 16 * np.sin(t) ** 3
        y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        pts = np.stack([x, y], axis=1)
        pts -= (pts.max(axis=0) + pts.min(axis=0)) / 2
        pts *= radius * 1.05 / np.linalg.norm(pts, axis=1).max()
    elif label == "cross":
        a, w = radius, radius * 0.36  # arm reach and half arm width
        pts = np.array(
            [
                (-w, -a),
                (w, -a),
                (w, -w),
                (a, -w),
                (a, w),
                (w, w),
                (w, a),
                (-w, a),
                (-w, w),
                (-a, w),
                (-a, -w),
                (-w, -w),
            ],
            dtype=np.float64,
        )
    else:
        return None
    return _rotate(pts, angle)


def _draw_shape_mask(label: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Rasterise one shape into a fresh HxW bool mask."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    pts = _shape_outline(label, radius, angle)
    if pts is None:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=255)
    else:
        draw.polygon([(float(x + cx), float(y + cy)) for x, y in pts], fill=255)
    return np.asarray(canvas) > 0


def _bounding_radius(label: str, radius: float) -> float:
    """Radius of a circle centred on the shape that contains all of it."""
    pts = _shape_outline(label, radius, 0.0)
    return radius if pts is None else float(np.linalg.norm(pts, axis=1).max())


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Textured background (gradient + smooth noise) as HxWx3 uint8."""
    c0 = rng.uniform(0, 255, 3)
    c1 = rng.uniform(0, 255, 3)
    theta = rng.uniform(0, 2 * math.pi)
    cells = int(rng.integers(3, 9))
    grid = rng.random((3, cells, cells), dtype=np.float32)
    amp = rng.uniform(40, 140)

    xs, ys = _unit_grid(size)
    c, s = math.cos(theta), math.sin(theta)
    # Projection onto the gradient direction, rescaled to [0, 1].
    lo = min(0.0, c) + min(0.0, s)
    hi = max(0.0, c) + max(0.0, s)
    ramp = (xs * np.float32(c) + ys * np.float32(s) - np.float32(lo)) / np.float32(hi - lo)
    # One HxW float plane at a time: whole HxWx3 float buffers exceed
    # malloc's mmap threshold and page-faulting them in costs more than
    # the arithmetic itself.
    planes = []
    for k in range(3):
        noise = np.asarray(Image.fromarray(grid[k]).resize((size, size), Image.Resampling.BILINEAR))
        plane = ramp * np.float32(c1[k] - c0[k]) + np.float32(c0[k] - 0.5 * amp)
        plane += noise * np.float32(amp)
        np.clip(plane, 0, 255, out=plane)
        planes.append(plane.astype(np.uint8))
    return np.dstack(planes)


@lru_cache(maxsize=4)
def _unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel x and y coordinates scaled to [0, 1] (cached; read-only)."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / np.float32(size - 1)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def _draw_clutter(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Draw thin lines and small irregular blobs (no shape class) onto ``img``."""
    size = img.shape[0]
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    # All random parameters are drawn in a few vectorised calls: per-item
    # Generator calls dominated the cost of this function.
    n_lines = int(rng.integers(2, 9))
    ends = rng.uniform(-10, size + 10, (n_lines, 4)).tolist()
    line_colours = rng.integers(0, 256, (n_lines, 3)).tolist()
    widths = rng.integers(1, 3, n_lines).tolist()
    for (x0, y0, x1, y1), colour, width in zip(ends, line_colours, widths, strict=True):
        draw.line((x0, y0, x1, y1), fill=tuple(colour), width=width)

    # Irregular polygons (4-7 vertices, radius <= 5 px), far below the
    # minimum shape size so they cannot pass for any shape class.
    n_blobs = int(rng.integers(3, 13))
    centres = rng.uniform(0, size, (n_blobs, 1, 2))
    angles = np.sort(rng.uniform(0, 2 * math.pi, (n_blobs, 7)), axis=1)
    radii = rng.uniform(1.5, 5.0, (n_blobs, 7, 1))
    verts = centres + radii * np.stack([np.cos(angles), np.sin(angles)], axis=-1)
    n_verts = rng.integers(4, 8, n_blobs).tolist()
    blob_colours = rng.integers(0, 256, (n_blobs, 3)).tolist()
    for poly, k, colour in zip(verts.tolist(), n_verts, blob_colours, strict=True):
        # Dropping trailing vertices of a sorted fan keeps the polygon simple.
        draw.polygon([tuple(v) for v in poly[:k]], fill=tuple(colour))
    return np.array(pil)


def _pick_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour that stands out from the mean background ``under``."""
    best, best_d = None, -1.0
    for _ in range(30):
        colour = rng.integers(0, 256, 3).astype(np.float32)
        d = float(np.linalg.norm(colour - under))
        if d >= _MIN_COLOUR_CONTRAST:
            return colour
        if d > best_d:
            best, best_d = colour, d
    assert best is not None
    return best


def _place(rng: np.random.Generator, label: str, size: int, occupied: np.ndarray | None) -> np.ndarray:
    """Sample a pose for ``label`` and return its mask, avoiding ``occupied``."""
    best_mask, best_overlap = None, math.inf
    for _ in range(_PLACEMENT_TRIES):
        diameter = rng.uniform(MIN_SHAPE_SIZE, MAX_SHAPE_SIZE)
        radius = diameter / 2
        reach = _bounding_radius(label, radius)
        cx = rng.uniform(reach + 1, size - 2 - reach)
        cy = rng.uniform(reach + 1, size - 2 - reach)
        angle = rng.uniform(0, 2 * math.pi)
        mask = _draw_shape_mask(label, cx, cy, radius, angle, size)
        if occupied is None:
            return mask
        inter = int(np.count_nonzero(mask & occupied))
        overlap = inter / max(1, min(int(mask.sum()), int(occupied.sum())))
        if overlap <= _MAX_OVERLAP_FRACTION:
            return mask
        if overlap < best_overlap:
            best_mask, best_overlap = mask, overlap
    assert best_mask is not None
    return best_mask


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(xs) == 0:
        return (0, 0, 0, 0)
    return (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)


def generate(seed: int, *, n_shapes: int = 1, size: int = IMAGE_SIZE) -> Sample:
    """Generate one sample; fully determined by ``seed`` and the arguments."""
    if not 1 <= n_shapes <= len(LABELS):
        raise ValueError(f"n_shapes must be in [1, {len(LABELS)}]")
    rng = np.random.default_rng(seed)
    classes = rng.choice(len(LABELS), size=n_shapes, replace=False)
    img = _draw_clutter(rng, _background(rng, size))

    masks: list[np.ndarray] = []
    occupied: np.ndarray | None = None
    for cls in classes:
        mask = _place(rng, LABELS[int(cls)], size, occupied)
        colour = _pick_colour(rng, img[mask].mean(axis=0))
        img[mask] = colour.astype(np.uint8)
        masks.append(mask)
        occupied = mask if occupied is None else (occupied | mask)

    # Sensor-like grain over everything so flat fills are not a trivial cue.
    # (Uniform grain from raw bytes: Gaussian sampling here would double the
    # generation time for no visible benefit.)
    amp = int(rng.integers(3, 13))
    grain = np.frombuffer(rng.bytes(img.size), dtype=np.uint8).reshape(img.shape)
    noisy = img.astype(np.int16) + (grain.astype(np.int16) * (2 * amp + 1) >> 8) - amp
    image = np.clip(noisy, 0, 255).astype(np.uint8)

    objects = []
    for i, (cls, mask) in enumerate(zip(classes, masks, strict=True)):
        # Shapes drawn later cover earlier ones; keep only visible pixels.
        visible = mask.copy()
        for later in masks[i + 1 :]:
            visible &= ~later
        visible.setflags(write=False)
        objects.append(
            ShapeObject(
                label=LABELS[int(cls)],
                class_index=int(cls),
                mask=visible,
                bbox=_bbox(visible),
            )
        )
    return Sample(image=image, label=int(classes[0]), objects=tuple(objects))


def generate_batch(seeds: Sequence[int], *, n_shapes: int = 1, size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Generate images (N,H,W,3 uint8), labels (N,) int64, primary masks (N,H,W) bool."""
    n = len(seeds)
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    labels = np.empty((n,), dtype=np.int64)
    masks = np.empty((n, size, size), dtype=bool)
    for i, seed in enumerate(seeds):
        sample = generate(int(seed), n_shapes=n_shapes, size=size)
        images[i] = sample.image
        labels[i] = sample.label
        masks[i] = sample.mask
    return images, labels, masks


@dataclass(frozen=True)
class GridSample:
    """A `rows` x `cols` grid of single-shape images of distinct classes (the DiFull setting, METRICS.md §5)."""

    image: np.ndarray  # (rows*size) x (cols*size) x 3 uint8
    classes: tuple[int, ...]  # each cell's shape class (index into LABELS), row-major
    object_masks: np.ndarray  # cells x H x W bool: each cell's object, in grid coordinates
    cell_masks: np.ndarray  # cells x H x W bool: each cell's square

    def label(self, cell: int) -> int:
        """Cell `cell`'s class in a grid model's cell-major label space (`top_left/circle` is 0)."""
        return cell * len(LABELS) + self.classes[cell]


def generate_grid(seed: int, *, rows: int = 2, cols: int = 2, size: int = IMAGE_SIZE) -> GridSample:
    """A grid of `rows * cols` generated images with distinct classes; fully determined by `seed`.

    Cell images are drawn from the seeds `seed * 64 + k` (k = 0, 1, ...), keeping the first image of each
    class not yet used, so held-out grid seeds (>= HELDOUT_SEED_OFFSET) only use held-out images.
    """
    cells = rows * cols
    if not 1 <= cells <= len(LABELS):
        raise ValueError(f"a grid of distinct classes has 1..{len(LABELS)} cells, got {rows}x{cols}")
    image = np.empty((rows * size, cols * size, 3), dtype=np.uint8)
    object_masks = np.zeros((cells, rows * size, cols * size), dtype=bool)
    cell_masks = np.zeros_like(object_masks)
    classes: list[int] = []
    candidate = seed * 64
    while len(classes) < cells:
        sample = generate(candidate)
        candidate += 1
        if sample.label in classes:
            continue
        cell = len(classes)
        top, left = (cell // cols) * size, (cell % cols) * size
        image[top : top + size, left : left + size] = sample.image
        object_masks[cell, top : top + size, left : left + size] = sample.mask
        cell_masks[cell, top : top + size, left : left + size] = True
        classes.append(sample.label)
    return GridSample(image=image, classes=tuple(classes), object_masks=object_masks, cell_masks=cell_masks)
