"""Stable Diffusion's text-conditioned U-Net: diffusers' `UNet2DConditionModel` (SD 1.x / 2.x).

The layout and the parameter names follow diffusers, so a pipeline's `unet/` loads by name
(`distill_jax.interop.unet`): every Flax module is named after its diffusers counterpart with
'.N' written '_N' ('down_blocks.0.resnets.1.conv1' is down_blocks_0/resnets_1/conv1 here).
- time: diffusers' `Timesteps(c0, flip_sin_to_cos, freq_shift)` features of the network's
  timestep, then `time_embedding` (Dense -> SiLU -> Dense to 4 c0);
- `conv_in`, then per level `layers_per_block` ResNet blocks (each followed by a spatial
  transformer in a cross-attention level) and a stride-2 conv except at the last level; a
  middle block (ResNet, transformer, ResNet); per level `layers_per_block + 1` ResNet blocks
  on the skip-concatenated features (with transformers where the level has them) and a
  nearest-neighbour 2x upsample except at the top; GroupNorm -> SiLU -> `conv_out`;
- spatial transformer: GroupNorm (eps 1e-6) -> proj_in (1x1 conv, or a Dense with
  `use_linear_projection` as in SD 2.x) -> blocks of [LayerNorm, self-attention, LayerNorm,
  cross-attention to the text states, LayerNorm, GEGLU feed-forward] -> proj_out + residual.
  Heads follow diffusers' reading of `attention_head_dim`: it is the NUMBER of heads per level
  (SD 1.x: 8 heads everywhere; SD 2.x: 5, 10, 20, 20 heads of 64).

The text condition is the pipeline's prompt embedding [B, L, D] (`cross_attention_dim` D), all
L positions attended, as StableDiffusionPipeline passes no encoder attention mask.

Time: `__call__` takes t in [0, 1] and embeds the fractional timestep k(lambda(t)) of the
imported discrete schedule (`timestep_logsnrs`, `diffusion.discrete`), as the DiT does.
`on_timesteps` takes diffusers' own timestep (what its forward takes). A student adds the
guidance branch (zero-initialised last layer) to the time embedding that every ResNet block
receives, so it starts as its teacher.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.attention import attention
from distill_jax.diffusion.parameterisation import output_channels
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.models.embeddings import (
    GUIDANCE_BRANCH,
    GuidanceEmbedding,
    network_timestep,
)
from distill_jax.models.remat import rematted

Dtype = Any


def timestep_features(timestep: jax.Array, dim: int, flip_sin_to_cos: bool, shift: float):
    """diffusers' `Timesteps(dim, flip_sin_to_cos, downscale_freq_shift=shift)` of [B] steps."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - shift)
    args = jnp.asarray(timestep, jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(args), jnp.cos(args)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


def _group_norm(groups: int, eps: float, name: str) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, name=name)


class ResnetBlock(nn.Module):
    """diffusers' ResnetBlock2D (time scale-shift 'default', output scale 1)."""

    out_channels: int
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array) -> jax.Array:
        """Features [B, H, W, C] and the time embedding [B, E] -> [B, H, W, out_channels]."""
        c = self.out_channels
        h = nn.silu(_group_norm(self.groups, self.eps, "norm1")(x))
        h = nn.Conv(c, (3, 3), dtype=self.dtype, name="conv1")(h)
        t = nn.Dense(c, dtype=self.dtype, name="time_emb_proj")(nn.silu(temb))
        h = h + t[:, None, None, :]
        h = nn.silu(_group_norm(self.groups, self.eps, "norm2")(h))
        h = nn.Conv(c, (3, 3), dtype=self.dtype, name="conv2")(h)
        if x.shape[-1] != c:
            x = nn.Conv(c, (1, 1), dtype=self.dtype, name="conv_shortcut")(x)
        return x + h


class Attention(nn.Module):
    """diffusers' Attention: to_q / to_k / to_v (no bias), to_out.0 (with bias)."""

    heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """Attend from x [B, N, C] to context [B, L, D] (to x itself when None)."""
        dim = x.shape[-1]
        context = x if context is None else context
        head = dim // self.heads
        dense = lambda name: nn.DenseGeneral(  # noqa: E731
            (self.heads, head), use_bias=False, dtype=self.dtype, name=name
        )
        q, k, v = dense("to_q")(x), dense("to_k")(context), dense("to_v")(context)
        out = attention(q, k, v, implementation=self.attention).reshape(*x.shape[:-1], dim)
        return nn.Dense(dim, dtype=self.dtype, name="to_out_0")(out)


