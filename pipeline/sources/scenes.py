"""The embedded dataset: procedurally generated scenes in the HQSeg folder layout.

It is the offline default of the pipeline, so it has to be hard where Stable-SAM's method
matters: a loose box or a single click must be genuinely ambiguous. Every scene has

- a textured background (smooth gradient + smoothed noise, stripes or two-tone camouflage
  patches), and objects whose colour is sometimes taken from the background under them;
- several objects in z-order that **touch** (placed against a neighbour), **overlap** (centre
  inside a neighbour's box) and **nest** (drawn inside a neighbour's filled area or its hole);
- **thin structures** (smooth curves and branching trees, 1-3 px wide) and **holes** (rings,
  frames), plus objects **cut by the image border**.

Every scene draws from its own ``np.random.Generator`` seeded by ``(seed, split, index)``, so a
scene does not depend on how many came before it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = ["CATEGORIES", "JPEG_QUALITY", "Scene", "generate_scene", "scene_generator"]


JPEG_QUALITY = 90


# One COCO category per shape family; ids are 1-based positions in this tuple.
CATEGORIES = ("blob", "polygon", "ring", "frame", "curve", "branch")


_FILLED = ("blob", "polygon")


_HOLED = ("ring", "frame")


_THIN = ("curve", "branch")


# How a new object is placed relative to the ones already drawn (probabilities).
_RELATIONS = {"free": 0.15, "border": 0.15, "overlap": 0.25, "touch": 0.25, "nest": 0.2}


_MIN_TARGET_FRACTION = 0.01  # target visible area >= 1 % of the image (and >= 40 px)


_MIN_TARGET_PIXELS = 40


_MAX_SCENE_TRIES = 20


@dataclass(frozen=True)
class _Shape:
    """A shape relative to its centre: filled polygons, holes cut out of them, and thick lines.

    Coordinates are float arrays N x 2 of (x, y) offsets in pixels.
    """

    category: str
    fills: tuple[np.ndarray, ...] = ()
    holes: tuple[np.ndarray, ...] = ()
    lines: tuple[tuple[np.ndarray, int], ...] = ()  # (points, width in px)

    def render(self, size: int, centre: np.ndarray) -> np.ndarray:
        """The shape drawn at ``centre`` on a size x size canvas, as a bool mask."""
        canvas = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(canvas)
        for poly in self.fills:
            draw.polygon([tuple(p) for p in (poly + centre).tolist()], fill=255)
        for poly in self.holes:
            draw.polygon([tuple(p) for p in (poly + centre).tolist()], fill=0)
        for points, width in self.lines:
            draw.line([tuple(p) for p in (points + centre).tolist()], fill=255, width=width, joint="curve")
        return np.asarray(canvas) > 0


@dataclass
class Scene:
    """One generated image with its objects.

    Attributes:
      image: uint8 H x W x 3 RGB (before JPEG encoding).
      instances: uint8 H x W, visible instance ids 1..K in z-order, 0 = background.
      categories: length K, the category name of instance k + 1.
      target: the instance id (1..K) of the gt/ object.
      relations: length K, how each visible object was placed ("free", "nest", ...).
    """

    image: np.ndarray
    instances: np.ndarray
    categories: list[str]
    target: int
    relations: list[str]


def scene_generator(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of ``split``: independent of every other scene."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(split.encode()), index]))


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    return xs, ys


def _smooth_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise, normalised to zero mean and unit std: H x W float32."""
    noise = ndimage.gaussian_filter(rng.standard_normal((size, size)).astype(np.float32), sigma, mode="wrap")
    return (noise - noise.mean()) / (noise.std() + 1e-6)


def _stripes(rng: np.random.Generator, size: int) -> np.ndarray:
    """A sinusoidal grating with random period and orientation, in [-1, 1]: H x W float32."""
    xs, ys = _grid(size)
    theta = rng.uniform(0, np.pi)
    period = rng.uniform(3.0, 16.0)
    phase = rng.uniform(0, 2 * np.pi)
    wave = np.sin(2 * np.pi * (xs * np.cos(theta) + ys * np.sin(theta)) / period + phase)
    # Sharpen some gratings into near-square stripes (strong, edge-like texture).
    return np.tanh(wave * rng.uniform(1.0, 4.0)).astype(np.float32)


