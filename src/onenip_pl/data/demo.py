"""A small seeded data set in MVTec AD layout, drawn on the fly, so the demo needs no download.

Three categories, one object and two textures, each with several defect kinds
and pixel masks:

* ``washer``: a metal ring with a notch, seen from above; it shifts, turns and
  is lit a little differently in every image. Defects: scratch, rust,
  missing_piece.
* ``weave``: a basket-woven fabric with slight changes of phase, angle and
  colour. Defects: hole, color, thread.
* ``wood``: vertical wood grain, different in every image. Defects: crack,
  hole, color, scratch.

Every image comes from its own generator seeded by (seed, category, split,
defect kind, index), so any single file can be re-rendered exactly. Defects
cover roughly 1-8 % of the image: big enough for pretrained features to
notice, small enough not to be trivial.

:func:`generate_demo_dataset` is idempotent. It writes ``.onenip_demo.json``
(parameters and the list of files it wrote) before the images and marks it
complete at the end; a second call with the same parameters returns at once,
other parameters (or an interrupted run) make it delete only the files it
listed and draw the set again. A non-empty folder without that marker is
never touched.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import cv2
import numpy as np
from PIL import Image

from onenip_pl.data.perlin import perlin_noise, value_noise
from onenip_pl.errors import ConfigError, DataError

MARKER_NAME = ".onenip_demo.json"
FORMAT_VERSION = 1
MIN_IMAGE_SIZE = 64
MAX_IMAGES_PER_FOLDER = 1000
MIN_DEFECT_FRACTION = 0.005
_DEFECT_ATTEMPTS = 5


@dataclass
class _Scene:
    """A rendered normal image (float32 RGB in [0, 1]) and what a defect needs to know about it.

    ``support`` is where defects may appear (the object, or everywhere for a
    texture); ``background`` is what lies behind the object (for missing parts).
    """

    image: np.ndarray
    support: np.ndarray
    background: np.ndarray | None = None


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    return yy, xx


def _mix(image: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Alpha-blend ``colour`` (RGB or H×W×3) over ``image`` with an H×W alpha."""
    return image * (1.0 - alpha[..., None]) + colour * alpha[..., None]


