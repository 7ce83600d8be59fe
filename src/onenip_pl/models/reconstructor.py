"""Prompt-conditioned reconstructor (spec §5): a transformer rebuilding query features from a normal prompt.

Tokens are batch-first here (image, token, channel); token t = y * grid + x. The neighbour mask forbids a
token to attend to its own window, so it cannot copy itself and must reconstruct from elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onenip_pl.errors import ConfigError


def init_xavier(module: nn.Module) -> None:
    """The authors' initialisation: Xavier-uniform weight, zero bias in every Linear and conv."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)


def default_neighbor_size(feature_size: int) -> int:
    """The authors' window: half the grid (7x7 at 224 px, 9x9 at 256, 11x11 at 320)."""
    return feature_size // 2


def neighbor_attention_bias(feature_size: int, neighbor_size: int) -> Tensor:
    """Additive (tokens x tokens) bias: -inf on keys inside the window centred on the query token, else 0.

    The window covers rows y - n//2 ... y + n//2 (likewise columns), clipped at the borders, the token itself
    included.
    """
    rows, cols = torch.meshgrid(torch.arange(feature_size), torch.arange(feature_size), indexing="ij")
    rows, cols = rows.flatten(), cols.flatten()
    half = neighbor_size // 2
    inside = ((rows[:, None] - rows[None, :]).abs() <= half) & ((cols[:, None] - cols[None, :]).abs() <= half)
    if inside.all(dim=1).any():
        raise ConfigError(
            f"neighbor_size={neighbor_size} masks the whole {feature_size}x{feature_size} grid for a query, "
            "leaving it nothing to attend to; use a smaller neighbor_size or a larger image_size."
        )
    return torch.zeros(inside.shape).masked_fill(inside, float("-inf"))


AttentionKernel = Callable[..., Tensor]


