"""Improved-DDPM style U-Net conditioned on log-SNR, class and (for a student) guidance weight.

Layout: input conv; per level `num_res_blocks` ResBlocks (plus self-attention where the
feature map's height is in `attn_resolutions`) and a strided-conv downsample between levels;
middle ResBlock -> attention -> ResBlock; the mirrored up path with skip concatenation and
nearest-neighbour upsampling; GroupNorm -> swish -> zero-initialised conv to the output.
ResBlocks take the conditioning vector as FiLM, norm(h) * (1 + scale) + shift. A text-conditioned
U-Net (`text_dim > 0`) normalises and projects the prompt's token states to the conditioning
width once, and follows every self-attention block with a cross-attention block whose queries
are the feature map's positions and whose keys and values come from those projected tokens
(padding masked out). Every residual
branch ends in a zero-initialised layer, and so does the output conv, so a fresh network
outputs exactly zero.

Parameters are float32; `dtype` is the compute dtype. The output is the raw network output in
float32; `distill_jax.models.denoiser` turns it into x-hat.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.attention import attention
from distill_jax.diffusion.parameterisation import output_channels
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN
from distill_jax.models.embeddings import (
    GUIDANCE_HEAD,
    STUDENT_EXTRA,
    ConditioningEmbedding,
    affine_guidance_output,
)
from distill_jax.models.norm import GroupNorm
from distill_jax.models.remat import rematted
from distill_jax.text_encoder import text_mask

Dtype = Any

_zeros = nn.initializers.zeros


def num_groups(channels: int, max_groups: int = 32) -> int:
    """The largest divisor of `channels` that is at most `max_groups` (GroupNorm groups)."""
    return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def check_image_size(height: int, width: int, channel_mult: Sequence[int]) -> None:
    """Raise ValueError unless the image halves cleanly between all levels of the U-Net."""
    factor = 2 ** (len(channel_mult) - 1)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by 2**(len(model.channel_mult) - 1)"
            f" = {factor} (model.channel_mult={tuple(channel_mult)}): change data.image_size or"
            " model.channel_mult."
        )


class ResBlock(nn.Module):
    """GroupNorm -> swish -> conv, FiLM from the embedding, dropout, zero-init conv, skip.

    Maps x [B, H, W, C_in] and emb [B, E] to [B, H, W, out_channels].
    """

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        """Apply the block; dropout only when `train` (needs a 'dropout' rng)."""
        c = self.out_channels
        h = GroupNorm(num_groups(x.shape[-1]), dtype=self.dtype, name="norm_0")(x)
        h = nn.Conv(c, (3, 3), dtype=self.dtype, name="conv_0")(nn.swish(h))
        film = nn.Dense(2 * c, dtype=self.dtype, name="film")(nn.swish(emb))
        scale, shift = jnp.split(film[:, None, None, :], 2, axis=-1)
        h = GroupNorm(num_groups(c), dtype=self.dtype, name="norm_1")(h)
        h = nn.swish(h * (1.0 + scale) + shift)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.Conv(c, (3, 3), dtype=self.dtype, kernel_init=_zeros, name="conv_1")(h)
        if x.shape[-1] != c:
            x = nn.Conv(c, (1, 1), dtype=self.dtype, name="skip")(x)
        return x + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over positions with a zero-initialised output projection.

    Maps x [B, H, W, C] to [B, H, W, C]; C must be divisible by `num_heads`.
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Apply GroupNorm, attention over the H*W positions, and the residual sum."""
        b, height, width, c = x.shape
        if c % self.num_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must divide the {c} channels of the "
                f"attention block at resolution {height}."
            )
        head_dim = c // self.num_heads
        h = GroupNorm(num_groups(c), dtype=self.dtype, name="norm")(x)
        h = h.reshape(b, height * width, c)
        qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype, name="qkv")(h)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        h = attention(q, k, v, implementation=self.attention)
        h = nn.DenseGeneral(
            c, axis=(-2, -1), dtype=self.dtype, kernel_init=_zeros, name="proj_out"
        )(h)
        return x + h.reshape(b, height, width, c)