class GEGLU(nn.Module):
    """diffusers' GEGLU: Dense to 2 x inner, value * gelu(gate) (exact, erf GELU)."""

    inner: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """value * gelu(gate) of x [..., C] -> [..., inner]."""
        value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, -1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
    """diffusers' FeedForward(dim, mult=4, activation_fn='geglu'): net.0 (GEGLU), net.2."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., C] -> [..., C]."""
        h = GEGLU(4 * x.shape[-1], self.dtype, name="net_0")(x)
        return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class TransformerBlock(nn.Module):
    """diffusers' BasicTransformerBlock: self-attention, cross-attention, GEGLU feed-forward."""

    heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Tokens [B, N, C] attending to themselves and to context [B, L, D]."""
        norm = lambda name: nn.LayerNorm(1e-5, dtype=self.dtype, name=name)  # noqa: E731
        attend = lambda name: Attention(self.heads, self.dtype, self.attention, name=name)  # noqa: E731
        x = x + attend("attn1")(norm("norm1")(x))
        x = x + attend("attn2")(norm("norm2")(x), context)
        return x + FeedForward(self.dtype, name="ff")(norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel on feature maps: norm, proj_in, blocks, proj_out, residual."""

    heads: int
    layers: int
    groups: int
    linear_projection: bool
    dtype: Dtype = jnp.float32
    attention: str = "xla"
    remat: str = "none"

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """Feature map [B, H, W, C] conditioned on the text states [B, L, D]."""
        batch, height, width, c = x.shape
        h = _group_norm(self.groups, 1e-6, "norm")(x)
        proj = lambda name: (  # noqa: E731
            nn.Dense(c, dtype=self.dtype, name=name)
            if self.linear_projection
            else nn.Conv(c, (1, 1), dtype=self.dtype, name=name)
        )
        h = proj("proj_in")(h).reshape(batch, height * width, c)
        for i in range(self.layers):
            block = rematted(TransformerBlock, self.remat)(
                self.heads, self.dtype, self.attention, name=f"transformer_blocks_{i}"
            )
            h = block(h, context)
        return x + proj("proj_out")(h.reshape(batch, height, width, c))


class TimeEmbedding(nn.Module):
    """diffusers' TimestepEmbedding: linear_1 -> SiLU -> linear_2."""

    dim: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        """Timestep features [B, c0] -> [B, dim]."""
        h = nn.Dense(self.dim, dtype=self.dtype, name="linear_1")(features)
        return nn.Dense(self.dim, dtype=self.dtype, name="linear_2")(nn.silu(h))


class Block(nn.Module):
    """One level of the down or up path (diffusers' [CrossAttn]DownBlock2D / UpBlock2D).

    A down block returns its output and the skips it leaves; an up block takes them (`skips`,
    last one first) and concatenates one before each ResNet block.
    """

    out_channels: int
    num_resnets: int
    transformer: dict | None  # SpatialTransformer's keyword arguments, or None
    resample: bool  # a stride-2 conv (down) or 2x upsample and conv (up) at the end
    groups: int
    eps: float
    up: bool
    dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, h, emb, context, skips=None) -> tuple[jax.Array, list[jax.Array]]:
        """(output, the skips it leaves: every ResNet's output, and the downsampled one)."""
        out = []
        for j in range(self.num_resnets):
            if self.up:
                h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = rematted(ResnetBlock, self.remat)(
                self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{j}"
            )(h, emb)
            if self.transformer is not None:
                h = SpatialTransformer(
                    **self.transformer, groups=self.groups, dtype=self.dtype, name=f"attentions_{j}"
                )(h, context)
            out.append(h)
        if self.resample and self.up:
            h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest-neighbour 2x
            h = _Resample(h.shape[-1], 1, self.dtype, name="upsamplers_0")(h)
        elif self.resample:
            h = _Resample(self.out_channels, 2, self.dtype, name="downsamplers_0")(h)
            out.append(h)
        return h, out


class _Resample(nn.Module):
    """diffusers' Downsample2D (3x3 conv, stride 2, padding 1) or Upsample2D's conv."""

    channels: int
    stride: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        s = self.stride
        return nn.Conv(
            self.channels, (3, 3), strides=(s, s), padding=((1, 1), (1, 1)), dtype=self.dtype,
            name="conv",
        )(h)  # fmt: skip


class MidBlock(nn.Module):
    """diffusers' UNetMidBlock2DCrossAttn: ResNet, spatial transformer, ResNet."""

    out_channels: int
    transformer: dict
    groups: int
    eps: float
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, h, emb, context) -> jax.Array:
        """Features [B, h, w, C] -> [B, h, w, C]."""
        resnet = lambda j: rematted(ResnetBlock, self.transformer["remat"])(  # noqa: E731
            self.out_channels, self.groups, self.eps, self.dtype, name=f"resnets_{j}"
        )
        h = resnet(0)(h, emb)
        h = SpatialTransformer(
            **self.transformer, groups=self.groups, dtype=self.dtype, name="attentions_0"
        )(h, context)
        return resnet(1)(h, emb)


