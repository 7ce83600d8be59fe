"""The deployed graph: what the ONNX / OpenVINO / torch.export file computes.

It runs OneNIP's one scoring path (``OneNIP.score``: every query reconstructed from each of a category's K
prompt features, the K maps averaged, the image score taken from the averaged map), so the exported file
and the Python detector can only differ by the runtime's arithmetic. Before it, each prompt is turned to
the query's pose inside the graph (``align_prompts``: a matrix product, an argmin and a gather over the R
turns the prompt features hold; R = 1 for a fixed-pose category), so the deployed choice is the test's.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from onenip_pl.data.pose import align_prompts
from onenip_pl.models import OneNIP


class Uint8Scorer(nn.Module):
    """uint8 RGB images N×S×S×3 (NHWC, as decoders return them) and prompt features K×R×C×h×w (K prompts at
    R turns each) -> anomaly map N×1×S×S and image score N."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        images = image.permute(0, 3, 1, 2).to(torch.float32) / 255.0
        return self.score_features(self.net.extract_features(images), prompt_features)

    def score_features(self, query_features: Tensor, prompt_features: Tensor) -> tuple[Tensor, Tensor]:
        """The same from the queries' neck features: each prompt at the turn nearest the query's pose."""
        prompts, _ = align_prompts(query_features, prompt_features)
        return self.net.score(query_features, prompts)


def example_prompts(features: Tensor) -> Tensor:
    """Prompt features to trace the scorer with, K×R×C×h×w from N×C×h×w encoder features: two prompts at two
    turns (a traced axis seen with size 1 may be specialised away)."""
    first = features[:1].expand(2, -1, -1, -1) if features.shape[0] < 2 else features[:2]
    return torch.stack([first, first.flip(0)], dim=1).contiguous()


class Uint8Encoder(nn.Module):
    """uint8 RGB images N×S×S×3 -> neck features N×C×h×w (what a prompt is stored as)."""

    def __init__(self, net: OneNIP) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: Tensor) -> Tensor:
        return self.net.extract_features(image.permute(0, 3, 1, 2).to(torch.float32) / 255.0)


# input and output names of the two graphs, and their batch axes (N queries, K prompts)
SCORER_NAMES = {
    "inputs": ("image", "prompt_features"),
    "outputs": ("anomaly_map", "image_score"),
    "dynamic_axes": {
        "image": {0: "N"},
        "prompt_features": {0: "K", 1: "R"},
        "anomaly_map": {0: "N"},
        "image_score": {0: "N"},
    },
}
ENCODER_NAMES = {
    "inputs": ("image",),
    "outputs": ("features",),
    "dynamic_axes": {"image": {0: "N"}, "features": {0: "N"}},
}


def write_onnx(
    module: nn.Module, example: tuple[Tensor, ...], target: Path | io.BytesIO, names: dict, opset: int
) -> None:
    """Trace ``module`` on ``example`` into an ONNX file or buffer.

    The legacy (TorchScript-tracing) exporter: the torch.export-based one needs onnxscript, which is not a
    dependency. Tracing turns the models' input-size checks into constants, which is right: the sizes are
    fixed by image_size, only N and K vary."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=Warning)
        # the graph indexes with positions, never negative ones; the parity checks would catch a wrong gather
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        torch.onnx.export(
            module,
            example,
            target if isinstance(target, io.BytesIO) else str(target),
            dynamo=False,
            input_names=list(names["inputs"]),
            output_names=list(names["outputs"]),
            dynamic_axes=names["dynamic_axes"],
            opset_version=opset,
        )


def onnx_bytes(module: nn.Module, example: tuple[Tensor, ...], names: dict, opset: int) -> bytes:
    """The module as an ONNX model in memory (what the onnxruntime and openvino runtimes compile)."""
    buffer = io.BytesIO()
    write_onnx(module, example, buffer, names, opset)
    return buffer.getvalue()