def _soften(mask: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Anti-aliased alpha from a hard mask, so painted defects have no jagged rim."""
    return cv2.GaussianBlur(mask.astype(np.float32), (0, 0), sigma)


def _blob(size: int, centre: tuple[float, float], radius: float, rng: np.random.Generator) -> np.ndarray:
    """An irregular, roughly round region: the radius wobbles with low-frequency noise."""
    yy, xx = _pixel_grid(size)
    distance = np.hypot(yy - centre[0], xx - centre[1])
    wobble = perlin_noise((size, size), (int(rng.integers(6, 11)),) * 2, rng)
    return distance < radius * (1.0 + 0.45 * wobble)


def _polyline(
    start: tuple[float, float],
    angle: float,
    length: float,
    bend: float,
    rng: np.random.Generator,
    steps: int = 8,
) -> np.ndarray:
    """Points (x, y) of a slightly wandering line; ``bend`` is the sideways jitter per step in px."""
    along = np.linspace(0.0, length, steps)
    sideways = np.cumsum(rng.normal(0.0, bend, steps))
    sideways -= np.linspace(0.0, sideways[-1], steps) * 0.5
    dx, dy = math.cos(angle), math.sin(angle)
    xs = start[1] + along * dx - sideways * dy
    ys = start[0] + along * dy + sideways * dx
    return np.stack([xs, ys], axis=1)


def _stroke(size: int, points: np.ndarray, thickness: int) -> np.ndarray:
    """Hard mask of a polyline drawn ``thickness`` px wide."""
    canvas = np.zeros((size, size), dtype=np.uint8)
    cv2.polylines(
        canvas, [np.round(points).astype(np.int32)], False, 1, thickness=thickness, lineType=cv2.LINE_8
    )
    return canvas.astype(bool)


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * pixels + 1, 2 * pixels + 1))
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _point_in_support(scene: _Scene, rng: np.random.Generator, margin: float) -> tuple[float, float]:
    """A random (y, x) inside the defect support, away from the image border by ``margin`` px."""
    size = scene.support.shape[0]
    inner = np.zeros_like(scene.support)
    low, high = int(margin), int(size - margin)
    inner[low:high, low:high] = scene.support[low:high, low:high]
    ys, xs = np.nonzero(inner)
    pick = int(rng.integers(len(ys)))
    return float(ys[pick]), float(xs[pick])


# Washer (object) ------------------------------------------------------------------------------------------


def _render_washer(size: int, rng: np.random.Generator) -> _Scene:
    """A metal washer with a notch on a dark matte plate; position, angle and light vary slightly."""
    yy, xx = _pixel_grid(size)
    cy, cx = (size / 2.0 + rng.uniform(-0.03, 0.03, 2) * size).tolist()
    outer = 0.36 * size * rng.uniform(0.985, 1.015)
    inner = 0.155 * size * rng.uniform(0.985, 1.015)
    notch_angle = math.radians(-90.0 + rng.uniform(-15.0, 15.0))
    light_angle = math.radians(-135.0 + rng.uniform(-20.0, 20.0))
    gain = rng.uniform(0.92, 1.08)

    dy, dx = yy - cy, xx - cx
    distance = np.hypot(dy, dx)
    theta = np.arctan2(dy, dx)
    coverage = np.clip(outer - distance + 0.5, 0, 1) * np.clip(distance - inner + 0.5, 0, 1)
    offset = theta - notch_angle
    tangential, radial = distance * np.sin(offset), distance * np.cos(offset)
    notch = np.clip(0.03 * size - np.abs(tangential) + 0.5, 0, 1) * np.clip(
        radial - (outer - 0.05 * size), 0, 1
    )
    coverage *= 1.0 - notch

    across = np.clip((distance - inner) / (outer - inner), 0.0, 1.0)
    facing = np.cos(theta - light_angle)
    shading = 0.62 + 0.2 * np.sin(math.pi * across) - 0.16 * facing * np.cos(math.pi * across)
    shading += (
        0.3
        * np.exp(-(((theta - light_angle + math.pi) % (2 * math.pi) - math.pi) ** 2) / 0.15)
        * (np.sin(math.pi * across) ** 4)
    )
    shading += 0.025 * np.sin(2.0 * math.pi * distance / 2.7 + rng.uniform(0, 2 * math.pi))
    metal = np.array([0.80, 0.81, 0.84], dtype=np.float32) * (shading * gain)[..., None]

    plate = np.array([0.17, 0.19, 0.23], dtype=np.float32) * gain
    vignette = 1.0 - 0.25 * (np.hypot(yy - size / 2, xx - size / 2) / size) ** 2
    background = plate * (vignette[..., None] + 0.06 * (value_noise((size, size), (6, 6), 1, rng) - 0.5))
    shift = 0.025 * size
    shadow_matrix = np.float32(
        [[1, 0, -shift * math.cos(light_angle)], [0, 1, -shift * math.sin(light_angle)]]
    )
    shadow = cv2.warpAffine(coverage.astype(np.float32), shadow_matrix, (size, size))
    background *= 1.0 - 0.5 * _soften(shadow, 0.02 * size)[..., None]
    image = _mix(background, metal, coverage.astype(np.float32))
    return _Scene(image=image, support=coverage > 0.5, background=background)


def _washer_scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    start = _point_in_support(scene, rng, 0.1 * size)
    ys, xs = np.nonzero(scene.support)
    tangent = math.atan2(start[0] - ys.mean(), start[1] - xs.mean()) + math.pi / 2
    angle = tangent + rng.uniform(-0.5, 0.5) + (math.pi if rng.random() < 0.5 else 0.0)
    points = _polyline(start, angle, rng.uniform(0.3, 0.45) * size, 1.5, rng)
    line = _stroke(size, points, 3) & scene.support
    bright = rng.random() < 0.5
    colour = np.array([0.97, 0.97, 0.98] if bright else [0.25, 0.25, 0.27], dtype=np.float32)
    scene.image = _mix(scene.image, colour, _soften(line, 0.7) * scene.support)
    return _dilate(line, 2) & scene.support


def _washer_rust(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    centre = _point_in_support(scene, rng, 0.1 * size)
    region = _blob(size, centre, rng.uniform(0.06, 0.09) * size, rng) & scene.support
    grain = 0.7 + 0.5 * value_noise((size, size), (24, 24), 1, rng)
    rust = np.array([0.55, 0.28, 0.12], dtype=np.float32) * grain
    scene.image = _mix(scene.image, rust, 0.85 * _soften(region) * scene.support)
    return region


def _washer_missing_piece(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    ys, xs = np.nonzero(scene.support)
    cy, cx = ys.mean(), xs.mean()
    outer = float(np.max(np.hypot(ys - cy, xs - cx)))
    angle = rng.uniform(0, 2 * math.pi)
    centre = (cy + outer * math.sin(angle), cx + outer * math.cos(angle))
    bite = _blob(size, centre, rng.uniform(0.09, 0.13) * size, rng)
    removed = _soften(bite, 0.8) * scene.support
    scene.image = _mix(scene.image, scene.background, removed)
    return bite & scene.support


# Weave (texture) ------------------------------------------------------------------------------------------


def _render_weave(size: int, rng: np.random.Generator) -> _Scene:
    """Basket weave: over/under threads of two close colours, slight changes of phase, angle and tint."""
    yy, xx = _pixel_grid(size)
    period = size / 14.0 * rng.uniform(0.97, 1.03)
    angle = math.radians(rng.uniform(-2.0, 2.0))
    u = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 2)
    v = (-xx * math.sin(angle) + yy * math.cos(angle)) / period + rng.uniform(0, 2)
    fu, fv = u - np.floor(u), v - np.floor(v)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    warp = np.sin(math.pi * fu) ** 0.6 * (0.75 + 0.25 * np.sin(math.pi * fv))
    weft = np.sin(math.pi * fv) ** 0.6 * (0.75 + 0.25 * np.sin(math.pi * fu))
    relief = np.where(warp_on_top, warp, weft)
    tint = rng.uniform(0.97, 1.03, 3).astype(np.float32)
    warp_colour = np.array([0.72, 0.62, 0.45], dtype=np.float32) * tint
    weft_colour = np.array([0.66, 0.57, 0.42], dtype=np.float32) * tint
    colour = np.where(warp_on_top[..., None], warp_colour, weft_colour)
    fibres = 0.08 * (value_noise((size, size), (size // 4, size // 4), 1, rng)[..., 0] - 0.5)
    image = colour * (0.3 + 0.7 * relief + fibres)[..., None] * rng.uniform(0.94, 1.06)
    return _Scene(image=image, support=np.ones((size, size), dtype=bool))


def _weave_hole(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    region = _blob(size, _point_in_support(scene, rng, 0.12 * size), rng.uniform(0.05, 0.08) * size, rng)
    backing = np.array([0.07, 0.06, 0.05], dtype=np.float32)
    scene.image = _mix(scene.image, backing, _soften(region))
    return region


def _weave_color(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    region = _blob(size, _point_in_support(scene, rng, 0.12 * size), rng.uniform(0.07, 0.1) * size, rng)
    stain = np.array([0.55, 0.2, 0.15] if rng.random() < 0.5 else [0.2, 0.3, 0.55], dtype=np.float32)
    scene.image = _mix(scene.image, scene.image * stain * 1.3, 0.8 * _soften(region, 2.0))
    return region


def _weave_thread(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    start = _point_in_support(scene, rng, 0.2 * size)
    points = _polyline(start, rng.uniform(0, 2 * math.pi), rng.uniform(0.3, 0.45) * size, 3.0, rng)
    thread = _stroke(size, points, 4)
    colour = np.array([0.9, 0.88, 0.8] if rng.random() < 0.5 else [0.3, 0.22, 0.15], dtype=np.float32)
    scene.image = _mix(scene.image, colour, _soften(thread, 0.8))
    return _dilate(thread, 1)


# Wood (texture) -------------------------------------------------------------------------------------------


def _render_wood(size: int, rng: np.random.Generator) -> _Scene:
    """Vertical grain: gently warped growth rings plus fine fibre streaks; every image has its own grain."""
    yy, xx = _pixel_grid(size)
    period = size * rng.uniform(0.09, 0.13)
    warp = 1.2 * perlin_noise((size, size), (2, 3), rng) + 0.15 * perlin_noise((size, size), (6, 6), rng)
    phase = xx / period + warp
    rings = (phase - np.floor(phase)) ** 2.5
    streaks = value_noise((size, size), (6, size // 2), 1, rng)[..., 0]
    light = np.array([0.80, 0.60, 0.40], dtype=np.float32) * rng.uniform(0.95, 1.05)
    dark = np.array([0.56, 0.37, 0.21], dtype=np.float32) * rng.uniform(0.95, 1.05)
    image = light + (dark - light) * (0.6 * _soften(rings, 1.0) + 0.4 * streaks)[..., None]
    return _Scene(image=image, support=np.ones((size, size), dtype=bool))


def _wood_crack(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    start = _point_in_support(scene, rng, 0.25 * size)
    angle = math.pi / 2 + rng.uniform(-0.5, 0.5) + (math.pi if rng.random() < 0.5 else 0.0)
    points = _polyline(start, angle, rng.uniform(0.3, 0.45) * size, 2.5, rng, steps=14)
    core = _stroke(size, points, 3)
    halo = _dilate(core, 2)
    scene.image = _mix(scene.image, scene.image * 0.6, _soften(halo, 1.5))
    scene.image = _mix(scene.image, np.array([0.1, 0.06, 0.04], dtype=np.float32), _soften(core, 0.7))
    return _dilate(core, 2)


def _wood_hole(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    centre = _point_in_support(scene, rng, 0.12 * size)
    radius = rng.uniform(0.045, 0.065) * size
    yy, xx = _pixel_grid(size)
    distance = np.hypot(yy - centre[0], xx - centre[1])
    rim = distance < radius * 1.35
    hole = distance < radius
    scene.image = _mix(scene.image, scene.image * 0.7, _soften(rim, 1.5))
    scene.image = _mix(scene.image, np.array([0.08, 0.05, 0.03], dtype=np.float32), _soften(hole, 0.8))
    return rim


def _wood_color(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    region = _blob(size, _point_in_support(scene, rng, 0.12 * size), rng.uniform(0.07, 0.1) * size, rng)
    stain = np.array([0.35, 0.3, 0.25] if rng.random() < 0.5 else [0.7, 0.75, 0.55], dtype=np.float32)
    scene.image = _mix(scene.image, scene.image * stain * 1.2, 0.85 * _soften(region, 2.0))
    return region


def _wood_scratch(scene: _Scene, rng: np.random.Generator) -> np.ndarray:
    size = scene.image.shape[0]
    start = _point_in_support(scene, rng, 0.25 * size)
    angle = rng.uniform(-0.6, 0.6) + (math.pi if rng.random() < 0.5 else 0.0)
    points = _polyline(start, angle, rng.uniform(0.3, 0.45) * size, 1.0, rng)
    line = _stroke(size, points, 3)
    scene.image = _mix(scene.image, np.array([0.93, 0.84, 0.7], dtype=np.float32), _soften(line, 0.6))
    return _dilate(line, 2)


@dataclass(frozen=True)
class _Category:
    render: Callable[[int, np.random.Generator], _Scene]
    defects: dict[str, Callable[[_Scene, np.random.Generator], np.ndarray]]


_CATEGORIES: dict[str, _Category] = {
    "washer": _Category(
        _render_washer,
        {"scratch": _washer_scratch, "rust": _washer_rust, "missing_piece": _washer_missing_piece},
    ),
    "weave": _Category(_render_weave, {"hole": _weave_hole, "color": _weave_color, "thread": _weave_thread}),
    "wood": _Category(
        _render_wood,
        {"crack": _wood_crack, "hole": _wood_hole, "color": _wood_color, "scratch": _wood_scratch},
    ),
}

DEMO_CATEGORIES: dict[str, tuple[str, ...]] = {name: tuple(cat.defects) for name, cat in _CATEGORIES.items()}
"""Category name -> its defect kinds, in the order test images cycle through them."""


def _apply_defect(
    scene: _Scene, paint: Callable[[_Scene, np.random.Generator], np.ndarray], rng: np.random.Generator
) -> tuple[_Scene, np.ndarray]:
    """Paint a defect, redrawing it (a few times at most) while it covers less than MIN_DEFECT_FRACTION.

    A scratch that mostly misses the object would give a test image whose
    defect nobody could see; the last attempt is kept even if small.
    """
    for _ in range(_DEFECT_ATTEMPTS):
        attempt = _Scene(scene.image.copy(), scene.support, scene.background)
        mask = paint(attempt, rng)
        if mask.mean() >= MIN_DEFECT_FRACTION:
            break
    return attempt, mask


def render_demo_image(
    category: str, defect: str | None, image_size: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """One demo image (H×W×3 uint8) and, for a defect, its bool mask (None for a normal image)."""
    if category not in _CATEGORIES:
        raise ConfigError(f"unknown demo category {category!r}; choose from {sorted(_CATEGORIES)}")
    spec = _CATEGORIES[category]
    if defect is not None and defect not in spec.defects:
        raise ConfigError(
            f"unknown defect {defect!r} for demo category {category!r}; choose from {list(spec.defects)}"
        )
    scene = spec.render(image_size, rng)
    mask = None
    if defect is not None:
        scene, mask = _apply_defect(scene, spec.defects[defect], rng)
    noisy = scene.image + rng.normal(0.0, 1.5 / 255.0, scene.image.shape).astype(np.float32)
    return np.clip(np.rint(noisy * 255.0), 0, 255).astype(np.uint8), mask


# Writing the set ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _PlannedImage:
    """One image to write: where, and what seeds it."""

    category: str
    defect: str | None
    image: str
    mask: str | None
    seed_key: tuple[int, ...]


def _plan(params: dict[str, Any]) -> list[_PlannedImage]:
    """Every file of the set, with its per-image seed, in MVTec AD names (NNN.png, NNN_mask.png)."""
    plan: list[_PlannedImage] = []
    seed = params["seed"]
    for category in params["categories"]:
        cat_id = list(_CATEGORIES).index(category)
        for index in range(params["num_train"]):
            plan.append(
                _PlannedImage(
                    category,
                    None,
                    f"{category}/train/good/{index:03d}.png",
                    None,
                    (seed, cat_id, 0, 0, index),
                )
            )
        for index in range(params["num_test_good"]):
            plan.append(
                _PlannedImage(
                    category, None, f"{category}/test/good/{index:03d}.png", None, (seed, cat_id, 1, 0, index)
                )
            )
        kinds = DEMO_CATEGORIES[category]
        for number in range(params["num_test_defect"]):
            kind_id, index = number % len(kinds), number // len(kinds)
            kind = kinds[kind_id]
            plan.append(
                _PlannedImage(
                    category,
                    kind,
                    f"{category}/test/{kind}/{index:03d}.png",
                    f"{category}/ground_truth/{kind}/{index:03d}_mask.png",
                    (seed, cat_id, 2, kind_id + 1, index),
                )
            )
    return plan


def _planned_files(plan: Sequence[_PlannedImage]) -> list[str]:
    return [path for item in plan for path in (item.image, item.mask) if path is not None]


def _validate(params: dict[str, Any]) -> None:
    if params["image_size"] < MIN_IMAGE_SIZE:
        raise ConfigError(f"demo image_size={params['image_size']} must be at least {MIN_IMAGE_SIZE}")
    for key in ("num_train", "num_test_good", "num_test_defect"):
        if not 1 <= params[key] <= MAX_IMAGES_PER_FOLDER:
            raise ConfigError(f"demo {key}={params[key]} must lie in 1..{MAX_IMAGES_PER_FOLDER}")
    unknown = [name for name in params["categories"] if name not in _CATEGORIES]
    if unknown or not params["categories"]:
        raise ConfigError(f"demo categories {unknown or '[]'} invalid; choose from {sorted(_CATEGORIES)}")


def _read_marker(root: Path) -> dict[str, Any] | None:
    marker = root / MARKER_NAME
    if not marker.is_file():
        return None
    try:
        content = json.loads(marker.read_text())
        if not isinstance(content, dict) or not isinstance(content.get("files"), list):
            raise ValueError("missing file list")
    except (OSError, ValueError) as err:
        raise DataError(f"demo marker {marker} is unreadable ({err}); delete {root} and run again") from err
    return content


def _owned_path(root: Path, relative: str) -> Path:
    """Resolve a path listed in the marker, refusing anything that would leave ``root``."""
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise DataError(
            f"demo marker in {root} lists an unsafe path {relative!r}; delete {root} and run again"
        )
    return root.joinpath(*pure.parts)


def _remove_previous(root: Path, marker: dict[str, Any]) -> None:
    """Delete the files an earlier run listed, then any folders that this left empty."""
    paths = [_owned_path(root, str(relative)) for relative in marker["files"]]
    folders: set[Path] = set()
    for path in paths:
        if path.is_file():
            path.unlink()
        folders.update(parent for parent in path.parents if parent != root and root in parent.parents)
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    (root / MARKER_NAME).unlink()


def _write_marker(root: Path, params: dict[str, Any], files: list[str], complete: bool) -> None:
    content = {"generator": "onenip_pl.data.demo", "format_version": FORMAT_VERSION, "params": params}
    content.update({"complete": complete, "files": files})
    (root / MARKER_NAME).write_text(json.dumps(content, indent=1))


def _is_current(root: Path, marker: dict[str, Any] | None, params: dict[str, Any], files: list[str]) -> bool:
    if marker is None or not marker.get("complete") or marker.get("format_version") != FORMAT_VERSION:
        return False
    return (
        marker.get("params") == params
        and marker["files"] == files
        and all((root / f).is_file() for f in files)
    )


def _write_png(path: Path, array: np.ndarray) -> None:
    """Fast zlib level: the set is redrawn often (tests, fresh demos) and a few MB more do not matter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG", compress_level=1)


def generate_demo_dataset(
    root: str | Path,
    seed: int = 0,
    image_size: int = 256,
    num_train: int = 40,
    num_test_good: int = 8,
    num_test_defect: int = 12,
    categories: Sequence[str] | None = None,
) -> Path:
    """Write (or keep) the demo set in MVTec AD layout under ``root`` and return ``root``.

    Per category: ``num_train`` normal training images, ``num_test_good``
    normal test images and ``num_test_defect`` defective ones (cycling through
    the category's defect kinds), each with a 0/255 ``NNN_mask.png``.
    """
    root = Path(root).expanduser()
    params = {
        "seed": int(seed),
        "image_size": int(image_size),
        "num_train": int(num_train),
        "num_test_good": int(num_test_good),
        "num_test_defect": int(num_test_defect),
        "categories": list(categories) if categories is not None else list(_CATEGORIES),
    }
    _validate(params)
    plan = _plan(params)
    files = _planned_files(plan)
    marker = _read_marker(root)
    if _is_current(root, marker, params, files):
        return root
    if marker is not None:
        _remove_previous(root, marker)
    elif root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DataError(
            f"{root} is not empty and holds no demo marker ({MARKER_NAME}); the demo data set is only "
            "written to a new or empty folder. Choose another data.root or empty this one."
        )
    root.mkdir(parents=True, exist_ok=True)
    _write_marker(root, params, files, complete=False)
    for item in plan:
        image, mask = render_demo_image(
            item.category, item.defect, image_size, np.random.default_rng(item.seed_key)
        )
        _write_png(root / item.image, image)
        if item.mask is not None:
            _write_png(root / item.mask, mask.astype(np.uint8) * 255)
    _write_marker(root, params, files, complete=True)
    return root
