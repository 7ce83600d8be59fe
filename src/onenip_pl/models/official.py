"""The authors' checkpoints: their keys renamed to this package's modules, every key checked.

Their files are `torch.save`d dicts whose `state_dict` keys read `module.backbone.*` (efficientnet_pytorch
EfficientNet-B4), `module.neck.*` (no parameters) and `module.reconstruction.*` (reconstructor, refiner under
`seghead`). Every key must match a rule; nothing is guessed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping, Sequence

from torch import Tensor, nn

from onenip_pl.errors import CheckpointError
from onenip_pl.models.backbone import (
    EFFICIENTNET_B4_STAGE_DEPTHS,
    check_state_dict,
    efficientnet_pytorch_to_timm,
)

_ATTENTION = r"(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
_AFFINE = r"(weight|bias)"
_BATCH_NORM = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
_ENCODER = r"transformer\.encoder\.layers\.(\d+)"
_DECODER = r"transformer\.decoder\.layers\.(\d+)"


def _refiner_stage(layer: str) -> Callable[[re.Match], str]:
    """Their `upconv{k}` (1-based Sequential) -> our `stages.{k-1}.{layer}`."""
    return lambda match: f"refiner.stages.{int(match[1]) - 1}.{layer}.{match[2]}"


# (authors' key after `reconstruction.`, our key): a template for Match.expand or a function of the match.
_RECONSTRUCTION_RULES: list[tuple[re.Pattern, str | Callable[[re.Match], str]]] = [
    (re.compile(pattern), target)
    for pattern, target in [
        (rf"input_proj\.{_AFFINE}", r"reconstructor.input_proj.\1"),
        (rf"output_proj\.{_AFFINE}", r"reconstructor.output_proj.\1"),
        (r"pos_embed\.(row|col)_embed\.weight", r"reconstructor.pos_embed.\1_embed.weight"),
        (rf"{_ENCODER}\.self_attn\.{_ATTENTION}", r"reconstructor.encoder.layers.\1.self_attn.\2"),
        (rf"{_ENCODER}\.linear1\.{_AFFINE}", r"reconstructor.encoder.layers.\1.ffn_in.\2"),
        (rf"{_ENCODER}\.linear2\.{_AFFINE}", r"reconstructor.encoder.layers.\1.ffn_out.\2"),
        (rf"{_ENCODER}\.norm1\.{_AFFINE}", r"reconstructor.encoder.layers.\1.attn_norm.\2"),
        (rf"{_ENCODER}\.norm2\.{_AFFINE}", r"reconstructor.encoder.layers.\1.ffn_norm.\2"),
        (
            rf"{_DECODER}\.cross_attn_prompt_to_image\.{_ATTENTION}",
            r"reconstructor.decoder.layers.\1.prompt_attn.\2",
        ),
        (
            rf"{_DECODER}\.cross_attn_image_to_prompt\.{_ATTENTION}",
            r"reconstructor.decoder.layers.\1.query_attn.\2",
        ),
        (rf"{_DECODER}\.mlp\.lin1\.{_AFFINE}", r"reconstructor.decoder.layers.\1.mlp_in.\2"),
        (rf"{_DECODER}\.mlp\.lin2\.{_AFFINE}", r"reconstructor.decoder.layers.\1.mlp_out.\2"),
        (rf"{_DECODER}\.norm1\.{_AFFINE}", r"reconstructor.decoder.layers.\1.prompt_attn_norm.\2"),
        (rf"{_DECODER}\.norm2\.{_AFFINE}", r"reconstructor.decoder.layers.\1.mlp_norm.\2"),
        (rf"{_DECODER}\.norm3\.{_AFFINE}", r"reconstructor.decoder.layers.\1.query_attn_norm.\2"),
        (
            rf"transformer\.decoder\.final_attn_token_to_image\.{_ATTENTION}",
            r"reconstructor.decoder.final_attn.\1",
        ),
        (rf"transformer\.decoder\.norm\.{_AFFINE}", r"reconstructor.decoder.final_norm.\1"),
        (r"seghead\.upconv(\d+)\.0\.(weight)", _refiner_stage("conv")),
        (rf"seghead\.upconv(\d+)\.1\.{_BATCH_NORM}", _refiner_stage("norm")),
        (rf"seghead\.upconv(\d+)\.3\.{_AFFINE}", _refiner_stage("upsample")),
        (rf"seghead\.predictor\.{_AFFINE}", r"refiner.predictor.\1"),
    ]
]

# Parts of our state that the authors' checkpoints do not hold.
NON_OFFICIAL_KEYS = frozenset({"fusion_scale"})


def official_reconstruction_key(key: str) -> str | None:
    """Our key for the authors' `reconstruction.*` key (without `module.`), or None if no rule matches."""
    if not key.startswith("reconstruction."):
        return None
    name = key.removeprefix("reconstruction.")
    for pattern, target in _RECONSTRUCTION_RULES:
        if match := pattern.fullmatch(name):
            return target(match) if callable(target) else match.expand(target)
    return None


def official_to_onenip_state_dict(
    state_dict: Mapping[str, Tensor],
    *,
    expected: Mapping[str, Tensor] | None = None,
    ignorable: Collection[str] = (),
    stage_depths: Sequence[int] = EFFICIENTNET_B4_STAGE_DEPTHS,
) -> dict[str, Tensor]:
    """Rename the authors' keys to ours; with `expected`, also check it key for key and shape for shape.

    `ignorable` lists our keys that may come extra and are dropped (the backbone layers after the last used
    stage). Unknown, missing or mis-shaped keys raise CheckpointError naming them.
    """
    stripped = {key.removeprefix("module."): value for key, value in state_dict.items()}
    backbone = {k.removeprefix("backbone."): v for k, v in stripped.items() if k.startswith("backbone.")}
    renamed = {
        f"backbone.body.{k}": v for k, v in efficientnet_pytorch_to_timm(backbone, stage_depths).items()
    }
    unknown = []
    for key, value in stripped.items():
        if key.startswith("backbone."):
            continue
        new_key = official_reconstruction_key(key)
        if new_key is None:
            unknown.append(key)
        else:
            renamed[new_key] = value
    if unknown:
        raise CheckpointError(
            f"{len(unknown)} keys of the checkpoint match no part of OneNIP: {', '.join(sorted(unknown)[:8])}"
            f"{' ...' if len(unknown) > 8 else ''}. Is it an authors' OneNIP checkpoint?"
        )
    if expected is None:
        return renamed
    return check_state_dict(renamed, expected, set(ignorable), what="official checkpoint weights")


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor]) -> None:
    """Load an authors' state dict into a OneNIP model (backbone keys of its dropped layers are ignored)."""
    expected = {k: v for k, v in model.state_dict().items() if k not in NON_OFFICIAL_KEYS}
    ignorable = {f"backbone.body.{key}" for key in model.backbone.dropped_keys()}
    mapped = official_to_onenip_state_dict(state_dict, expected=expected, ignorable=ignorable)
    model.load_state_dict(mapped, strict=False)  # complete but for NON_OFFICIAL_KEYS, as just checked