class SDUNet(nn.Module):
    """UNet2DConditionModel of SD 1.x / 2.x. See the module docstring.

    Attributes:
      block_out_channels: channels per level (c0, c1, ...).
      cross_attention: per level, whether it has spatial transformers
        (CrossAttnDownBlock2D / CrossAttnUpBlock2D rather than DownBlock2D / UpBlock2D).
      heads: attention heads per level (diffusers' `attention_head_dim`, see above).
      transformer_layers: transformer blocks per spatial transformer, per level.
      layers_per_block, norm_groups, norm_eps, linear_projection, flip_sin_to_cos,
      freq_shift: diffusers' config keys of the same meaning.
      out_channels: output channels (the data's).
      timestep_logsnrs: the imported discrete schedule's lambda_k.
    """

    block_out_channels: tuple[int, ...]
    cross_attention: tuple[bool, ...]
    heads: tuple[int, ...]
    transformer_layers: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    norm_groups: int = 32
    norm_eps: float = 1e-5
    linear_projection: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    text_dim: int = 768  # cross_attention_dim: the width of the text states
    timestep_logsnrs: tuple[float, ...] = ()
    flow_timesteps: int = 0  # a flow-matching teacher's num_train_timesteps (its time input)
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    parameterisation: str = "eps"
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS
    remat: str = "none"  # models.remat.POLICIES, for each ResNet and transformer block
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    both_shift: float = 0.0  # log-SNR where a 'both' head weighs x and eps equally

    def timestep(self, t: jax.Array) -> jax.Array:
        """The network's timestep for t [B] in [0, 1].

        k(lambda(t)) of the imported discrete schedule; without one, 1000 * the log-SNR mapped
        to [0, 1], as the other networks here.
        """
        logsnr = logsnr_schedule_cosine(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)
        return network_timestep(
            logsnr, timestep_logsnrs=self.timestep_logsnrs, flow_timesteps=self.flow_timesteps
        )

    def __call__(self, z, t, context, w=None, train: bool = False) -> jax.Array:
        """The prediction [B, H, W, C] at times t [B] in [0, 1] for text states [B, L, D]."""
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
        return self.on_timesteps(z, self.timestep(t), context, w, train)

    def _block(self, level: int, index: int, up: bool) -> Block:
        transformer = None
        if self.cross_attention[level]:
            transformer = self._transformer(level)
        levels = len(self.block_out_channels)
        return Block(
            out_channels=self.block_out_channels[level],
            num_resnets=self.layers_per_block + int(up),
            transformer=transformer,
            resample=index < levels - 1,
            groups=self.norm_groups,
            eps=self.norm_eps,
            up=up,
            dtype=self.dtype,
            remat=self.remat,
            name=f"{'up' if up else 'down'}_blocks_{index}",
        )

    def _transformer(self, level: int) -> dict:
        return dict(
            heads=self.heads[level],
            layers=self.transformer_layers[level],
            linear_projection=self.linear_projection,
            attention=self.attention,
            remat=self.remat,
        )

    @nn.compact
    def on_timesteps(self, z, timestep, context, w=None, train: bool = False) -> jax.Array:
        """The prediction [B, H, W, C] at diffusers' timestep [B] (what its forward takes)."""
        del train  # SD U-Nets train without dropout
        batch, levels, c0 = z.shape[0], len(self.block_out_channels), self.block_out_channels[0]
        context = jnp.asarray(context, self.dtype)
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (batch,))
        features = timestep_features(timestep, c0, self.flip_sin_to_cos, self.freq_shift)
        emb = TimeEmbedding(4 * c0, self.dtype, name="time_embedding")(features)
        if self.use_guidance:
            emb = emb + GuidanceEmbedding(
                4 * c0, self.guidance_fourier_dim, dtype=self.dtype, name=GUIDANCE_BRANCH
            )(w, batch)
        h = nn.Conv(c0, (3, 3), dtype=self.dtype, name="conv_in")(z.astype(self.dtype))
        skips = [h]
        for i in range(levels):
            h, out = self._block(i, i, up=False)(h, emb, context)
            skips += out
        h = MidBlock(
            self.block_out_channels[-1], self._transformer(levels - 1), self.norm_groups,
            self.norm_eps, self.dtype, name="mid_block",
        )(h, emb, context)  # fmt: skip
        for i in range(levels):
            h, _ = self._block(levels - 1 - i, i, up=True)(h, emb, context, skips)
        h = nn.silu(_group_norm(self.norm_groups, self.norm_eps, "conv_norm_out")(h))
        out_channels = output_channels(self.parameterisation, self.out_channels)
        h = nn.Conv(out_channels, (3, 3), dtype=self.dtype, name="conv_out")(h)
        return h.astype(jnp.float32)


def check_image_size(height: int, width: int, levels: int) -> None:
    """Refuse an image size the U-Net cannot halve between its levels."""
    factor = 2 ** (levels - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"the image (or latent) size {height}x{width} is not divisible by {factor}, which "
            f"the SD U-Net's {levels} levels halve it by."
        )
