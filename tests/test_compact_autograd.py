"""The CPU training path of the transformer: packed dropout masks drawn by NumPy, and attention/dropout
autograd functions that recompute instead of keeping float tensors (models/ops/cpu_training.py).

Three kinds of check: the masks have the right distribution and follow torch's seed; the two autograd
functions' backward is the exact derivative of their forward (float64 gradcheck); and a whole reconstructor
step equals plain autograd of the textbook maths fed the very same masks, in less memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL_ARGS
from torch import Tensor

from onenip_pl.models import OneNIP
from onenip_pl.models.ops import cpu_training
from onenip_pl.models.ops.cpu_training import (
    CPUTrainingKernels,
    DropoutAttention,
    PackedDropoutFunction,
    PackedReluDropoutFunction,
    Workspace,
    dropout_keep_bits,
)
from onenip_pl.models.reconstructor import neighbor_attention_bias

TOLERANCE = 1e-5
TINY = {**TINY_MODEL_ARGS, "image_size": 128, "num_encoder_layers": 2}


def unpacked(bits: Tensor, count: int) -> np.ndarray:
    return np.unpackbits(bits.numpy(), count=count).astype(bool)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_keep_masks_have_the_dropout_distribution(p):
    count = 1 << 22
    torch.manual_seed(0)
    kept = unpacked(dropout_keep_bits(count, p), count)
    keep = 1.0 - p
    sigma = math.sqrt(keep * (1.0 - keep) / count)
    assert abs(kept.mean() - keep) < 5 * sigma, kept.mean()
    # neighbouring entries come from the two halves of one 64-bit draw: they must be independent
    pairs = kept[0::2] & kept[1::2]
    pair_sigma = math.sqrt(keep**2 * (1.0 - keep**2) / pairs.size)
    assert abs(pairs.mean() - keep**2) < 5 * pair_sigma, pairs.mean()


def test_keep_masks_follow_torch_seed_and_any_length():
    torch.manual_seed(3)
    first = dropout_keep_bits(1001, 0.1)
    torch.manual_seed(3)
    again = dropout_keep_bits(1001, 0.1)
    torch.manual_seed(4)
    other = dropout_keep_bits(1001, 0.1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert first.numel() == math.ceil(1001 / 8), "eight entries to a byte"
    state = torch.get_rng_state()
    restored = [dropout_keep_bits(64, 0.3) for _ in range(2)]
    torch.set_rng_state(state)
    assert all(torch.equal(a, dropout_keep_bits(64, 0.3)) for a in restored), "saved RNG state replays masks"


@pytest.mark.parametrize("p", [0.0, 1.0, -0.1])
def test_keep_masks_refuse_degenerate_probabilities(p):
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        dropout_keep_bits(10, p)


def seeded(function, seed: int = 0):
    """The same masks at every call, so that gradcheck's repeated forwards see one function."""

    def call(*args):
        torch.manual_seed(seed)
        return function(*args)

    return call


