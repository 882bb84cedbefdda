"""diffusers' AutoencoderKL in Flax (NHWC): Stable Diffusion's KL autoencoder, for its weights.

The layout is diffusers' (`models/autoencoders/vae.py`), so `interop.vae` can map every
tensor by name: submodule names are diffusers' with '.N' written '_N' ('down_blocks_0',
'resnets_1', 'to_out_0'), Flax's 'kernel' and 'scale' for 'weight'.

Encoder: conv_in -> per level a DownEncoderBlock2D (`layers_per_block` resnets, then, but on
the last level, a pad of one row and column at the bottom and right and a stride-2 3x3 conv)
-> mid block (resnet, single-head self-attention, resnet) -> GroupNorm -> SiLU -> conv_out to
2 * latent_channels -> quant_conv (1x1): the mean and log-variance of q(z | x), the latter
clamped to [-30, 20] as diffusers' DiagonalGaussianDistribution does. Decoder:
post_quant_conv (1x1) -> conv_in -> mid block -> per level an UpDecoderBlock2D
(`layers_per_block + 1` resnets, then, but on the last, nearest 2x upsampling and a 3x3 conv)
-> GroupNorm -> SiLU -> conv_out. Every GroupNorm uses `norm_num_groups` groups and eps 1e-6;
the resnets have no time embedding, dropout 0 and output scale 1.

The attention is diffusers' `Attention` as AutoencoderKL builds it: one head as wide as the
channels (heads = channels // attention_head_dim with attention_head_dim = channels), biased
q/k/v/out projections, softmax in float32, a residual and rescale_output_factor 1.

`autoencoder.make_codec(model, params, scaling_factor, shift_factor)` gives its (encode,
decode) functions, as for this library's own autoencoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.attention import attention
from distill_jax.models.norm import GroupNorm

Params = Any

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_RANGE = (-30.0, 20.0)
# Every GroupNorm of diffusers' AutoencoderKL (resnet_eps, the attention's and the outputs').
NORM_EPS = 1e-6


def downsampling_factor(block_out_channels: Sequence[int]) -> int:
    """f: the latent is the image downsampled f times in height and width."""
    return 2 ** (len(block_out_channels) - 1)


class _Resnet(nn.Module):
    """diffusers' ResnetBlock2D without time embedding: norm, SiLU, conv twice, plus a skip."""

    out_channels: int
    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.out_channels
        h = GroupNorm(self.groups, epsilon=NORM_EPS, name="norm1")(x)
        h = nn.Conv(c, (3, 3), name="conv1")(nn.silu(h))
        h = GroupNorm(self.groups, epsilon=NORM_EPS, name="norm2")(h)
        h = nn.Conv(c, (3, 3), name="conv2")(nn.silu(h))
        if x.shape[-1] != c:
            x = nn.Conv(c, (1, 1), name="conv_shortcut")(x)
        return x + h


class _Attention(nn.Module):
    """The mid block's self-attention over all positions: one head, residual."""

    groups: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, height, width, c = x.shape
        tokens = GroupNorm(self.groups, epsilon=NORM_EPS, name="group_norm")(x)
        tokens = tokens.reshape(b, height * width, c)
        q = nn.Dense(c, name="to_q")(tokens)
        k = nn.Dense(c, name="to_k")(tokens)
        v = nn.Dense(c, name="to_v")(tokens)
        one_head = lambda a: a[:, :, None, :]  # noqa: E731
        out = attention(one_head(q), one_head(k), one_head(v))[:, :, 0]
        out = nn.Dense(c, name="to_out_0")(out)
        return x + out.reshape(b, height, width, c)


class _MidBlock(nn.Module):
    """diffusers' UNetMidBlock2D of an autoencoder: resnet, (attention), resnet."""

    groups: int
    attention: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = x.shape[-1]
        x = _Resnet(c, self.groups, name="resnets_0")(x)
        if self.attention:
            x = _Attention(self.groups, name="attentions_0")(x)
        return _Resnet(c, self.groups, name="resnets_1")(x)


class _Downsample(nn.Module):
    """Downsample2D(padding=0): zero-pad bottom and right by one, then a stride-2 3x3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", name="conv")(x)


class _Upsample(nn.Module):
    """Upsample2D: nearest-neighbour 2x (each pixel repeated), then a 3x3 conv."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return nn.Conv(x.shape[-1], (3, 3), name="conv")(x)


