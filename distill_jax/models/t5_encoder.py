"""transformers' T5EncoderModel in Flax: SD3's third text encoder (T5 v1.1 XXL there).

`T5Encoder(sizes)(ids, mask)` is T5EncoderModel's last_hidden_state. As transformers computes it
(transformers 5, float32):
- the token embedding `shared` (not scaled);
- `sizes.layers` pre-norm blocks: layer_0 = T5LayerNorm -> self-attention -> residual, layer_1
  = T5LayerNorm -> feed-forward -> residual; then final_layer_norm;
- T5LayerNorm is an RMS norm without mean and bias: x * rsqrt(mean(x^2) + eps) * weight;
- attention has no biases and no 1/sqrt(d_kv) scaling (the logits are q.k; here q is scaled
  by sqrt(d_kv) before `attention.attention`, which divides by it), and inner width
  heads * d_kv, which need not be d_model;
- a relative position bias [heads, L, L] is computed by the first block's attention from its
  `relative_attention_bias` table (buckets of key - query, bidirectional: half the buckets for
  each sign, exact below half of them, logarithmic up to max_distance) and added to every
  block's logits;
- feed-forward: wo(act(wi(x))) or, gated ('gated-*'), wo(act(wi_0(x)) * wi_1(x)), no biases;
  transformers' `feed_forward_proj` 'gated-gelu' is gelu_new (the tanh approximation), 'gelu'
  the exact erf one (`FEED_FORWARD`).

The parameter tree mirrors transformers' names: 'encoder.block.{i}.layer.{j}.X.weight' is
block_{i}/layer_{j}/X/(kernel|scale), 'shared.weight' is shared/embedding and
'encoder.final_layer_norm.weight' is final_layer_norm/scale (`t5_tensor_names`).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attention import attention
from distill_jax.text_encoder import padding_bias

# transformers' ACT2FN names a T5 feed_forward_proj can end in.
ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": functools.partial(nn.gelu, approximate=False),
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "silu": jax.nn.silu,
}


def feed_forward(feed_forward_proj: str) -> tuple[str, bool] | None:
    """(activation, gated) of a T5 config's feed_forward_proj, as T5Config reads it; else None.

    '{act}' or 'gated-{act}' with act a key of ACTIVATIONS; 'gated-gelu' is gelu_new.
    """
    if not isinstance(feed_forward_proj, str):
        return None
    parts = feed_forward_proj.split("-")
    gated = len(parts) == 2 and parts[0] == "gated"
    if len(parts) > 2 or (len(parts) == 2 and not gated) or parts[-1] not in ACTIVATIONS:
        return None
    return ("gelu_new" if feed_forward_proj == "gated-gelu" else parts[-1]), gated


@dataclasses.dataclass(frozen=True)
class T5Sizes:
    """A T5 encoder's sizes (transformers' T5Config names in the comments)."""

    width: int  # d_model
    head: int  # d_kv
    heads: int  # num_heads
    layers: int  # num_layers
    ffn: int  # d_ff
    vocab: int  # vocab_size
    buckets: int = 32  # relative_attention_num_buckets
    max_distance: int = 128  # relative_attention_max_distance
    eps: float = 1e-6  # layer_norm_epsilon
    activation: str = "relu"  # from feed_forward_proj, a key of ACTIVATIONS
    gated: bool = False  # feed_forward_proj 'gated-*'


def relative_position_buckets(length: int, buckets: int, max_distance: int) -> np.ndarray:
    """int32 [L, L]: transformers' bidirectional T5 bucket of (key - query) positions.

    Computed once per length in numpy with float32 steps in transformers' order (log of the
    float32 ratio, divided by the float64 constant rounded to float32, times the bucket count,
    truncated), so ties land in the same bucket as torch's.
    """
    position = np.arange(length)
    relative = position[None, :] - position[:, None]
    half = buckets // 2
    out = (relative > 0).astype(np.int64) * half
    distance = np.abs(relative)
    exact = half // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(distance.astype(np.float32) / np.float32(exact))
    scaled = ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    large = exact + np.where(distance < exact, 0, scaled).astype(np.int64)
    large = np.minimum(large, half - 1)
    return (out + np.where(distance < exact, distance, large)).astype(np.int32)


class RMSNorm(nn.Module):
    """T5LayerNorm: x * rsqrt(mean(x^2) + eps) * weight, in float32."""

    eps: float

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """h [..., D] normalised over its last axis."""
        scale = self.param("scale", nn.initializers.ones, (h.shape[-1],))
        h = h.astype(jnp.float32)
        return h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps) * scale


class T5Attention(nn.Module):
    """T5's self-attention: q, k, v, o without biases, no logit scaling, a position bias.

    The first block's (relative_bias) computes the position bias [1, heads, L, L] from its
    relative_attention_bias table and returns it; the others are given it. mask_bias (padding,
    or None) is added to the logits too, as transformers adds its mask.
    """

    sizes: T5Sizes
    relative_bias: bool = False

    @nn.compact
    def __call__(
        self, h: jax.Array, position_bias: jax.Array | None, mask_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        """(attention output [B, L, width], the position bias used) of h [B, L, width]."""
        sizes = self.sizes
        if self.relative_bias:
            table = self.param(
                "relative_attention_bias", nn.initializers.normal(1.0), (sizes.buckets, sizes.heads)
            )
            index = relative_position_buckets(h.shape[1], sizes.buckets, sizes.max_distance)
            position_bias = jnp.transpose(table[index], (2, 0, 1))[None]
        bias = position_bias if mask_bias is None else position_bias + mask_bias
        inner = sizes.heads * sizes.head
        q, k, v = (
            nn.Dense(inner, use_bias=False, name=name)(h).reshape(
                *h.shape[:-1], sizes.heads, sizes.head
            )
            for name in ("q", "k", "v")
        )
        out = attention(q * math.sqrt(sizes.head), k, v, bias=bias)  # cancels attention's scale
        out = nn.Dense(sizes.width, use_bias=False, name="o")(out.reshape(*h.shape[:-1], inner))
        return out, position_bias


class T5FeedForward(nn.Module):
    """T5DenseActDense (wi, wo) or T5DenseGatedActDense (wi_0, wi_1, wo)."""

    sizes: T5Sizes

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """[B, L, width] -> [B, L, width]."""
        sizes = self.sizes
        act = ACTIVATIONS[sizes.activation]
        if sizes.gated:
            inner = act(nn.Dense(sizes.ffn, use_bias=False, name="wi_0")(h))
            inner = inner * nn.Dense(sizes.ffn, use_bias=False, name="wi_1")(h)
        else:
            inner = act(nn.Dense(sizes.ffn, use_bias=False, name="wi")(h))
        return nn.Dense(sizes.width, use_bias=False, name="wo")(inner)


class _SelfAttentionLayer(nn.Module):
    """T5LayerSelfAttention: h + SelfAttention(layer_norm(h))."""

    sizes: T5Sizes
    relative_bias: bool

    @nn.compact
    def __call__(self, h, position_bias, mask_bias) -> tuple[jax.Array, jax.Array]:
        normed = RMSNorm(self.sizes.eps, name="layer_norm")(h)
        attend = T5Attention(self.sizes, self.relative_bias, name="SelfAttention")
        out, position_bias = attend(normed, position_bias, mask_bias)
        return h + out, position_bias


class _FeedForwardLayer(nn.Module):
    """T5LayerFF: h + DenseReluDense(layer_norm(h))."""

    sizes: T5Sizes

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        normed = RMSNorm(self.sizes.eps, name="layer_norm")(h)
        return h + T5FeedForward(self.sizes, name="DenseReluDense")(normed)


class _Block(nn.Module):
    """T5Block of an encoder: layer_0 (self-attention), layer_1 (feed-forward)."""

    sizes: T5Sizes
    relative_bias: bool

    @nn.compact
    def __call__(self, h, position_bias, mask_bias) -> tuple[jax.Array, jax.Array]:
        layer = _SelfAttentionLayer(self.sizes, self.relative_bias, name="layer_0")
        h, position_bias = layer(h, position_bias, mask_bias)
        return _FeedForwardLayer(self.sizes, name="layer_1")(h), position_bias


class T5Encoder(nn.Module):
    """T5EncoderModel: ids [B, L] (+ mask [B, L] or None) -> last_hidden_state [B, L, width].

    SD3 passes no mask (every position, padding included, is attended): mask=None.
    """

    sizes: T5Sizes

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """last_hidden_state [B, L, width] float32 of ids [B, L]; mask 1 where attended."""
        sizes = self.sizes
        h = nn.Embed(sizes.vocab, sizes.width, name="shared")(ids)
        mask_bias = None if mask is None else padding_bias(mask)
        position_bias = None
        for i in range(sizes.layers):
            h, position_bias = _Block(sizes, i == 0, name=f"block_{i}")(h, position_bias, mask_bias)
        return RMSNorm(sizes.eps, name="final_layer_norm")(h)


def t5_tensor_names(sizes: T5Sizes) -> dict[str, str]:
    """{transformers T5EncoderModel tensor name: `T5Encoder(sizes)` param path}.

    The embedding is 'shared.weight' (T5EncoderModel ties 'encoder.embed_tokens.weight' to
    it; a reader takes either name as this one tensor).
    """
    names = {"shared.weight": "shared/embedding"}
    names["encoder.final_layer_norm.weight"] = "final_layer_norm/scale"
    feed = ("wi_0", "wi_1", "wo") if sizes.gated else ("wi", "wo")
    for i in range(sizes.layers):
        torch_block, block = f"encoder.block.{i}.layer", f"block_{i}/layer"
        for leaf in ("q", "k", "v", "o"):
            names[f"{torch_block}.0.SelfAttention.{leaf}.weight"] = (
                f"{block}_0/SelfAttention/{leaf}/kernel"
            )
        if i == 0:
            names[f"{torch_block}.0.SelfAttention.relative_attention_bias.weight"] = (
                f"{block}_0/SelfAttention/relative_attention_bias"
            )
        for leaf in feed:
            names[f"{torch_block}.1.DenseReluDense.{leaf}.weight"] = (
                f"{block}_1/DenseReluDense/{leaf}/kernel"
            )
        for j in (0, 1):
            names[f"{torch_block}.{j}.layer_norm.weight"] = f"{block}_{j}/layer_norm/scale"
    return names