def test_dropout_attention_backward_is_the_derivative_of_its_forward():
    torch.manual_seed(1)
    bias = neighbor_attention_bias(4, 2).double()
    q, k, v = (torch.randn(6, 16, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    attend = seeded(lambda q, k, v: DropoutAttention.apply(q, k, v, bias, 0.3, Workspace()))
    assert torch.autograd.gradcheck(attend, (q, k, v))
    unmasked = seeded(lambda q, k, v: DropoutAttention.apply(q, k, v, None, 0.3, Workspace()))
    assert torch.autograd.gradcheck(unmasked, (q, k, v))


@pytest.mark.parametrize("after_relu", [False, True])
def test_compact_dropout_backward_is_the_derivative_of_its_forward(after_relu):
    torch.manual_seed(2)
    x = torch.randn(5, 7, 9, dtype=torch.float64, requires_grad=True)
    function = PackedReluDropoutFunction if after_relu else PackedDropoutFunction
    drop = seeded(lambda x: function.apply(x, 0.25, Workspace()))
    assert torch.autograd.gradcheck(drop, (x,))
    output = drop(x)
    dropped = (output == 0) & ((x > 0) if after_relu else torch.ones_like(x, dtype=torch.bool))
    assert 0 < int(dropped.sum()) < x.numel(), "the mask must drop some entries and keep others"


class MaskReplay:
    """Records the masks the packed path draws, then hands them out in the same order to the reference."""

    def __init__(self) -> None:
        self.masks: list[tuple[Tensor, int]] = []
        self.replay: Iterator[tuple[Tensor, int]] = iter(())

    def draw(self, count: int, p: float) -> Tensor:
        bits = dropout_keep_bits(count, p)
        self.masks.append((bits, count))
        return bits

    def next_mask(self, shape: torch.Size, dtype: torch.dtype) -> Tensor:
        bits, count = next(self.replay)
        assert count == math.prod(shape), "masks are used in the order they were drawn"
        return torch.from_numpy(unpacked(bits, count)).view(shape).to(dtype)

    def reference_attention(self, q, k, v, attn_mask=None, dropout_p=0.0, **_) -> Tensor:
        """F.scaled_dot_product_attention's maths in plain autograd, dropout by the recorded mask."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        probabilities = torch.softmax(scores if attn_mask is None else scores + attn_mask, dim=-1)
        if dropout_p:
            probabilities = probabilities * self.next_mask(probabilities.shape, q.dtype) / (1.0 - dropout_p)
        return probabilities @ v

    def reference_dropout(self, x, p=0.5, training=True, inplace=False) -> Tensor:
        """F.dropout's maths with the recorded mask."""
        if not training or p == 0.0:
            return x
        return x * self.next_mask(x.shape, x.dtype) / (1.0 - p)


def reconstructor_step(model: OneNIP, features: Tensor) -> tuple[Tensor, dict[str, Tensor], int]:
    """Reconstruction, gradients, and the bytes autograd keeps for backward, of one training forward."""
    storages: dict[int, int] = {}

    def keep(tensor: Tensor) -> Tensor:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad(set_to_none=True)
    torch.manual_seed(4)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        reconstruction = model.reconstruct(features[:4], features[4:])
    reconstruction.square().mean().backward()
    grads = {name: p.grad.clone() for name, p in model.reconstructor.named_parameters()}
    return reconstruction.detach(), grads, sum(storages.values())


def test_packed_path_equals_plain_autograd_with_the_same_masks_in_less_memory():
    torch.manual_seed(0)
    model = OneNIP(**TINY).train()
    features = torch.randn(6, model.feature_channels, 8, 8)
    replay = MaskReplay()
    kernels = CPUTrainingKernels()
    kernels.install(model.reconstructor)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cpu_training, "dropout_keep_bits", replay.draw)
        actual, grads, packed_bytes = reconstructor_step(model, features)
    kernels.remove(model.reconstructor)
    # attention: encoder 2, decoder 2 + final; dropouts: encoder 3 per layer, decoder 3 per layer + final
    assert len(replay.masks) == 5 + 6 + 4
    replay.replay = iter(replay.masks)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.nn.functional, "scaled_dot_product_attention", replay.reference_attention)
        patch.setattr(torch.nn.functional, "dropout", replay.reference_dropout)
        expected, expected_grads, plain_bytes = reconstructor_step(model, features)
    assert next(replay.replay, None) is None, "the reference used every mask"
    assert float((expected - actual).abs().max()) <= TOLERANCE
    worst = max(float((expected_grads[k] - grads[k]).abs().max()) for k in grads)
    assert worst <= TOLERANCE, f"gradients differ by {worst:.3g}"
    assert packed_bytes < 0.5 * plain_bytes, (packed_bytes, plain_bytes)


def test_bf16_autocast_training_step_runs_close_to_float32():
    torch.manual_seed(0)
    model = OneNIP(**TINY).train()
    CPUTrainingKernels().install(model.reconstructor)
    features = torch.randn(6, model.feature_channels, 8, 8)
    expected, _, _ = reconstructor_step(model, features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        actual, grads, _ = reconstructor_step(model, features)
    assert all(torch.isfinite(g).all() for g in grads.values())
    scale = float(expected.abs().max())
    assert float((actual.float() - expected).abs().max()) < 0.05 * scale


def gradient_moments(model: OneNIP, features: Tensor, target: Tensor, draws: int) -> tuple[Tensor, Tensor]:
    """Mean of the reconstructor's gradient over dropout draws, and the variance of that mean."""
    total = squares = torch.zeros((), dtype=torch.float64)
    for _ in range(draws):
        model.zero_grad(set_to_none=True)
        reconstruction = model.reconstruct(features[:4], features[4:])
        (reconstruction - target).square().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in model.reconstructor.parameters()]).double()
        total, squares = total + grad, squares + grad.square()
    mean = total / draws
    return mean, (squares / draws - mean.square()) / draws


def test_packed_path_has_the_gradient_distribution_of_torch_dropout():
    """Against the real F.scaled_dot_product_attention and nn.Dropout (torch's own masks): over many draws,
    the gradients' mean and spread agree, so training sees the same noise, not only the same formula."""
    torch.manual_seed(0)
    model = OneNIP(**{**TINY, "jitter_prob": 0.0}).train()
    features = torch.randn(6, model.feature_channels, 8, 8)
    target = torch.randn(4, model.feature_channels, 8, 8)
    draws = 150
    kernels = CPUTrainingKernels()
    kernels.install(model.reconstructor)
    torch.manual_seed(1)
    packed_mean, packed_var = gradient_moments(model, features, target, draws)
    kernels.remove(model.reconstructor)
    torch.manual_seed(2)
    torch_mean, torch_var = gradient_moments(model, features, target, draws)
    varies = (packed_var + torch_var) > 0
    z = ((packed_mean - torch_mean) / (packed_var + torch_var).sqrt())[varies]
    assert abs(float(z.mean())) < 0.05 and 0.85 < float(z.std()) < 1.15, (float(z.mean()), float(z.std()))
    spread_ratio = float(packed_var[varies].sum() / torch_var[varies].sum())
    assert 0.9 < spread_ratio < 1.1, spread_ratio