class _Level(nn.Module):
    """DownEncoderBlock2D or UpDecoderBlock2D: `num_layers` resnets, then a resampling."""

    out_channels: int
    num_layers: int
    groups: int
    resample: str | None  # 'down', 'up' or None (the last level)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i in range(self.num_layers):
            x = _Resnet(self.out_channels, self.groups, name=f"resnets_{i}")(x)
        if self.resample == "down":
            x = _Downsample(name="downsamplers_0")(x)
        elif self.resample == "up":
            x = _Upsample(name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """Image [B, H, W, C] -> moments [B, H / f, W / f, 2 * latent_channels] (before quant_conv)."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int
    mid_block_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Mean and log-variance channels concatenated, as diffusers' Encoder returns them."""
        channels, groups = self.block_out_channels, self.norm_num_groups
        h = nn.Conv(channels[0], (3, 3), name="conv_in")(x)
        for i, c in enumerate(channels):
            last = i == len(channels) - 1
            resample = None if last else "down"
            h = _Level(c, self.layers_per_block, groups, resample, name=f"down_blocks_{i}")(h)
        h = _MidBlock(groups, self.mid_block_attention, name="mid_block")(h)
        h = nn.silu(GroupNorm(groups, epsilon=NORM_EPS, name="conv_norm_out")(h))
        return nn.Conv(2 * self.latent_channels, (3, 3), name="conv_out")(h)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] (after post_quant_conv) -> image [B, h f, w f, C]."""

    block_out_channels: tuple[int, ...]
    layers_per_block: int
    out_channels: int
    norm_num_groups: int
    mid_block_attention: bool = True

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """The image, not clipped."""
        channels, groups = self.block_out_channels, self.norm_num_groups
        h = nn.Conv(channels[-1], (3, 3), name="conv_in")(z)
        h = _MidBlock(groups, self.mid_block_attention, name="mid_block")(h)
        for i, c in enumerate(reversed(channels)):
            last = i == len(channels) - 1
            resample = None if last else "up"
            h = _Level(c, self.layers_per_block + 1, groups, resample, name=f"up_blocks_{i}")(h)
        h = nn.silu(GroupNorm(groups, epsilon=NORM_EPS, name="conv_norm_out")(h))
        return nn.Conv(self.out_channels, (3, 3), name="conv_out")(h)


class AutoencoderKL(nn.Module):
    """diffusers' AutoencoderKL; `__call__` reconstructs from the posterior mean (for init).

    Attributes (vae/config.json's names):
      in_channels, out_channels: image channels in and out.
      block_out_channels: channels per level; f = 2 ** (len - 1).
      layers_per_block: resnets per encoder level (the decoder has one more).
      latent_channels: channels of the latent.
      norm_num_groups: groups of every GroupNorm.
      mid_block_add_attention: whether the mid blocks have their attention.
      use_quant_conv, use_post_quant_conv: whether the 1x1 convs around the latent exist.
    """

    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int
    latent_channels: int
    norm_num_groups: int = 32
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    def setup(self):
        """The two halves and the 1x1 convs, so `encode` and `decode` apply on their own."""
        self.encoder = Encoder(
            self.block_out_channels,
            self.layers_per_block,
            self.latent_channels,
            self.norm_num_groups,
            self.mid_block_add_attention,
        )
        self.decoder = Decoder(
            self.block_out_channels,
            self.layers_per_block,
            self.out_channels,
            self.norm_num_groups,
            self.mid_block_add_attention,
        )
        latent = self.latent_channels
        self.quant_conv = nn.Conv(2 * latent, (1, 1)) if self.use_quant_conv else None
        self.post_quant_conv = nn.Conv(latent, (1, 1)) if self.use_post_quant_conv else None

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of q(z | x), each [B, H / f, W / f, latent_channels], unscaled."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """The image [B, h f, w f, out_channels] of an unscaled latent, not clipped."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x: jax.Array) -> jax.Array:
        """decode(mean(q(z | x))): touches every parameter, so `init` creates them all."""
        mean, _ = self.encode(x)
        return self.decode(mean)


def init_params(model: AutoencoderKL, rng: jax.Array) -> Params:
    """Random 'params' of the autoencoder (shapes do not depend on the image size).

    Wrap in `jax.eval_shape` for the shapes alone.
    """
    side = downsampling_factor(model.block_out_channels)
    x = jnp.zeros((1, side, side, model.in_channels), jnp.float32)
    return model.init({"params": rng}, x)["params"]
