"""Prompts turned to the query's pose, for parts photographed at random rotations.

OneNIP reconstructs a query's features from one normal prompt image; its transformer attends across the
prompt, but its positional embedding and the neighbour mask tie tokens to places, so a prompt turned
against the query makes the part's edges look anomalous. For a category whose parts rotate, each prompt
image is turned over a grid of angles (optionally mirrored too) and encoded once by the frozen backbone;
each query then takes, per prompt, the turn whose neck features lie nearest its own inside the central
disc that every turn keeps (:func:`align_prompts`: a matrix product, an argmin and a gather, so the
exported graph makes the same choice as the test). A turn leaves the prompt's corners empty; they are
filled with the median colour of the image's border (``fill=border``: the background of a part shot on a
uniform table) or by mirroring the image at its border (``fill=reflect``).

Whether a category rotates is a setting per category (``fixed``: a turned part is a defect, e.g. a
misplaced transistor; ``rotating``) or decided from its normal training images (``auto``, see
:func:`turn_gain`). The decisions travel in the checkpoint as :class:`PoseState`.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch import Tensor

from onenip_pl.errors import ConfigError, DataError, check_choice

log = logging.getLogger(__name__)

POSE_MODES = ("fixed", "rotating", "auto")
POSE_FILLS = ("border", "reflect")
# auto: a category rotates when turning one normal image onto another removes at least this fraction of
# their thumbnail difference (median over pairs, see turn_gain). On realdev's normal training images:
# screw 0.78, grid 0.27-0.33 (its mesh is photographed at varying angles), capsules 0.06-0.08, hazelnut_toy
# 0.02-0.06, rope 0.00, transistor 0.00, ball_screw 0.00 (two seeds): the cut sits between 0.08 and 0.27.
AUTO_GAIN_CUT = 0.15
AUTO_IMAGES = 24
AUTO_THUMBNAIL = 64
FeatureExtractor = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class PoseGrid:
    """The turns a prompt is tried at: ``angles`` evenly spread over 360 degrees (counter-clockwise), each
    also mirrored (left-right, before turning) when ``mirror``; ``fill`` fills the corners a turn empties."""

    angles: int = 36
    mirror: bool = False
    fill: str = "border"

    def __post_init__(self) -> None:
        if int(self.angles) < 1:
            raise ConfigError(f"data.pose_angles={self.angles} must be at least 1")
        check_choice("data.pose_fill", self.fill, POSE_FILLS)

    @property
    def turns(self) -> list[tuple[float, bool]]:
        """(angle in degrees, mirrored) of each candidate, the unturned prompt first."""
        flips = (False, True) if self.mirror else (False,)
        return [(360.0 * i / self.angles, flip) for flip in flips for i in range(int(self.angles))]

    def to_state(self) -> dict[str, Any]:
        return {"angles": int(self.angles), "mirror": bool(self.mirror), "fill": self.fill}


def turn_image(image: np.ndarray, angle: float, mirror: bool = False, fill: str = "border") -> np.ndarray:
    """An H×W(×C) uint8 image mirrored left-right (if asked), then turned by ``angle`` degrees
    counter-clockwise about its centre; the corners the turn empties are filled as ``fill`` says."""
    if mirror:
        image = image[:, ::-1]
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D(((width - 1) / 2, (height - 1) / 2), float(angle), 1.0)
    if fill == "reflect":
        border, value = cv2.BORDER_REFLECT_101, 0
    else:
        border = cv2.BORDER_CONSTANT
        edge = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).reshape(-1, *image.shape[2:])
        value = tuple(float(v) for v in np.atleast_1d(np.median(edge, axis=0)))
    turned = cv2.warpAffine(
        np.ascontiguousarray(image),
        matrix,
        (width, height),
        flags=cv2.INTER_LINEAR,
        borderMode=border,
        borderValue=value,
    )
    return turned.reshape(image.shape)


def turned_images(images: Tensor, grid: PoseGrid) -> Tensor:
    """K×3×S×S images (uint8, or float in [0, 1]) -> K×R×3×S×S, one per turn of the grid, same dtype."""
    is_float = images.is_floating_point()
    arrays = images.detach().cpu()
    arrays = (arrays.mul(255).round().clamp(0, 255) if is_float else arrays).to(torch.uint8)
    arrays = arrays.permute(0, 2, 3, 1).numpy()
    turned = np.stack(
        [np.stack([turn_image(a, angle, flip, grid.fill) for angle, flip in grid.turns]) for a in arrays]
    )
    out = torch.from_numpy(turned).permute(0, 1, 4, 2, 3)
    return out.float().div(255.0) if is_float else out


@torch.no_grad()
def turned_features(
    extract: FeatureExtractor, images: Tensor, grid: PoseGrid, device: torch.device | str, chunk: int = 32
) -> Tensor:
    """Neck features K×R×C×h×w of K prompt images (uint8 or float K×3×S×S) at every turn of the grid."""
    turned = turned_images(images, grid)
    flat = turned.flatten(0, 1)
    if not flat.is_floating_point():
        flat = flat.float().div(255.0)
    features = torch.cat([extract(flat[i : i + chunk].to(device)) for i in range(0, len(flat), chunk)])
    return features.unflatten(0, turned.shape[:2])


def disc_mask(size: int, device: torch.device | str | None = None) -> Tensor:
    """h×w float mask of the tokens inside the disc every turn keeps: centres within size/2 - 1 tokens of
    the middle (one token of margin, since a token near the disc's edge already sees the filled corners)."""
    centres = torch.arange(size, dtype=torch.float32, device=device) + 0.5 - size / 2
    distance = (centres[:, None].square() + centres[None, :].square()).sqrt()
    return (distance <= max(size / 2 - 1, 0.75)).float()


def align_prompts(query_features: Tensor, posed_prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Each query's prompts at the turn nearest its pose: N×K×C×h×w, and the chosen turn N×K (long).

    ``posed_prompts`` is K×R×C×h×w (the same K prompts for every query, R turns each) or N×K×R×C×h×w
    (each query's own). The turn minimises the squared distance between the query's and the turned
    prompt's neck features over the central disc; ||query||² is the same for every turn, so the distance
    reduces to ||prompt_r||² - 2 <query, prompt_r>: one matrix product per query. R = 1 (a fixed-pose
    category) gives the prompts unchanged. Pure tensor operations, so the exported graph does the same.
    """
    shared = posed_prompts.dim() == 5
    size = query_features.shape[-1]
    mask = disc_mask(size, query_features.device).to(query_features.dtype)
    query = (query_features * mask).flatten(1)
    prompts = (posed_prompts * mask).flatten(-3)
    if shared:
        distance = prompts.square().sum(-1)[None] - 2 * torch.einsum("nd,krd->nkr", query, prompts)
    else:
        distance = prompts.square().sum(-1) - 2 * torch.einsum("nd,nkrd->nkr", query, prompts)
    turn = distance.argmin(dim=-1)
    num_queries, num_prompts = turn.shape
    if shared:
        chosen = posed_prompts[torch.arange(num_prompts, device=turn.device)[None, :], turn]
    else:
        queries = torch.arange(num_queries, device=turn.device)[:, None]
        chosen = posed_prompts[queries, torch.arange(num_prompts, device=turn.device)[None, :], turn]
    return chosen, turn


class TurnedPromptCache:
    """Turned features of the prompt images met while scoring, by their pixels: a test draws the same few
    prompts for many images, and each is turned and encoded once. Holds at most ``max_images`` images
    (the oldest go first), each R×C×h×w float32."""

    def __init__(self, max_images: int = 16) -> None:
        self.max_images = max_images
        self._entries: dict[bytes, Tensor] = {}

    def clear(self) -> None:
        self._entries.clear()

    def features(self, extract: FeatureExtractor, images: Tensor, grid: PoseGrid) -> Tensor:
        """K×R×C×h×w for K float images K×3×S×S in [0, 1]."""
        pixels = images.detach().mul(255).round().clamp(0, 255).to(torch.uint8).cpu()
        keys = [hashlib.sha1(image.numpy().tobytes()).digest() for image in pixels]
        missing = [i for i, key in enumerate(keys) if key not in self._entries]
        if missing:
            fresh = turned_features(extract, pixels[missing], grid, images.device)
            for i, features in zip(missing, fresh, strict=True):
                self._entries[keys[i]] = features
        found = torch.stack([self._entries[key] for key in keys])
        while len(self._entries) > self.max_images:
            self._entries.pop(next(iter(self._entries)))
        return found


def align_batch(
    query_features: Tensor,
    prompt_features: Tensor,
    prompt_images: Tensor,
    categories: Sequence[str],
    pose: PoseState,
    turned: Callable[[Tensor], Tensor],
) -> Tensor:
    """An evaluation batch's prompts (N×K×C×h×w, from its N×K prompt images) with those of rotating
    categories turned to their query's pose by :func:`align_prompts`; ``turned`` maps K float prompt images
    to their turned features K×R×C×h×w (e.g. :meth:`TurnedPromptCache.features`)."""
    rows = [i for i, category in enumerate(categories) if pose.rotating(category)]
    if not rows:
        return prompt_features
    images = prompt_images[rows]
    posed = turned(images.flatten(0, 1)).unflatten(0, images.shape[:2]).to(prompt_features.dtype)
    aligned = prompt_features.clone()
    aligned[rows] = align_prompts(query_features[rows], posed)[0]
    return aligned


# ---- deciding which categories rotate -----------------------------------------------------------------


def _thumbnail(image: np.ndarray) -> np.ndarray:
    gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return cv2.resize(gray, (AUTO_THUMBNAIL, AUTO_THUMBNAIL), interpolation=cv2.INTER_AREA)


def turn_gain(images: Sequence[np.ndarray], grid: PoseGrid, seed: int = 0) -> float:
    """How much turning one normal image onto another lowers their difference: the median over pairs of
    ``1 - min_turn d(a, turn(b)) / d(a, b)``, where d is the squared difference of the two gray 64×64
    thumbnails, each standardised inside the central disc. 0: turning never helps (a fixed pose); near 1:
    some turn matches the images almost exactly (a part at random rotations).

    At most AUTO_IMAGES images (a seeded draw) are compared, each with the next one in the draw.
    """
    if len(images) < 2:
        raise DataError("turn_gain needs at least 2 images")
    order = np.random.default_rng(seed).permutation(len(images))[:AUTO_IMAGES]
    thumbs = [_thumbnail(images[i]) for i in order]
    yy, xx = np.mgrid[:AUTO_THUMBNAIL, :AUTO_THUMBNAIL] + 0.5 - AUTO_THUMBNAIL / 2
    disc = np.hypot(yy, xx) <= AUTO_THUMBNAIL / 2 - 2

    def standard(thumb: np.ndarray) -> np.ndarray:
        values = thumb[disc].astype(np.float64)
        values -= values.mean()
        return values / max(np.linalg.norm(values), 1e-12)

    gains = []
    for a, b in zip(thumbs, thumbs[1:] + thumbs[:1], strict=True):
        target = standard(a)
        distances = [
            np.square(target - standard(turn_image(b, angle, flip, grid.fill))).sum()
            for angle, flip in grid.turns
        ]
        if distances[0] > 1e-12:
            gains.append(1.0 - min(distances) / distances[0])
    return float(np.median(gains)) if gains else 0.0


@dataclass
class PoseDecision:
    """Whether a category's prompts are turned, and why (the setting, or auto's statistic)."""

    rotating: bool
    reason: str
    gain: float | None = None

    def to_state(self) -> dict[str, Any]:
        return {"rotating": self.rotating, "reason": self.reason, "gain": self.gain}


@dataclass
class PoseState:
    """The setting, the grid and every category's decision: what the checkpoint stores and every scoring
    path reads. A category without a decision (a prompt of your own) is scored at a fixed pose; ``mode``
    decides a product enrolled later."""

    mode: str = "fixed"
    grid: PoseGrid = field(default_factory=PoseGrid)
    decisions: dict[str, PoseDecision] = field(default_factory=dict)

    def rotating(self, category: str | None) -> bool:
        decision = self.decisions.get(str(category)) if category is not None else None
        return bool(decision and decision.rotating)

    @property
    def rotating_categories(self) -> list[str]:
        return sorted(c for c, d in self.decisions.items() if d.rotating)

    def decide(self, category: str, images: Sequence[np.ndarray], seed: int = 0) -> PoseDecision:
        """Decide (and keep) a new category's pose by this state's mode, e.g. for an enrolled product."""
        decision = decide_poses({category: images}, self.mode, None, self.grid, seed).decisions[category]
        self.decisions[category] = decision
        return decision

    def posed(
        self, extract: FeatureExtractor, category: str | None, images: Tensor, features: Tensor
    ) -> Tensor:
        """K×R×C×h×w prompt features of K prompt images (K×3×S×S) of a category: every turn of the grid
        when it rotates, else ``features`` (their K×C×h×w features) as they are (R = 1)."""
        if self.rotating(category):
            return turned_features(extract, images, self.grid, features.device)
        return features[:, None]

    def describe(self) -> str:
        turning = self.rotating_categories
        listed = f" ({', '.join(turning)}; {len(self.grid.turns)} turns each)" if turning else ""
        return f"{len(turning)} of {len(self.decisions)} categories turn their prompts{listed}"

    def to_state(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "grid": self.grid.to_state(),
            "decisions": {c: d.to_state() for c, d in sorted(self.decisions.items())},
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> PoseState:
        decisions = {c: PoseDecision(**d) for c, d in state["decisions"].items()}
        return cls(state["mode"], PoseGrid(**state["grid"]), decisions)

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any], source: object) -> PoseState:
        """The checkpoint's pose state; a checkpoint written before prompts could turn scores every
        category at a fixed pose, and says so (once, when it is loaded)."""
        if checkpoint.get("pose") is not None:
            return cls.from_state(checkpoint["pose"])
        log.warning(
            "Checkpoint %s holds no pose decisions (written before data.pose existed): every category is "
            "scored with unturned prompts, as data.pose=fixed; retrain to turn prompts of rotating parts.",
            source,
        )
        return cls()


class LazyImages(Sequence):
    """Images loaded on access, so that deciding a pose reads only the few images it compares."""

    def __init__(self, load: Callable[[int], np.ndarray], indices: Sequence[int]) -> None:
        self.load = load
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item):
        return self.load(self.indices[item])


def decide_poses(
    images_by_category: Mapping[str, Sequence[np.ndarray]],
    mode: str,
    per_category: Mapping[str, str] | None = None,
    grid: PoseGrid | None = None,
    seed: int = 0,
    known_categories: Sequence[str] | None = None,
) -> PoseState:
    """Every category's decision from ``data.pose`` (``mode``) and its overrides; ``auto`` measures
    :func:`turn_gain` on the category's own normal training images and turns prompts when it reaches
    AUTO_GAIN_CUT. Each decision is logged with its reason. ``known_categories`` (default: those given)
    are the names an override may use."""
    check_choice("data.pose", mode, POSE_MODES)
    grid = grid or PoseGrid()
    overrides = dict(per_category or {})
    known = sorted(set(known_categories or ()) | set(images_by_category))
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise ConfigError(
            f"data.pose_per_category names {', '.join(map(repr, unknown))}, not a category of this data set "
            f"(known: {', '.join(known) or 'none'}); fix or remove the entry"
        )
    decisions = {}
    for category, images in sorted(images_by_category.items()):
        setting = overrides.get(category, mode)
        name = f"data.pose_per_category.{category}" if category in overrides else "data.pose"
        check_choice(name, setting, POSE_MODES)
        if setting == "rotating" and len(images) < 2:
            raise ConfigError(
                f"{name}=rotating for category {category!r}, which has {len(images)} normal training "
                "image(s): turning prompts onto queries needs at least 2 (add train/good images, or set "
                f"data.pose_per_category.{category}=fixed)"
            )
        if setting != "auto":
            decisions[category] = PoseDecision(setting == "rotating", f"{name}={setting}")
        elif len(images) < 2:
            decisions[category] = PoseDecision(False, "auto: fewer than 2 normal training images -> fixed")
        else:
            gain = turn_gain(images, grid, seed)
            rotating = gain >= AUTO_GAIN_CUT
            decisions[category] = PoseDecision(
                rotating,
                f"auto: turning one normal image onto another removes {gain:.0%} of their difference "
                f"(median; cut {AUTO_GAIN_CUT:.0%}) -> {'rotating' if rotating else 'fixed'}",
                gain,
            )
        log.info("Pose of %s: %s", category, decisions[category].reason)
    return PoseState(mode, grid, decisions)
