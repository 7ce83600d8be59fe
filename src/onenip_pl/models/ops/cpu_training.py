"""Training the reconstructor on a CPU in less time and memory: packed dropout masks drawn by NumPy, and
attention whose backward recomputes its probabilities instead of keeping them.

Why it exists: autograd through ``F.scaled_dot_product_attention``'s CPU path with dropout (the only CPU
path that has dropout) keeps three float tensors of (images x heads x tokens x tokens) per attention, most
of a training step's memory; and torch draws Bernoulli variates one at a time on non-Intel CPUs (about
5 ns each, a fifth of a step). The maths is unchanged: dropout keeps an entry with probability 1 - p and
scales by 1 / (1 - p). It only acts while training on CPU tensors with gradients and outside
torch.compile; everywhere else the reconstructor's own SDPA and nn.Dropout run.

:class:`CPUTrainingKernels` owns the reused buffers and is installed into one reconstructor (its attention
layers and dropout modules) and removed again, by the LightningModule's ``cpu_training_kernels`` switch.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onenip_pl.errors import ConfigError, check_choice
from onenip_pl.models.reconstructor import Attention, ReluDropout

_UINT32_RANGE = 2**32


def dropout_keep_bits(count: int, p: float) -> Tensor:
    """Dropout's keep mask for ``count`` entries, 1 (kept) with probability 1 - p, packed eight to a byte.

    32 random bits per entry from NumPy's PCG64 are compared with (1 - p) * 2^32: about 1 ns per entry,
    the Bernoulli distribution to 2^-32. The stream is seeded from torch's default generator, so
    torch.manual_seed, Lightning's seed_everything and the RNG states saved in checkpoints decide the masks.
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability {p} must lie strictly between 0 and 1 here.")
    seed = int(torch.randint(torch.iinfo(torch.int64).max, ()))
    bits = np.random.PCG64(seed).random_raw((count + 1) // 2).view(np.uint32)[:count]
    threshold = min(round((1.0 - p) * _UINT32_RANGE), _UINT32_RANGE - 1)
    return torch.from_numpy(np.packbits(bits < threshold))


def applies(x: Tensor) -> bool:
    """Whether the packed-mask functions apply: a CPU tensor, gradients wanted, not being compiled."""
    return x.device.type == "cpu" and torch.is_grad_enabled() and not torch.compiler.is_compiling()


class Workspace:
    """Buffers by name (and dtype, device), grown to the largest size asked for and reused.

    Fresh (images x heads x tokens x tokens) temporaries at every step would be new memory mappings each
    time, and their page faults cost more than the arithmetic on them. A view is valid until the next
    request for the same name; one workspace serves one reconstructor, whose layers run one after another
    (autograd runs a CPU backward in the thread that called it).
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
        key = (name, like.dtype, like.device)
        count = math.prod(shape)
        if key not in self._buffers or self._buffers[key].numel() < count:
            self._buffers[key] = torch.empty(count, dtype=like.dtype, device=like.device)
        return self._buffers[key][:count].view(shape)

    def release(self) -> None:
        self._buffers.clear()

    def float_mask(self, packed: Tensor, like: Tensor) -> Tensor:
        """A packed keep mask as 0/1 in ``like``'s dtype and shape (multiplying by a one-byte mask directly
        would cast it into a fresh float temporary each time)."""
        kept = torch.from_numpy(np.unpackbits(packed.numpy(), count=like.numel()))
        return self.get("mask", tuple(like.shape), like).copy_(kept.view(like.shape))

    def attention_probabilities(self, scaled_q: Tensor, k: Tensor, bias: Tensor | None) -> Tensor:
        """softmax(scaled_q k^T + bias) over the keys for (batch, tokens, d) inputs, in a reused buffer; a
        low-precision softmax is taken in float32."""
        shape = (scaled_q.shape[0], scaled_q.shape[1], k.shape[1])
        scores = torch.bmm(scaled_q, k.transpose(1, 2), out=self.get("scores", shape, scaled_q))
        if bias is not None:
            scores = scores.add_(bias)
        if scores.dtype in (torch.float16, torch.bfloat16):
            return scores.copy_(torch.softmax(scores, dim=-1, dtype=torch.float32))
        return torch.softmax(scores, dim=-1, out=scores)


class DropoutAttention(torch.autograd.Function):
    """(softmax(q k^T / sqrt(d) + bias) * mask / (1 - p)) v for (images x heads, tokens, d) inputs of one
    dtype, keeping a one-bit mask and recomputing the probabilities in backward. Autocast is off inside
    (the caller's projections already ran under it)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(
        ctx, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, p: float, workspace: Workspace
    ) -> Tensor:
        with torch.autocast("cpu", enabled=False):
            scaled_q = q * q.shape[-1] ** -0.5
            probabilities = workspace.attention_probabilities(scaled_q, k, bias)
            kept = dropout_keep_bits(probabilities.numel(), p)
            output = torch.bmm(probabilities.mul_(workspace.float_mask(kept, probabilities)), v).div_(1.0 - p)
        ctx.p, ctx.workspace = p, workspace
        ctx.save_for_backward(scaled_q, k, v, bias, kept, output)
        return output

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, Tensor, Tensor, None, None, None]:
        scaled_q, k, v, bias, kept, output = ctx.saved_tensors
        workspace: Workspace = ctx.workspace
        # 1 / (1 - p) applied to the small (tokens x d) gradient instead of a (tokens x tokens) one
        grad_output = grad_output / (1.0 - ctx.p)
        probabilities = workspace.attention_probabilities(scaled_q, k, bias)
        mask = workspace.float_mask(kept, probabilities)
        # gradient of the probabilities, then through the softmax: (grad - sum(grad * probabilities) over the
        # keys) * probabilities, in place
        grad = torch.bmm(grad_output, v.transpose(1, 2), out=workspace.get("grad", probabilities.shape, v))
        grad = grad.mul_(mask)
        # sum(grad * probabilities) over the keys equals (1 - p) sum(grad_output * output) over d: a small
        # product instead of a (tokens x tokens) one
        row_term = torch.linalg.vecdot(grad_output, output).mul_(1.0 - ctx.p).unsqueeze(-1)
        grad = grad.sub_(row_term).mul_(probabilities)
        grad_v = torch.bmm(probabilities.mul_(mask).transpose(1, 2), grad_output)
        grad_q = torch.bmm(grad, k).mul_(scaled_q.shape[-1] ** -0.5)
        grad_k = torch.bmm(grad.transpose(1, 2), scaled_q)
        return grad_q, grad_k, grad_v, None, None, None