class ReluDropout(nn.Dropout):
    """ReLU, then dropout: the activation of the encoder's feed-forward block (DETR's)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.relu(x))


class Attention(nn.Module):
    """Multi-head attention holding nn.MultiheadAttention's parameters (the authors' weights load 1:1).

    Computed by ``kernel`` (``F.scaled_dot_product_attention`` when None, looked up at call time), called
    like it on (batch, heads, tokens, head dim) tensors; ``dropout`` acts on the attention probabilities
    during training, as in nn.MultiheadAttention. onenip_pl.models.ops swaps the kernel for CPU training.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"hidden_dim={dim} must be divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.dropout = dropout
        self.kernel: AttentionKernel | None = None
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def _heads(self, tokens: Tensor) -> Tensor:
        batch, length, dim = tokens.shape
        return tokens.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, bias: Tensor | None = None) -> Tensor:
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, weight_q, bias_q))
        k = self._heads(F.linear(key, weight_k, bias_k))
        v = self._heads(F.linear(value, weight_v, bias_v))
        mask = None if bias is None else bias.to(q.dtype)
        kernel = self.kernel or F.scaled_dot_product_attention
        attended = kernel(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        batch, _, length, _ = attended.shape
        return self.out_proj(attended.transpose(1, 2).reshape(batch, length, -1))


class LearnedPositionEmbedding(nn.Module):
    """Row and column tables, U(0,1) init; token (y, x) gets concat(col[x], row[y])."""

    def __init__(self, feature_size: int, dim: int) -> None:
        super().__init__()
        if dim % 2:
            raise ConfigError(f"hidden_dim={dim} must be even: half of it embeds rows, half columns.")
        self.feature_size = feature_size
        self.row_embed = nn.Embedding(feature_size, dim // 2)
        self.col_embed = nn.Embedding(feature_size, dim // 2)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self) -> Tensor:
        """(tokens, dim), the same for every image."""
        n = self.feature_size
        columns = self.col_embed.weight.unsqueeze(0).expand(n, n, -1)
        rows = self.row_embed.weight.unsqueeze(1).expand(n, n, -1)
        return torch.cat([columns, rows], dim=-1).flatten(0, 1)


class EncoderLayer(nn.Module):
    """Post-norm self-attention + feed-forward layer (DETR style)."""

    def __init__(self, dim: int, num_heads: int, feedforward_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = Attention(dim, num_heads, dropout)
        self.attn_norm = nn.LayerNorm(dim)
        self.ffn_in = nn.Linear(dim, feedforward_dim)
        self.ffn_out = nn.Linear(feedforward_dim, dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.ffn_activation = ReluDropout(dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, pos: Tensor, bias: Tensor) -> Tensor:
        positioned = tokens + pos
        attended = self.self_attn(positioned, positioned, tokens, bias)
        tokens = self.attn_norm(tokens + self.dropout(attended))
        hidden = self.ffn_out(self.ffn_activation(self.ffn_in(tokens)))
        return self.ffn_norm(tokens + self.dropout(hidden))


class Encoder(nn.Module):
    """Each image is its own sequence: query and prompt images share the layers, never attention."""

    def __init__(
        self, num_layers: int, dim: int, num_heads: int, feedforward_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            EncoderLayer(dim, num_heads, feedforward_dim, dropout) for _ in range(num_layers)
        )

    def forward(self, tokens: Tensor, pos: Tensor, bias: Tensor) -> Tensor:
        for layer in self.layers:
            tokens = layer(tokens, pos, bias)
        return tokens


class DecoderLayer(nn.Module):
    """Bidirectional layer: the prompt stream reads the query, then the query stream reads the prompt.

    The MLP has no inner dropout (the authors' MLP block ignores its dropout argument).
    """

    def __init__(self, dim: int, num_heads: int, feedforward_dim: int, dropout: float) -> None:
        super().__init__()
        self.prompt_attn = Attention(dim, num_heads, dropout)
        self.prompt_attn_norm = nn.LayerNorm(dim)
        self.mlp_in = nn.Linear(dim, feedforward_dim)
        self.mlp_out = nn.Linear(feedforward_dim, dim)
        self.mlp_norm = nn.LayerNorm(dim)
        self.query_attn = Attention(dim, num_heads, dropout)
        self.query_attn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, prompt: Tensor, query: Tensor, pos: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
        attended = self.prompt_attn(prompt + pos, query + pos, query, bias)
        prompt = self.prompt_attn_norm(prompt + self.dropout(attended))
        prompt = self.mlp_norm(prompt + self.dropout(self.mlp_out(F.relu(self.mlp_in(prompt)))))
        attended = self.query_attn(query + pos, prompt + pos, prompt, bias)
        query = self.query_attn_norm(query + self.dropout(attended))
        return prompt, query


class Decoder(nn.Module):
    """Decoder layers, one unmasked prompt-to-query attention, a LayerNorm; returns the prompt stream."""

    def __init__(
        self, num_layers: int, dim: int, num_heads: int, feedforward_dim: int, dropout: float
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderLayer(dim, num_heads, feedforward_dim, dropout) for _ in range(num_layers)
        )
        self.final_attn = Attention(dim, num_heads, dropout)
        self.final_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, prompt: Tensor, query: Tensor, pos: Tensor, bias: Tensor) -> Tensor:
        for layer in self.layers:
            prompt, query = layer(prompt, query, pos, bias)
        prompt = prompt + self.dropout(self.final_attn(prompt + pos, query + pos, query))
        return self.final_norm(prompt)


class Reconstructor(nn.Module):
    """Reconstructs each query image's features from its encoded prompt (spec §5, steps 1-8)."""

    def __init__(
        self,
        feature_channels: int,
        feature_size: int,
        hidden_dim: int = 256,
        num_heads: int = 8,
        feedforward_dim: int = 1024,
        dropout: float = 0.1,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        neighbor_size: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= jitter_prob <= 1.0:
            raise ConfigError(f"jitter_prob={jitter_prob} must lie in [0, 1].")
        self.feature_size = feature_size
        self.jitter_scale = jitter_scale
        self.jitter_prob = jitter_prob
        self.neighbor_size = default_neighbor_size(feature_size) if neighbor_size is None else neighbor_size
        self.input_proj = nn.Linear(feature_channels, hidden_dim)
        self.pos_embed = LearnedPositionEmbedding(feature_size, hidden_dim)
        self.encoder = Encoder(num_encoder_layers, hidden_dim, num_heads, feedforward_dim, dropout)
        self.decoder = Decoder(num_decoder_layers, hidden_dim, num_heads, feedforward_dim, dropout)
        self.output_proj = nn.Linear(hidden_dim, feature_channels)
        self.register_buffer(
            "attention_bias", neighbor_attention_bias(feature_size, self.neighbor_size), persistent=False
        )
        init_xavier(self)

    def jitter(self, tokens: Tensor) -> Tensor:
        """Feature jitter x + eps * (|x| / C) * scale, on the whole batch with probability jitter_prob."""
        if self.jitter_prob == 0.0 or torch.rand(()) >= self.jitter_prob:
            return tokens
        scale = tokens.norm(dim=-1, keepdim=True) / tokens.shape[-1] * self.jitter_scale
        # a contiguous draw: torch fills a strided tensor one value at a time
        noise = torch.randn(tokens.shape, dtype=tokens.dtype, device=tokens.device)
        return tokens + noise * scale

    def forward(self, query_features: Tensor, prompt_features: Tensor) -> Tensor:
        """N x C x h x w query features from M prompts (N a multiple of M; prompt i serves i, i+M, ...)."""
        num_queries, num_prompts = query_features.shape[0], prompt_features.shape[0]
        if num_prompts == 0 or num_queries % num_prompts:
            raise ValueError(f"{num_queries} query images cannot share {num_prompts} prompts evenly.")
        features = torch.cat([query_features, prompt_features])
        _, channels, height, width = features.shape
        if (height, width) != (self.feature_size, self.feature_size):
            raise ValueError(
                f"features are {height}x{width}, the reconstructor was built for a "
                f"{self.feature_size}x{self.feature_size} grid (image_size / 16)."
            )
        tokens = features.flatten(2).transpose(1, 2)
        if self.training:
            tokens = self.jitter(tokens)
        tokens = self.input_proj(tokens)
        pos = self.pos_embed()
        encoded = self.encoder(tokens, pos, self.attention_bias)
        query_tokens = encoded[:num_queries]
        prompt_tokens = encoded[num_queries:].repeat(num_queries // num_prompts, 1, 1)
        decoded = self.decoder(prompt_tokens, query_tokens, pos, self.attention_bias)
        reconstructed = self.output_proj(decoded)
        return reconstructed.transpose(1, 2).reshape(num_queries, channels, height, width)