class CrossAttentionBlock(nn.Module):
    """Attention from the feature map's positions to the prompt's tokens, zero-initialised out.

    Maps x [B, H, W, C], the projected tokens context [B, L, E] and their mask [B, L] (True
    at real tokens) to [B, H, W, C].
    """

    num_heads: int
    dtype: Dtype = jnp.float32
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, mask: jax.Array) -> jax.Array:
        """Apply GroupNorm, attention to the unmasked tokens, and the residual sum."""
        b, height, width, c = x.shape
        head_dim = c // self.num_heads
        h = GroupNorm(num_groups(c), dtype=self.dtype, name="norm")(x)
        q = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name="q")(
            h.reshape(b, height * width, c)
        )
        kv = nn.DenseGeneral((2, self.num_heads, head_dim), dtype=self.dtype, name="kv")(context)
        mask = mask[:, None, None, :]  # [B, 1, 1, L]: query x key
        h = attention(q, kv[:, :, 0], kv[:, :, 1], mask=mask, implementation=self.attention)
        h = nn.DenseGeneral(
            c, axis=(-2, -1), dtype=self.dtype, kernel_init=_zeros, name="proj_out"
        )(h)
        return x + h.reshape(b, height, width, c)


class UNet(nn.Module):
    """Class-conditional U-Net for images; see the module docstring for the layout.

    Attributes:
      channels: base width; level i has channels * channel_mult[i].
      channel_mult: width multipliers, one level each; the image halves between levels.
      num_res_blocks: ResBlocks per level on the down path (one more on the up path).
      attn_resolutions: feature-map heights at which self-attention follows each ResBlock.
      num_heads: attention heads.
      dropout: dropout rate inside ResBlocks (active only with train=True).
      num_classes: real classes; label `num_classes` is the NULL class.
      text_dim: width of the text condition's token states; 0 for class labels.
      use_guidance: add the guidance-weight branch of a distilled student.
      guidance_fourier_dim: Fourier features of w in that branch.
      guidance_head: 'affine' gives a student a second output conv and outputs
        out + w * direction (see `affine_guidance_output`); 'none' has no such head.
      student_extra_blocks: a student's extra ResBlocks after each ResBlock (capacity beyond
        its teacher's; zero-initialised, so it starts equal to the teacher); 0 for a teacher.
      parameterisation: 'eps', 'x', 'v' or 'both' (which doubles the output channels).
      emb_dim: conditioning width; 0 means 4 * channels.
      dtype: compute dtype; parameters stay float32.
      logsnr_min, logsnr_max: bounds of the cosine schedule that turns t into log-SNR.
    """

    channels: int = 64
    channel_mult: tuple[int, ...] = (1, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (4,)
    num_heads: int = 4
    dropout: float = 0.0
    num_classes: int = 10
    text_dim: int = 0
    attention: str = "xla"  # distill_jax.attention.IMPLEMENTATIONS
    remat: str = "none"  # models.remat.POLICIES, for each ResNet and attention block
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    guidance_head: str = "none"
    student_extra_blocks: int = 0
    parameterisation: str = "v"
    emb_dim: int = 0
    dtype: Dtype = jnp.float32
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    both_shift: float = 0.0  # log-SNR where a 'both' head weighs x and eps equally

    def _res(self, h: jax.Array, emb: jax.Array, channels: int, name: str, train: bool):
        """A ResBlock, then a student's `student_extra_blocks` (identity until trained)."""
        block = rematted(ResBlock, self.remat, static_argnums=(3,))
        h = block(channels, self.dropout, dtype=self.dtype, name=name)(h, emb, train)
        for i in range(self.student_extra_blocks if self.use_guidance else 0):
            extra = block(
                channels, self.dropout, dtype=self.dtype, name=f"{name}_{STUDENT_EXTRA}_{i}"
            )
            h = extra(h, emb, train)
        return h

    def _text_context(self, conditions: jax.Array, width: int) -> tuple[jax.Array, jax.Array]:
        """(the prompt's tokens normalised and projected to `width`, their mask).

        Projected once; each cross-attention block reads them from there (cheaper than from
        the encoder's 384 dimensions).
        """
        tokens = jnp.asarray(conditions, jnp.float32)
        projected = nn.Dense(width, dtype=self.dtype, name="context_proj")(
            nn.LayerNorm(dtype=self.dtype, name="context_norm")(tokens)
        )
        return projected, text_mask(tokens)

    def _attn(self, h: jax.Array, context: tuple | None, name: str) -> jax.Array:
        """Self-attention, then (text U-Net) cross-attention to the prompt's tokens."""
        block = rematted(AttentionBlock, self.remat)
        h = block(self.num_heads, self.dtype, self.attention, name=name)(h)
        if context is not None:
            cross = rematted(CrossAttentionBlock, self.remat)(
                self.num_heads, self.dtype, self.attention, name=f"{name}_cross"
            )
            h = cross(h, *context)
        return h

    def _down_path(self, h: jax.Array, emb: jax.Array, context: tuple | None, train: bool):
        """Encoder: ResBlocks (and attention) per level, stride-2 convs between levels.

        Returns the bottom activation and the skip connections the decoder consumes.
        """
        skips = [h]
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):
            for i in range(self.num_res_blocks):
                h = self._res(h, emb, self.channels * mult, f"down_{level}_res_{i}", train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(h, context, f"down_{level}_attn_{i}")
                skips.append(h)
            if level != last:
                h = nn.Conv(
                    h.shape[-1],
                    (3, 3),
                    strides=(2, 2),
                    dtype=self.dtype,
                    name=f"down_{level}_downsample",
                )(h)
                skips.append(h)
        return h, skips

    def _up_path(
        self, h: jax.Array, skips: list, emb: jax.Array, context: tuple | None, train: bool
    ) -> jax.Array:
        """Decoder: one more ResBlock per level than the encoder, each fed a skip connection."""
        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = self._res(h, emb, self.channels * mult, f"up_{level}_res_{i}", train)
                if h.shape[1] in self.attn_resolutions:
                    h = self._attn(h, context, f"up_{level}_attn_{i}")
            if level != 0:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
                h = nn.Conv(h.shape[-1], (3, 3), dtype=self.dtype, name=f"up_{level}_upsample")(h)
        return h

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        t: jax.Array,
        conditions: jax.Array,
        w: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Raw network output for z [B, H, W, C] at times t [B] in [0, 1].

        Args:
          z: noisy images [B, H, W, C].
          t: times [B] (or a scalar, broadcast).
          conditions: [B] int32 in [0, num_classes] (num_classes is the NULL class), or for a
            text U-Net the token states [B, L, text_dim] with zeros at padding.
          w: guidance weights [B]; required when use_guidance, ignored otherwise.
          train: enables dropout (then apply needs rngs={'dropout': key}).

        Returns:
          [B, H, W, output_channels(parameterisation, C)] float32.
        """
        _, height, width, data_channels = z.shape
        check_image_size(height, width, self.channel_mult)
        out_channels = output_channels(self.parameterisation, data_channels)
        emb_dim = self.emb_dim or 4 * self.channels
        emb = ConditioningEmbedding(
            emb_dim=emb_dim,
            num_classes=self.num_classes,
            text_dim=self.text_dim,
            use_guidance=self.use_guidance,
            guidance_fourier_dim=self.guidance_fourier_dim,
            time_features=self.channels,
            logsnr_min=self.logsnr_min,
            logsnr_max=self.logsnr_max,
            dtype=self.dtype,
            name="cond",
        )(t, conditions, w)
        context = self._text_context(conditions, emb_dim) if self.text_dim else None
        h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="input_conv")(
            z.astype(self.dtype)
        )
        h, skips = self._down_path(h, emb, context, train)
        h = self._res(h, emb, h.shape[-1], "mid_res_0", train)
        h = self._attn(h, context, "mid_attn")
        h = self._res(h, emb, h.shape[-1], "mid_res_1", train)
        h = self._up_path(h, skips, emb, context, train)
        h = nn.swish(GroupNorm(num_groups(h.shape[-1]), dtype=self.dtype, name="out_norm")(h))
        conv = dict(features=out_channels, kernel_size=(3, 3), dtype=self.dtype, kernel_init=_zeros)
        out = nn.Conv(**conv, name="out_conv")(h)
        if self.use_guidance and self.guidance_head == "affine":
            out = affine_guidance_output(out, h, w, nn.Conv(**conv, name=GUIDANCE_HEAD))
        return out.astype(jnp.float32)