def _texture(rng: np.random.Generator, size: int, strength: float) -> np.ndarray:
    """A colour texture H x W x 3 (float, zero-centred) mixing noise, stripes or camouflage."""
    out = np.zeros((size, size, 3), np.float32)
    kinds = rng.choice(["noise", "stripes", "camouflage"], size=rng.integers(1, 3), replace=False)
    for kind in kinds:
        tint = rng.uniform(0.3, 1.0, size=3).astype(np.float32)
        if kind == "noise":
            pattern = _smooth_noise(rng, size, rng.uniform(0.8, 6.0))
        elif kind == "stripes":
            pattern = _stripes(rng, size)
        else:  # two-tone patches with hard edges: object-like contours in the background
            pattern = np.where(
                _smooth_noise(rng, size, rng.uniform(3.0, 8.0)) > rng.uniform(-0.5, 0.5), 1.0, -1.0
            )
        out += strength * rng.uniform(0.5, 1.0) * pattern[..., None] * tint
    return out


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Gradient between two colours plus a texture: H x W x 3 float32 in [0, 255]."""
    xs, ys = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    t = (xs * np.cos(theta) + ys * np.sin(theta)) / size
    t = (t - t.min()) / (t.max() - t.min() + 1e-6)
    c0, c1 = rng.uniform(20, 235, size=(2, 3)).astype(np.float32)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    return np.clip(base + _texture(rng, size, rng.uniform(15, 45)), 0, 255)


def _rotate(points: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return points @ np.array([[c, s], [-s, c]], dtype=np.float64)


def _radial_outline(rng: np.random.Generator, radius: float, wobble: float, n: int = 72) -> np.ndarray:
    """A closed outline r(θ) = radius · (1 + Σ_k a_k cos(kθ + φ_k)) with random aspect: N x 2."""
    theta = np.linspace(0, 2 * np.pi, n, endpoint=False)
    k = np.arange(2, 6)[:, None]
    amps = rng.uniform(0, wobble, size=(4, 1)) / k
    phases = rng.uniform(0, 2 * np.pi, size=(4, 1))
    r = radius * (1 + (amps * np.cos(k * theta + phases)).sum(0))
    pts = np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1)
    pts[:, 1] *= rng.uniform(0.55, 1.0)  # aspect ratio, then a random rotation
    return _rotate(pts, rng.uniform(0, np.pi))


def _smooth_path(rng: np.random.Generator, length: float, steps: int = 24) -> np.ndarray:
    """A smooth random curve of about ``length`` px, centred on the origin: steps x 2."""
    turn = ndimage.gaussian_filter1d(rng.normal(0, 0.45, steps), 2.0)
    heading = rng.uniform(0, 2 * np.pi) + np.cumsum(turn)
    step = length / steps
    pts = np.cumsum(np.stack([np.cos(heading), np.sin(heading)], axis=1) * step, axis=0)
    return pts - pts.mean(0)


def _make_shape(rng: np.random.Generator, category: str, radius: float) -> _Shape:
    """A random shape of ``category`` whose extent is about ``radius`` px from its centre."""
    radius = max(radius, 3.0)
    if category == "blob":
        return _Shape(category, fills=(_radial_outline(rng, radius, 0.9),))
    if category == "polygon":
        n = int(rng.integers(3, 9))
        theta = np.sort(rng.uniform(0, 2 * np.pi, n))
        r = radius * rng.uniform(0.45, 1.0, n)  # uneven radii give concave, star-like polygons
        return _Shape(category, fills=(np.stack([r * np.cos(theta), r * np.sin(theta)], axis=1),))
    if category == "ring":
        outer = _radial_outline(rng, radius, 0.3)
        inner = outer * rng.uniform(0.45, 0.75) + rng.uniform(-0.1, 0.1, 2) * radius
        return _Shape(category, fills=(outer,), holes=(inner,))
    if category == "frame":
        half = np.array([radius, radius * rng.uniform(0.5, 1.0)])
        border = max(2.0, rng.uniform(0.15, 0.35) * half.min())
        box = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64)
        angle = rng.uniform(0, np.pi)
        return _Shape(
            category, fills=(_rotate(box * half, angle),), holes=(_rotate(box * (half - border), angle),)
        )
    if category == "curve":
        width = int(rng.integers(1, 4))
        return _Shape(category, lines=((_smooth_path(rng, rng.uniform(2.0, 4.0) * radius), width),))
    if category == "branch":
        width = int(rng.integers(1, 4))
        stem = _smooth_path(rng, rng.uniform(2.0, 3.0) * radius)
        lines = [(stem, width)]
        for _ in range(int(rng.integers(2, 5))):
            start = stem[int(rng.integers(2, len(stem) - 2))]
            twig = _smooth_path(rng, rng.uniform(0.5, 1.2) * radius, steps=10)
            lines.append((twig - twig[0] + start, max(1, width - int(rng.integers(0, 2)))))
        return _Shape(category, lines=tuple(lines))
    raise ValueError(f"unknown shape category {category!r}; known: {CATEGORIES}")


def _bbox_centre(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.nonzero(mask)
    return np.array([xs.min(), ys.min()], float), np.array([xs.max(), ys.max()], float)


def _place(
    rng: np.random.Generator,
    relation: str,
    category: str,
    size: int,
    masks: list[np.ndarray],
) -> tuple[np.ndarray | None, _Shape | None]:
    """Pick a shape and a centre for a new object in relation to the existing ``masks``.

    Returns (mask, shape) or (None, None) when the relation cannot be satisfied (e.g. nothing
    large enough to nest in).
    """
    big = rng.uniform(0.14, 0.34) * size
    if relation == "nest":
        # Inside a neighbour's filled area (holes filled): the deepest pixels bound the radius.
        host = masks[int(rng.integers(len(masks)))]
        dist = ndimage.distance_transform_edt(ndimage.binary_fill_holes(host))
        if dist.max() < 5:
            return None, None
        ys, xs = np.nonzero(dist >= 0.6 * dist.max())
        k = int(rng.integers(len(ys)))
        centre = np.array([xs[k], ys[k]], float)
        shape = _make_shape(rng, category, dist[ys[k], xs[k]] * rng.uniform(0.4, 0.75))
        return shape.render(size, centre), shape
    shape = _make_shape(rng, category, big)
    if relation == "overlap":
        lo, hi = _bbox_centre(masks[int(rng.integers(len(masks)))])
        centre = rng.uniform(lo, hi + 1)
    elif relation == "border":
        # Centre within ±radius/2 of a random edge: the object is cut by the image border.
        centre = rng.uniform(0, size, 2)
        axis, side = int(rng.integers(2)), int(rng.integers(2))
        centre[axis] = side * size + rng.uniform(-0.5, 0.5) * big
    elif relation == "touch":
        # Walk away from a neighbour along a random direction until the shapes stop overlapping.
        host = masks[int(rng.integers(len(masks)))]
        lo, hi = _bbox_centre(host)
        start = (lo + hi) / 2
        angle = rng.uniform(0, 2 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        grown = ndimage.binary_dilation(host, iterations=2)
        was_overlapping = False
        for step in np.arange(0, 1.5 * size, 1.0):
            mask = shape.render(size, start + step * direction)
            if (mask & host).any():
                was_overlapping = True
            elif was_overlapping or (mask & grown).any():
                return mask, shape  # the first position clear of the host: they touch
        return None, None
    else:  # free: anywhere, but biased to the middle so scenes build up around it
        centre = rng.uniform(0.2, 0.8, 2) * size
    return shape.render(size, centre), shape


def _paint(rng: np.random.Generator, background: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The colour field of one object: H x W x 3 float32 (only its pixels under ``mask`` matter).

    A third of the objects take the background colour under them plus a small shift, so the
    boundary is weak and a click cannot rely on colour alone.
    """
    size = mask.shape[0]
    if rng.random() < 0.35:
        colour = background[mask].mean(0) + rng.normal(0, 18, 3)
    else:
        colour = rng.uniform(0, 255, 3)
    xs, ys = _grid(size)
    theta = rng.uniform(0, 2 * np.pi)
    shading = rng.uniform(-0.25, 0.25) * (xs * np.cos(theta) + ys * np.sin(theta) - size / 2)
    field = colour.astype(np.float32) + shading[..., None]
    if rng.random() < 0.5:
        field = field + _texture(rng, size, rng.uniform(8, 30))
    return field