class PackedDropoutFunction(torch.autograd.Function):
    """F.dropout keeping a packed mask (1/32 of a float one) for backward instead of a float noise tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, workspace: Workspace) -> Tensor:
        kept = dropout_keep_bits(x.numel(), p)
        output = x.clone().mul_(workspace.float_mask(kept, x)).div_(1.0 - p)
        ctx.p, ctx.workspace = p, workspace
        ctx.save_for_backward(kept)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (kept,) = ctx.saved_tensors
        passed = grad_output.mul(ctx.workspace.float_mask(kept, grad_output))
        return passed.div_(1.0 - ctx.p), None, None


class PackedReluDropoutFunction(torch.autograd.Function):
    """dropout(relu(x)) keeping only its output for backward: an output is positive exactly where the
    input was positive and kept, so neither the input nor a mask needs to be kept."""

    @staticmethod
    def forward(ctx, x: Tensor, p: float, workspace: Workspace) -> Tensor:
        kept = dropout_keep_bits(x.numel(), p)
        output = F.relu(x).mul_(workspace.float_mask(kept, x)).div_(1.0 - p)
        ctx.p = p
        ctx.save_for_backward(output)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (output,) = ctx.saved_tensors
        # ReLU's own backward kernel: the gradient where the saved output is positive, else 0
        passed = torch.ops.aten.threshold_backward(grad_output, output, 0.0)
        return passed.div_(1.0 - ctx.p), None, None


class PackedDropout(nn.Dropout):
    """nn.Dropout whose CPU training uses PackedDropoutFunction; elsewhere it is nn.Dropout."""

    function = PackedDropoutFunction

    def __init__(self, p: float, workspace: Workspace) -> None:
        super().__init__(p)
        self.workspace = workspace

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.p > 0.0 and x.requires_grad and applies(x):
            return self.function.apply(x, self.p, self.workspace)
        return super().forward(x)


class PackedReluDropout(PackedDropout):
    """ReluDropout whose CPU training uses PackedReluDropoutFunction; elsewhere it is ReluDropout."""

    function = PackedReluDropoutFunction

    def forward(self, x: Tensor) -> Tensor:
        if self.training and self.p > 0.0 and x.requires_grad and applies(x):
            return self.function.apply(x, self.p, self.workspace)
        return super().forward(F.relu(x))


# what install() puts in place of each plain layer, and remove() back
_PACKED = {nn.Dropout: PackedDropout, ReluDropout: PackedReluDropout}
_PLAIN = {packed: plain for plain, packed in _PACKED.items()}


class CPUTrainingKernels:
    """The packed-mask attention and dropout, installed into one reconstructor and owning its workspace."""

    def __init__(self) -> None:
        self.workspace = Workspace()

    def attention(
        self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0
    ) -> Tensor:
        """Called like F.scaled_dot_product_attention on (batch, heads, tokens, d) tensors."""
        if dropout_p > 0.0 and applies(q):
            flat = (x.flatten(0, 1) for x in (q, k, v))
            return DropoutAttention.apply(*flat, attn_mask, dropout_p, self.workspace).view(q.shape)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)

    def install(self, reconstructor: nn.Module) -> None:
        for module in list(reconstructor.modules()):
            if isinstance(module, Attention):
                module.kernel = self.attention
            for name, child in list(module.named_children()):
                if type(child) in _PACKED:
                    setattr(module, name, _PACKED[type(child)](child.p, self.workspace))

    def remove(self, reconstructor: nn.Module) -> None:
        for module in list(reconstructor.modules()):
            if isinstance(module, Attention):
                module.kernel = None
            for name, child in list(module.named_children()):
                if type(child) in _PLAIN:
                    setattr(module, name, _PLAIN[type(child)](child.p))
        self.workspace.release()


KERNEL_SWITCH = ("auto", "on", "off")


def training_kernels(switch: str, device: torch.device) -> CPUTrainingKernels | None:
    """The kernels to install for training on ``device``: ``auto`` on a CPU, ``on`` (CPU only), ``off``."""
    check_choice("model.cpu_training_kernels", switch, KERNEL_SWITCH)
    on_cpu = torch.device(device).type == "cpu"
    if switch == "on" and not on_cpu:
        raise ConfigError(
            "model.cpu_training_kernels=on only applies when training on a CPU; use auto or off"
        )
    return CPUTrainingKernels() if switch == "on" or (switch == "auto" and on_cpu) else None
