"""Export the deployed graph (ONNX, OpenVINO IR or torch.export) with a JSON sidecar and the prompt bank's
features.

The graph takes uint8 RGB images N×S×S×3 (NHWC, already resized to S×S) and a category's prompt features
K×R×C×h×w (K prompts at R turns; R = 1 for a fixed-pose category) and returns the anomaly map N×1×S×S and
the image score N; the choice of turn, normalisation and the calibrated fusion are inside. An optional
encoder graph (images -> neck features) lets a line set a new normal prompt without PyTorch. Every export
is run once in its runtime and compared with PyTorch before it is reported.

OpenVINO IR is converted from the traced ONNX graph rather than from the torch module: the conversion takes
seconds instead of a slower second trace, keeps the input and output names, and ONNX Runtime and OpenVINO
then run one and the same graph.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from onenip_pl import __version__
from onenip_pl.calibration.decision import RULE_TEXT
from onenip_pl.errors import ConfigError, check_choice
from onenip_pl.extras import require_extra
from onenip_pl.inference.detector import OneNIPDetector
from onenip_pl.inference.graph import (
    ENCODER_NAMES,
    SCORER_NAMES,
    Uint8Encoder,
    Uint8Scorer,
    example_prompts,
    onnx_bytes,
    write_onnx,
)
from onenip_pl.inference.runtimes import compile_openvino, openvino_model

FORMATS = ("onnx", "openvino", "torch_export")
SUFFIX = {"onnx": ".onnx", "openvino": ".xml", "torch_export": ".pt2"}
# the Python packages each format needs, from the deploy extra
FORMAT_PACKAGES = {"onnx": ("onnx", "onnxruntime"), "openvino": ("openvino",)}
MODEL_STEM = "onenip"
ENCODER_STEM = "onenip_encoder"
SIDECAR_NAME = "onenip.json"
PROMPTS_NAME = "prompt_features.npz"
VERIFY_IMAGES = 4


@dataclass
class ExportResult:
    """Files written; per output, the largest |runtime - PyTorch| on sample inputs and the largest |PyTorch|
    value (for scale: neck features reach tens, so their float32 rounding does too)."""

    model: Path
    sidecar: Path
    prompt_features: Path | None
    encoder: Path | None = None
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    max_abs_value: dict[str, float] = field(default_factory=dict)


def _sample_inputs(detector: OneNIPDetector) -> tuple[Tensor, Tensor]:
    """Sample queries (bank prompt images, else seeded noise) and one category's prompt features."""
    size = detector.image_size
    images = [entry[:1] for entry in detector.prompt_images.values()][:VERIFY_IMAGES]
    if images:
        queries = torch.cat(images).permute(0, 2, 3, 1).contiguous()
    else:
        generator = torch.Generator().manual_seed(0)
        queries = torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8, generator=generator)
    with torch.inference_mode():
        features = (
            next(iter(detector.prompt_features.values()))
            if detector.prompt_features
            else Uint8Encoder(detector.net)(queries[:1])
        )
        # a rotating category's turned prompts when there is one: the check then covers the turn's choice
        rotating = [category for category in detector.categories if detector.pose.rotating(category)]
        prompts = detector.posed_prompt_features(rotating[0]) if rotating else example_prompts(features)
    # at least 2 images and 2 prompts: torch.export would fix a batch axis seen with size 1
    return _at_least_two(queries), _at_least_two(prompts.detach().cpu().clone())


def _at_least_two(batch: Tensor) -> Tensor:
    return batch if batch.shape[0] >= 2 else batch.repeat(2, *([1] * (batch.ndim - 1)))


def _run_onnx(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, inputs)


def _export_openvino(
    module: nn.Module, example: tuple[Tensor, ...], path: Path, names: dict, opset: int
) -> None:
    import openvino

    model = openvino_model(onnx_bytes(module, example, names, opset))
    # float32 weights in the .bin: the decisions must equal PyTorch's, not a float16 approximation
    openvino.save_model(model, str(path), compress_to_fp16=False)