def generate_scene(rng: np.random.Generator, *, image_size: int, min_objects: int, max_objects: int) -> Scene:
    """One scene: background, objects in z-order, visible instance map and a target.

    Args:
      rng: the scene's generator (see :func:`scene_generator`).
      image_size: side S of the square image.
      min_objects, max_objects: inclusive range of the number of objects drawn.

    Returns:
      A :class:`Scene`. Objects that end up with no visible pixel are not instances.
    """
    if not 1 <= min_objects <= max_objects <= 255:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 255, got {min_objects}, {max_objects}")
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16, got {image_size}")
    size = image_size
    min_target = max(_MIN_TARGET_PIXELS, _MIN_TARGET_FRACTION * size * size)
    relation_names, relation_p = list(_RELATIONS), np.array(list(_RELATIONS.values()))
    for _ in range(_MAX_SCENE_TRIES):
        background = _background(rng, size)
        image = background.copy()
        masks: list[np.ndarray] = []
        cats: list[str] = []
        rels: list[str] = []
        n = int(rng.integers(min_objects, max_objects + 1))
        for _attempt in range(4 * n):
            if len(masks) == n:
                break
            if not masks:
                relation = "border" if rng.random() < 0.2 else "free"
            else:
                relation = str(rng.choice(relation_names, p=relation_p / relation_p.sum()))
            category = str(rng.choice(CATEGORIES, p=[0.2, 0.2, 0.15, 0.15, 0.15, 0.15]))
            mask, _shape = _place(rng, relation, category, size, masks)
            if mask is None or mask.sum() < 6:
                continue
            # Soft edge (σ = 0.5 px, real boundaries are not pixel steps) that keeps a 1 px line
            # at >= 85 % contrast.
            hard = mask.astype(np.float32)
            alpha = np.maximum(ndimage.gaussian_filter(hard, 0.5), 0.85 * hard)
            field = _paint(rng, image, mask)
            image = image * (1 - alpha[..., None]) + field * alpha[..., None]
            masks.append(mask)
            cats.append(category)
            rels.append(relation)
        ids = np.zeros((size, size), np.int32)
        for k, mask in enumerate(masks):
            ids[mask] = k + 1  # z-order: later objects cover earlier ones
        areas = np.bincount(ids.ravel(), minlength=len(masks) + 1)[1:]
        visible = np.nonzero(areas > 0)[0]
        eligible = [j for j, k in enumerate(visible) if areas[k] >= min_target]
        if not eligible:
            continue
        # Renumber visible objects 1..K keeping z-order.
        lut = np.zeros(len(masks) + 1, np.uint8)
        lut[visible + 1] = np.arange(1, len(visible) + 1)
        instances = lut[ids]
        image = image + rng.normal(0, 2.5, image.shape)  # sensor noise
        return Scene(
            image=np.clip(image, 0, 255).round().astype(np.uint8),
            instances=instances,
            categories=[cats[k] for k in visible],
            target=int(eligible[int(rng.integers(len(eligible)))]) + 1,
            relations=[rels[k] for k in visible],
        )
    raise RuntimeError(f"could not generate a scene with a target of >= {min_target:.0f} px")
