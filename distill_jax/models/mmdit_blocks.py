"""The blocks of SD3's MMDiT (`models.mmdit`), named as diffusers' SD3Transformer2DModel's.

Timestep features, the cropped 2-D sine-cosine positions, the patch embedding, the time and
pooled-text embedding, adaLN modulation, the joint attention over image and text tokens (with
SD3.5's qk RMSNorm and its image-only second attention) and the joint block.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attention import attention

Dtype = Any

TIMESTEP_FEATURES = 256  # diffusers' CombinedTimestepTextProjEmbeddings: Timesteps(256)
LAYER_NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of SD3Transformer2DModel
OUTPUT_LAYER = "proj_out"  # kernel [hidden, p * p * out_channels], last axis (p, q, channel)
_ZERO = nn.initializers.zeros  # adaLN-Zero: modulation and output layers start at zero


def timestep_features(timestep: jax.Array) -> jax.Array:
    """diffusers' Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0) of [B] steps.

    Frequencies exp(-log(10000) i / 128), i = 0..127 (DiT's shift 1 divides by 127): cosines
    first, then sines, in float32 as diffusers computes them.
    """
    half = TIMESTEP_FEATURES // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(timestep, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[M, dim]: sin then cos of float64 positions times 1 / 10000^(i / (dim / 2))."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def position_table(dim: int, max_size: int, base_size: int) -> np.ndarray:
    """[max_size, dim / 2]: one axis' half of diffusers' pos_embed.pos_embed buffer.

    The buffer (get_2d_sincos_pos_embed of a max_size^2 grid, base size sample_size // p) holds
    at grid cell (row r, column c), row-major, the features [table[c], table[r]]. Positions are
    index / (max_size / base_size) in float32, as diffusers computes them.
    """
    positions = np.arange(max_size, dtype=np.float32) / np.float32(max_size / base_size)
    return _sincos_1d(dim // 2, positions)


def cropped_positional_embedding(
    dim: int, grid_h: int, grid_w: int, max_size: int, base_size: int
) -> np.ndarray:
    """PatchEmbed.cropped_pos_embed: the centre grid_h x grid_w of the table, [h * w, dim]."""
    if dim % 4:
        raise ValueError(f"the MMDiT width {dim} must be divisible by 4 (2-D sine-cosine).")
    if grid_h > max_size or grid_w > max_size:
        raise ValueError(
            f"a {grid_h}x{grid_w} patch grid exceeds pos_embed_max_size={max_size}: accepted "
            f"at most {max_size} patches a side."
        )
    table = position_table(dim, max_size, base_size)
    top, left = (max_size - grid_h) // 2, (max_size - grid_w) // 2
    cols = np.broadcast_to(table[None, left : left + grid_w], (grid_h, grid_w, dim // 2))
    rows = np.broadcast_to(table[top : top + grid_h, None], (grid_h, grid_w, dim // 2))
    return np.concatenate([cols, rows], axis=-1).reshape(grid_h * grid_w, dim).astype(np.float32)


def _layer_norm(name: str) -> nn.LayerNorm:
    # Exact variance (not E[x^2] - E[x]^2), as DiT's: the residual stream has a large mean.
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPS,
        use_bias=False,
        use_scale=False,
        use_fast_variance=False,
        name=name,
    )


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN: x (1 + scale) + shift, per example over the tokens."""
    return x * (1.0 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """diffusers' PatchEmbed with pos_embed_max_size: p x p conv, plus the cropped sincos."""

    hidden: int
    patch_size: int
    max_size: int
    base_size: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, H, W, C] -> tokens [B, (H / p) * (W / p), hidden], row-major."""
        batch, height, width, _ = z.shape
        p = self.patch_size
        if height % p or width % p:
            raise ValueError(f"the patch size {p} must divide the latent size {height}x{width}.")
        x = nn.Conv(
            self.hidden, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype, name="proj"
        )(z.astype(self.dtype))
        grid_h, grid_w = height // p, width // p
        pos = cropped_positional_embedding(
            self.hidden, grid_h, grid_w, self.max_size, self.base_size
        )
        return x.reshape(batch, grid_h * grid_w, self.hidden) + jnp.asarray(pos, x.dtype)[None]


class TwoLayer(nn.Module):
    """Dense -> SiLU -> Dense (diffusers' TimestepEmbedding and PixArtAlphaTextProjection)."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, F] -> [B, hidden]."""
        h = nn.Dense(self.hidden, dtype=self.dtype, name="linear_1")(x.astype(self.dtype))
        return nn.Dense(self.hidden, dtype=self.dtype, name="linear_2")(nn.silu(h))


class TimeTextEmbedding(nn.Module):
    """diffusers' CombinedTimestepTextProjEmbeddings: time MLP plus pooled-text MLP."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, timestep: jax.Array, pooled: jax.Array) -> jax.Array:
        """timestep [B] (diffusers' units), pooled [B, P] -> temb [B, hidden]."""
        t = TwoLayer(self.hidden, self.dtype, name="timestep_embedder")(timestep_features(timestep))
        return t + TwoLayer(self.hidden, self.dtype, name="text_embedder")(pooled)


class AdaNorm(nn.Module):
    """An adaptive LayerNorm's two halves: LayerNorm(x) and `chunks` rows of Dense(SiLU(temb)).

    With 6 chunks diffusers' AdaLayerNormZero (shift, scale, gate of attention and MLP), 9 its
    SD35AdaLayerNormZeroX (a second attention's three added), 2 its AdaLayerNormContinuous
    (scale, then shift). The Dense is `linear`, as diffusers names it.
    """

    hidden: int
    chunks: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """(LayerNorm(x) [B, T, hidden], the chunks, each [B, hidden])."""
        emb = nn.Dense(
            self.chunks * self.hidden, kernel_init=_ZERO, dtype=self.dtype, name="linear"
        )(nn.silu(temb))
        return _layer_norm("norm")(x), jnp.split(emb, self.chunks, axis=-1)


class FeedForward(nn.Module):
    """diffusers' FeedForward(activation 'gelu-approximate'): Dense 4x, tanh GELU, Dense."""

    hidden: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, T, hidden] -> [B, T, hidden]."""
        h = nn.Dense(4 * self.hidden, dtype=self.dtype, name="net_0_proj")(x)
        return nn.Dense(self.hidden, dtype=self.dtype, name="net_2")(nn.gelu(h, approximate=True))


class JointAttention(nn.Module):
    """diffusers' Attention under JointAttnProcessor2_0, on the image and the text stream.

    Image tokens project with to_q/k/v, text tokens with add_q/k/v_proj; with qk_norm
    'rms_norm' each stream's queries and keys are RMS-normalised per head (norm_q, norm_k,
    norm_added_q, norm_added_k). One softmax attention runs over the image tokens followed by
    the text tokens; the image part leaves through to_out_0, the text part through to_add_out
    (none when `context_pre_only`: the last block drops the text stream). Without a text
    stream (`context` None: SD3.5's attn2) it is self-attention over the image tokens.
    """

    hidden: int
    num_heads: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def _heads(self, x: jax.Array, names: tuple[str, ...]) -> list[jax.Array]:
        batch, tokens, _ = x.shape
        q, k, v = (
            nn.Dense(self.hidden, dtype=self.dtype, name=name)(x).reshape(
                batch, tokens, self.num_heads, self.hidden // self.num_heads
            )
            for name in names[:3]
        )
        if self.qk_norm == "rms_norm":
            q, k = (
                nn.RMSNorm(epsilon=LAYER_NORM_EPS, dtype=self.dtype, name=name)(a)
                for name, a in zip(names[3:], (q, k), strict=True)
            )
        return [q, k, v]

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, hidden], context [B, L, hidden] or None -> (x out, context out or None)."""
        batch, tokens, _ = x.shape
        qkv = self._heads(x, ("to_q", "to_k", "to_v", "norm_q", "norm_k"))
        if context is not None:
            added = self._heads(
                context, ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k")
            )
            qkv = [jnp.concatenate(pair, axis=1) for pair in zip(qkv, added, strict=True)]
        out = attention(*qkv, implementation=self.attention)
        out = out.reshape(batch, out.shape[1], self.hidden)
        x_out = nn.Dense(self.hidden, dtype=self.dtype, name="to_out_0")(out[:, :tokens])
        if context is None or self.context_pre_only:
            return x_out, None
        return x_out, nn.Dense(self.hidden, dtype=self.dtype, name="to_add_out")(out[:, tokens:])


class JointBlock(nn.Module):
    """diffusers' JointTransformerBlock: the image and text streams, one joint attention.

    Each stream has adaLN-Zero modulation (norm1, norm1_context), the joint attention, then a
    modulated LayerNorm and a tanh-GELU MLP (ff, ff_context). `dual_attention` (SD3.5's
    SD35AdaLayerNormZeroX blocks) adds a self-attention of the image stream (attn2) on a second
    modulation of the same normalised tokens. `context_pre_only` (the last block): the text
    stream is only read, with AdaLayerNormContinuous, and not returned.
    """

    hidden: int
    num_heads: int
    qk_norm: str | None = None
    context_pre_only: bool = False
    dual_attention: bool = False
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    def _attention(self, name: str, context_pre_only: bool = False) -> JointAttention:
        return JointAttention(
            self.hidden,
            self.num_heads,
            self.qk_norm,
            context_pre_only,
            self.dtype,
            self.attention,
            name=name,
        )

    @nn.compact
    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array
    ) -> tuple[jax.Array, jax.Array | None]:
        """x [B, T, hidden], context [B, L, hidden], temb [B, hidden] -> (x, context or None)."""
        normed, mods = AdaNorm(
            self.hidden, 9 if self.dual_attention else 6, self.dtype, name="norm1"
        )(x, temb)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[:6]
        c_normed, c_mods = AdaNorm(
            self.hidden, 2 if self.context_pre_only else 6, self.dtype, name="norm1_context"
        )(context, temb)
        # AdaLayerNormContinuous chunks (scale, shift); AdaLayerNormZero (shift, scale, ...).
        c_scale, c_shift = c_mods if self.context_pre_only else c_mods[1::-1]
        attended, c_attended = self._attention("attn", self.context_pre_only)(
            modulate(normed, shift_msa, scale_msa), modulate(c_normed, c_shift, c_scale)
        )
        x = x + gate_msa[:, None] * attended
        if self.dual_attention:
            shift_msa2, scale_msa2, gate_msa2 = mods[6:]
            attended2, _ = self._attention("attn2")(modulate(normed, shift_msa2, scale_msa2))
            x = x + gate_msa2[:, None] * attended2
        h = modulate(_layer_norm("norm2")(x), shift_mlp, scale_mlp)
        x = x + gate_mlp[:, None] * FeedForward(self.hidden, self.dtype, name="ff")(h)
        if self.context_pre_only:
            return x, None
        _, _, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = c_mods
        context = context + c_gate_msa[:, None] * c_attended
        h = modulate(_layer_norm("norm2_context")(context), c_shift_mlp, c_scale_mlp)
        h = FeedForward(self.hidden, self.dtype, name="ff_context")(h)
        return x, context + c_gate_mlp[:, None] * h