def _run_openvino(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    compiled = compile_openvino(openvino_model(path))
    outputs = compiled(inputs)
    return [outputs[port] for port in compiled.outputs]


def _export_program(module: nn.Module, example: tuple[Tensor, ...], path: Path, dims: Sequence) -> None:
    program = torch.export.export(module, example, dynamic_shapes=tuple(dims))
    torch.export.save(program, str(path))


def _run_program(path: Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    program = torch.export.load(str(path)).module()
    with torch.inference_mode():
        outputs = program(*(torch.from_numpy(value) for value in inputs.values()))
    outputs = outputs if isinstance(outputs, tuple | list) else (outputs,)
    return [output.numpy() for output in outputs]


def _export_and_compare(
    module: nn.Module, example: tuple[Tensor, ...], path: Path, names: dict, fmt: str, opset: int
) -> dict[str, tuple[float, float]]:
    """Write `module` in `fmt`, run it in its runtime on `example`; per output (max |difference|,
    max |PyTorch value|)."""
    if fmt == "onnx":
        write_onnx(module, example, path, names, opset)
    elif fmt == "openvino":
        _export_openvino(module, example, path, names, opset)
    else:
        dynamic_shapes = [
            {axis: torch.export.Dim(f"{name}_{label}", min=1, max=4096) for axis, label in axes.items()}
            for name, axes in names["dynamic_axes"].items()
            if name in names["inputs"]
        ]
        _export_program(module, example, path, dynamic_shapes)
    inputs = {name: tensor.numpy() for name, tensor in zip(names["inputs"], example, strict=True)}
    run = {"onnx": _run_onnx, "openvino": _run_openvino, "torch_export": _run_program}[fmt]
    runtime = run(path, inputs)
    with torch.inference_mode():
        reference = module(*example)
    reference = reference if isinstance(reference, tuple) else (reference,)
    return {
        name: (float(np.abs(got - want.numpy()).max()), float(want.abs().max()))
        for name, got, want in zip(names["outputs"], runtime, reference, strict=True)
    }


def export_detector(
    detector: OneNIPDetector,
    directory: str | Path,
    fmt: str = "onnx",
    opset: int = 17,
    encoder: bool = True,
    checkpoint: str | None = None,
) -> ExportResult:
    """Write the scoring graph (+ the encoder graph), prompt_features.npz and onenip.json into `directory`."""
    check_choice("format", fmt, FORMATS)
    if fmt in FORMAT_PACKAGES:
        require_extra("deploy", f"format={fmt} (the graph, checked in its runtime)", FORMAT_PACKAGES[fmt])
    if detector.device.type != "cpu":
        raise ConfigError("export from a CPU detector: OneNIPDetector.from_checkpoint(path, device='cpu').")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    detector.net.requires_grad_(False)
    queries, prompts = _sample_inputs(detector)
    model_path = directory / f"{MODEL_STEM}{SUFFIX[fmt]}"
    comparison = _export_and_compare(
        Uint8Scorer(detector.net).eval(), (queries, prompts), model_path, SCORER_NAMES, fmt, opset
    )
    encoder_path = None
    if encoder:
        encoder_path = directory / f"{ENCODER_STEM}{SUFFIX[fmt]}"
        comparison.update(
            _export_and_compare(
                Uint8Encoder(detector.net).eval(), (queries,), encoder_path, ENCODER_NAMES, fmt, opset
            )
        )
    prompts_path = None
    if detector.prompt_features:
        prompts_path = directory / PROMPTS_NAME
        posed = {c: detector.posed_prompt_features(c).cpu().numpy() for c in detector.categories}
        np.savez(prompts_path, **posed)
    sidecar = directory / SIDECAR_NAME
    result = ExportResult(
        model_path,
        sidecar,
        prompts_path,
        encoder_path,
        max_abs_diff={name: difference for name, (difference, _) in comparison.items()},
        max_abs_value={name: value for name, (_, value) in comparison.items()},
    )
    sidecar.write_text(
        json.dumps(describe_export(detector, result, fmt, opset, checkpoint, prompts), indent=2)
    )
    return result


def describe_export(
    detector: OneNIPDetector,
    result: ExportResult,
    fmt: str,
    opset: int,
    checkpoint: str | None,
    sample_prompts: Tensor,
) -> dict[str, Any]:
    """The sidecar: what goes in and comes out of the graph, the categories, thresholds and provenance."""
    size = detector.image_size
    channels, height, width = sample_prompts.shape[2:]
    image_spec = {
        "dtype": "uint8",
        "shape": ["N", size, size, 3],
        "layout": "NHWC, RGB",
        "preprocessing": f"resize to {size}x{size} bilinear (cv2.INTER_LINEAR); normalisation is inside",
    }
    return {
        "onenip_pl_version": __version__,
        "format": fmt,
        # OpenVINO IR is converted from the ONNX graph of this opset
        "opset": opset if fmt in FORMAT_PACKAGES else None,
        "model": result.model.name,
        "encoder": result.encoder.name if result.encoder else None,
        "image_size": size,
        "inputs": {
            "image": image_spec,
            "prompt_features": {
                "dtype": "float32",
                "shape": ["K", "R", int(channels), int(height), int(width)],
                "source": f"{PROMPTS_NAME}[category] (K prompts at R turns each: each query takes the turn "
                "nearest its pose; R = 1 for a fixed-pose category), or the encoder's output for normal "
                "images with an axis of size 1 added at 1; the maps of the K prompts are averaged",
            },
        },
        "outputs": {
            "anomaly_map": {"dtype": "float32", "shape": ["N", 1, size, size]},
            "image_score": {
                "dtype": "float32",
                "shape": ["N"],
                "decision": f"{RULE_TEXT}: image_score against thresholds.per_category[category].image "
                "(thresholds.pooled.image for a prompt of your own)",
            },
        },
        "encoder_io": {
            "inputs": {"image": image_spec},
            "outputs": {
                "features": {"dtype": "float32", "shape": ["N", int(channels), int(height), int(width)]}
            },
        },
        "prompt_features": result.prompt_features.name if result.prompt_features else None,
        "categories": detector.categories,
        "prompts_per_category": {c: int(f.shape[0]) for c, f in detector.prompt_features.items()},
        "pose": detector.pose.to_state(),
        "thresholds": detector.post_processor.threshold_table(),
        "calibrated": detector.calibrated,
        "fusion_scale": float(detector.net.fusion_scale),
        "checkpoint": checkpoint,
        "verification": {
            "inputs": "the bank's prompt images as queries, one category's prompt features",
            "max_abs_diff": result.max_abs_diff,
            "max_abs_pytorch_value": result.max_abs_value,
        },
    }
