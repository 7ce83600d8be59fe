"""Where the detector's two graphs run: PyTorch, ONNX Runtime or OpenVINO.

Every runtime offers the two graphs of onenip_pl.inference.graph over uint8 RGB images already resized to
the model's S×S (N×S×S×3): ``encode`` (neck features: what retrieval compares and a prompt is made of) and
``score`` (anomaly map N×1×S×S and image score N against a category's K prompt features). Results are
torch tensors whatever the runtime, so retrieval and the decision rule stay one code path in the detector.

The compiled runtimes are built in memory when the detector loads: the net is traced to ONNX once (seconds)
and compiled for the CPU, in float32; nothing is written to disk, so a checkpoint always runs as it is.
ONNX Runtime and OpenVINO compile the very graph that ``python -m onenip_pl.export`` writes.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from onenip_pl.errors import ConfigError, check_choice
from onenip_pl.extras import require_extra
from onenip_pl.inference.graph import (
    ENCODER_NAMES,
    SCORER_NAMES,
    Uint8Encoder,
    Uint8Scorer,
    example_prompts,
    onnx_bytes,
)
from onenip_pl.models import OneNIP

RUNTIMES = ("torch", "onnxruntime", "openvino")
# the Python packages each compiled runtime needs, from the deploy extra
RUNTIME_PACKAGES = {"onnxruntime": ("onnxruntime",), "openvino": ("openvino",)}
ONNX_OPSET = 17
# traced with 2 images and 2 prompts: a batch axis seen with size 1 may be specialised away
TRACE_BATCH = 2


class Runtime(Protocol):
    """The two graphs of one runtime (see the module docstring)."""

    name: str

    def encode(self, images: np.ndarray) -> Tensor: ...

    def score(
        self, images: np.ndarray, prompt_features: Tensor, query_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]: ...


class TorchRuntime:
    """The graphs in PyTorch eager, on the detector's device.

    ``score`` takes the queries' features when the caller already has them (retrieval computed them), so
    the backbone runs once per image; the compiled runtimes' graph takes images and recomputes them.
    """

    name = "torch"

    def __init__(self, net: OneNIP, device: torch.device) -> None:
        self.net = net
        self.device = device
        self.encoder = Uint8Encoder(net)
        self.scorer = Uint8Scorer(net)

    def _images(self, images: np.ndarray) -> Tensor:
        # uint8 travels to the device: a quarter of float32's bytes
        return torch.from_numpy(np.ascontiguousarray(images)).to(self.device)

    @torch.inference_mode()
    def encode(self, images: np.ndarray) -> Tensor:
        return self.encoder(self._images(images))

    @torch.inference_mode()
    def score(
        self, images: np.ndarray, prompt_features: Tensor, query_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        prompts = prompt_features.to(self.device)
        if query_features is not None:
            return self.scorer.score_features(query_features.to(self.device), prompts)
        return self.scorer(self._images(images), prompts)


class CompiledRuntime(ABC):
    """The graphs traced to ONNX and compiled by a CPU runtime; subclasses compile and run one graph.

    Threads: as many as torch uses (torch.set_num_threads), so one setting governs every runtime.
    """

    name = ""

    def __init__(self, net: OneNIP) -> None:
        size = net.image_size
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (TRACE_BATCH, size, size, 3), dtype=torch.uint8, generator=generator)
        encoder, scorer = Uint8Encoder(net).eval(), Uint8Scorer(net).eval()
        with torch.no_grad():
            prompts = encoder(images)
            self.encoder = self.compile(onnx_bytes(encoder, (images,), ENCODER_NAMES, ONNX_OPSET))
            example = (images, example_prompts(prompts))
            self.scorer = self.compile(onnx_bytes(scorer, example, SCORER_NAMES, ONNX_OPSET))

    @abstractmethod
    def compile(self, model: bytes) -> Any:
        """An ONNX model -> the runtime's executable graph."""

    @abstractmethod
    def run(self, graph: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """The graph's outputs, in their declared order."""

    def encode(self, images: np.ndarray) -> Tensor:
        (features,) = self.run(self.encoder, {"image": np.ascontiguousarray(images)})
        return torch.from_numpy(features)

    def score(
        self, images: np.ndarray, prompt_features: Tensor, query_features: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        prompts = np.ascontiguousarray(prompt_features.detach().cpu().numpy(), dtype=np.float32)
        anomaly_map, image_score = self.run(
            self.scorer, {"image": np.ascontiguousarray(images), "prompt_features": prompts}
        )
        return torch.from_numpy(anomaly_map), torch.from_numpy(image_score)


class OnnxRuntime(CompiledRuntime):
    name = "onnxruntime"

    def compile(self, model: bytes) -> Any:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def run(self, graph: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return graph.run(None, inputs)


class OpenVinoRuntime(CompiledRuntime):
    name = "openvino"

    def compile(self, model: bytes) -> Any:
        return compile_openvino(openvino_model(model), torch.get_num_threads())

    def run(self, graph: Any, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        outputs = graph(inputs)
        return [outputs[port] for port in graph.outputs]


def openvino_model(model: bytes | Any) -> Any:
    """An ONNX model (bytes) or a model file (.onnx, or .xml IR) as an openvino.Model."""
    import openvino

    return openvino.Core().read_model(model if isinstance(model, bytes) else str(model))


def compile_openvino(model: Any, threads: int | None = None) -> Any:
    """An OpenVINO model compiled for the CPU, computing in float32.

    OpenVINO would otherwise run in bfloat16 on CPUs that have it, which moves maps and scores by about
    1 % and can flip a decision next to its threshold; the decisions must be PyTorch's.
    """
    import openvino
    from openvino import properties

    config: dict[str, Any] = {
        properties.hint.inference_precision: openvino.Type.f32,
        properties.hint.performance_mode: properties.hint.PerformanceMode.LATENCY,
    }
    if threads:
        config[properties.inference_num_threads] = threads
    return openvino.Core().compile_model(model, "CPU", config)


def build_runtime(name: str, net: OneNIP, device: torch.device) -> Runtime:
    """The runtime called ``name`` for ``net`` (on ``device``: the compiled runtimes run on the CPU)."""
    check_choice("runtime", name, RUNTIMES)
    if name == "torch":
        return TorchRuntime(net, device)
    if device.type != "cpu":
        raise ConfigError(f"runtime={name} runs on the CPU: use device=cpu, or runtime=torch on {device}.")
    require_extra("deploy", f"runtime={name}", RUNTIME_PACKAGES[name])
    return OnnxRuntime(net) if name == "onnxruntime" else OpenVinoRuntime(net)
