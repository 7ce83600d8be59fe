"""OneNIP as one plain torch module: frozen backbone + neck -> reconstructor -> refiner -> anomaly maps.

No Lightning here: training, calibration and evaluation live elsewhere and call the named steps below.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onenip_pl.checkpoint_file import read_checkpoint, state_dict_of
from onenip_pl.errors import ConfigError, DataError
from onenip_pl.models.backbone import OFFICIAL_BACKBONE, Backbone, architecture_name
from onenip_pl.models.neck import Neck
from onenip_pl.models.official import load_official_state_dict
from onenip_pl.models.reconstructor import Reconstructor
from onenip_pl.models.refiner import Refiner

SCORE_POOL_SIZE = 16


def _channel_statistic(values: Sequence[float] | None, default: Sequence[float], name: str) -> Tensor:
    values = tuple(default if values is None else values)
    if len(values) != 3:
        raise ConfigError(f"{name} needs 3 values (R, G, B), got {values}.")
    return torch.tensor(values, dtype=torch.float32).view(1, 3, 1, 1)


class OneNIP(nn.Module):
    """One-normal-image-prompt anomaly detector (spec §§3-7).

    Inputs are RGB images in [0, 1]; `pixel_mean`/`pixel_std` default to the backbone's pretrained config.
    `fusion_scale` weighs the refiner map in anomaly_map = 0.5 * rec_map + 0.5 * fusion_scale * refiner_map;
    it is a buffer so a calibrated value travels with the weights. `channels_last` runs the backbone in NHWC
    layout (faster on CPU, same maths).
    """

    def __init__(
        self,
        backbone: str = OFFICIAL_BACKBONE,
        image_size: int = 224,
        pretrained: bool = False,
        backbone_weights: str | os.PathLike | None = None,
        official_padding: bool | None = None,
        out_indices: Sequence[int] = (0, 1, 2, 3),
        hidden_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        neighbor_size: int | None = None,
        refiner_channels: int = 128,
        pixel_mean: Sequence[float] | None = None,
        pixel_std: Sequence[float] | None = None,
        channels_last: bool = True,
    ) -> None:
        super().__init__()
        if image_size <= 0 or image_size % 16:
            raise ConfigError(
                f"image_size={image_size} must be a positive multiple of 16 (one token per 16 px)."
            )
        self.image_size = image_size
        self.feature_size = image_size // 16
        weights = None if backbone_weights is None else state_dict_of(read_checkpoint(backbone_weights))
        self.backbone = Backbone(
            backbone, tuple(out_indices), pretrained, weights, official_padding, channels_last
        )
        self.feature_channels = sum(self.backbone.channels)
        self.neck = Neck(self.feature_size)
        self.reconstructor = Reconstructor(
            self.feature_channels,
            self.feature_size,
            hidden_dim,
            num_heads,
            feedforward_dim,
            dropout,
            num_encoder_layers,
            num_decoder_layers,
            jitter_scale,
            jitter_prob,
            neighbor_size,
        )
        self.refiner = Refiner(self.feature_channels, refiner_channels)
        mean = _channel_statistic(pixel_mean, self.backbone.pretrained_cfg["mean"], "pixel_mean")
        std = _channel_statistic(pixel_std, self.backbone.pretrained_cfg["std"], "pixel_std")
        if (std <= 0).any():
            raise ConfigError(f"pixel_std={tuple(std.flatten().tolist())} must be positive.")
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)
        self.register_buffer("fusion_scale", torch.tensor(1.0))

    def extract_features(self, images: Tensor) -> Tensor:
        """Neck features B x C x S/16 x S/16 of images in [0, 1] (frozen backbone, no gradient)."""
        if (
            images.ndim != 4
            or images.shape[1] != 3
            or images.shape[-2:] != (self.image_size, self.image_size)
        ):
            raise DataError(
                f"expected RGB images B x 3 x {self.image_size} x {self.image_size}, "
                f"got {tuple(images.shape)}: resize them to the model's image_size."
            )
        with torch.no_grad():
            normalised = (images - self.pixel_mean) / self.pixel_std
            return self.neck(self.backbone(normalised))

    def reconstruct(self, query_features: Tensor, prompt_features: Tensor) -> Tensor:
        """Reconstructed query features; prompt i serves queries i, i+M, i+2M, ... (M prompts)."""
        return self.reconstructor(query_features, prompt_features)

    def refine(self, reconstruction: Tensor, query_features: Tensor) -> Tensor:
        """Refiner logits N x 1 x S x S from the residual against the query's own (input) features."""
        return self.refiner((reconstruction - query_features).abs(), self.image_size)

    def fuse(
        self, rec_map: Tensor, refiner_map: Tensor, fusion_scale: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor]:
        """Fused map 0.5 * rec + 0.5 * scale * ref, and its image score (max of a 16x16 mean filter), in
        float32 whatever autocast is active."""
        scale = self.fusion_scale if fusion_scale is None else fusion_scale
        with torch.autocast(device_type=rec_map.device.type, enabled=False):
            scale = torch.as_tensor(scale, dtype=torch.float32, device=rec_map.device)
            anomaly_map = 0.5 * rec_map.float() + 0.5 * scale * refiner_map.float()
            image_score = F.avg_pool2d(anomaly_map, SCORE_POOL_SIZE, stride=1).flatten(1).amax(dim=1)
        return anomaly_map, image_score

    def residual_maps(
        self, query_features: Tensor, reconstruction: Tensor, refiner_logit: Tensor
    ) -> tuple[Tensor, Tensor]:
        """rec_map (||F_hat - F|| over channels, upsampled), refiner_map (sigmoid): N x 1 x S x S float32."""
        with torch.autocast(device_type=reconstruction.device.type, enabled=False):
            residual = reconstruction.float() - query_features.float()
            distance = residual.square().sum(dim=1, keepdim=True).sqrt()
            size = (self.image_size, self.image_size)
            rec_map = F.interpolate(distance, size=size, mode="bilinear", align_corners=True)
            return rec_map, torch.sigmoid(refiner_logit.float())

    def anomaly_maps(
        self,
        query_features: Tensor,
        reconstruction: Tensor,
        refiner_logit: Tensor,
        fusion_scale: Tensor | float | None = None,
    ) -> dict[str, Tensor]:
        """rec_map, refiner_map, anomaly_map (N x 1 x S x S) and image_score (N,), always in float32."""
        rec_map, refiner_map = self.residual_maps(query_features, reconstruction, refiner_logit)
        anomaly_map, image_score = self.fuse(rec_map, refiner_map, fusion_scale)
        return {
            "rec_map": rec_map,
            "refiner_map": refiner_map,
            "anomaly_map": anomaly_map,
            "image_score": image_score,
        }

    def prompted_maps(self, query_features: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        """rec_map and refiner_map (N x 1 x S x S) of each query, averaged over its K prompts.

        ``prompt_features`` is K x C x h x w (the same K prompts for every query: each prompt is encoded
        once) or N x K x C x h x w (K prompts per query). Fusion is linear, so fusing the averaged maps
        equals averaging the K fused maps; the image score is then taken from the averaged map.
        """
        num_queries = query_features.shape[0]
        shared = prompt_features.dim() == 4
        num_prompts = prompt_features.shape[0 if shared else 1]
        if not shared and prompt_features.shape[0] != num_queries:
            raise ValueError(f"{prompt_features.shape[0]} prompt sets for {num_queries} queries.")
        # pair j = n*K + k: the reconstructor gives query j prompt j mod K (shared) or prompt j (per query)
        paired = query_features.repeat_interleave(num_prompts, dim=0)
        prompts = prompt_features if shared else prompt_features.flatten(0, 1)
        reconstruction = self.reconstruct(paired, prompts)
        rec_map, refiner_map = self.residual_maps(paired, reconstruction, self.refine(reconstruction, paired))
        size = rec_map.shape[-2:]
        return tuple(
            m.reshape(num_queries, num_prompts, 1, *size).mean(dim=1) for m in (rec_map, refiner_map)
        )

    def score(
        self, query_features: Tensor, prompt_features: Tensor, fusion_scale: Tensor | float | None = None
    ) -> tuple[Tensor, Tensor]:
        """The scoring path shared by testing, calibration, the detector and the exported graph: neck
        features of queries and their K prompts -> fused anomaly map N x 1 x S x S and image score N."""
        return self.fuse(*self.prompted_maps(query_features, prompt_features), fusion_scale)

    def forward(
        self, query: Tensor, prompt: Tensor | None = None, *, prompt_features: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Everything for query images given prompt images (or precomputed prompt features)."""
        if (prompt is None) == (prompt_features is None):
            raise ValueError("give exactly one of `prompt` (images) and `prompt_features`.")
        if prompt is None:
            query_features = self.extract_features(query)
        else:
            features = self.extract_features(torch.cat([query, prompt]))
            query_features, prompt_features = features.split([query.shape[0], prompt.shape[0]])
        reconstruction = self.reconstruct(query_features, prompt_features)
        refiner_logit = self.refine(reconstruction, query_features)
        maps = self.anomaly_maps(query_features, reconstruction, refiner_logit)
        return {
            "query_features": query_features,
            "reconstruction": reconstruction,
            "refiner_logit": refiner_logit,
            **maps,
        }

    @classmethod
    def from_official(
        cls, state_dict_or_path: Mapping[str, Tensor] | str | os.PathLike, image_size: int = 224, **kwargs
    ) -> OneNIP:
        """A model in eval mode holding the authors' weights (their B4 backbone, padding quirk on by default).

        The checkpoint supplies every weight, so `pretrained` and `backbone_weights` are refused; fusion_scale
        stays 1.0 until calibrated.
        """
        backbone = kwargs.pop("backbone", OFFICIAL_BACKBONE)
        if architecture_name(backbone) != OFFICIAL_BACKBONE:
            raise ConfigError(
                f"the authors' checkpoints hold a {OFFICIAL_BACKBONE} backbone, not backbone={backbone!r}."
            )
        for setting in ("pretrained", "backbone_weights"):
            if kwargs.pop(setting, None):
                raise ConfigError(f"from_official takes every weight from the checkpoint; drop `{setting}`.")
        if isinstance(state_dict_or_path, Mapping):
            checkpoint = state_dict_or_path
        else:
            checkpoint = read_checkpoint(state_dict_or_path)
        model = cls(backbone=backbone, image_size=image_size, **kwargs)
        load_official_state_dict(model, state_dict_of(checkpoint))
        return model.eval()
