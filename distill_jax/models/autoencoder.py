"""A convolutional KL autoencoder for latent diffusion (Rombach et al. 2022, LDM's KL-f4/f8).

Encoder: conv -> per level `num_res_blocks` ResBlocks and a stride-2 conv between levels ->
middle ResBlock -> GroupNorm -> swish -> conv to 2 * latent_channels: the mean and log-variance
of a diagonal Gaussian posterior q(z | x) over latents [B, H / f, W / f, latent_channels], with
f = 2 ** (len(channel_mult) - 1). The decoder mirrors it with nearest-neighbour upsampling and
ends in a conv to the image channels. No attention, no perceptual or adversarial loss: small
images do not need them, and a pretrained perceptual network cannot be shipped offline.

Diffusion runs on `scale * mean(q(z | x))`, where the scale (stored with the finished stage,
as Stable Diffusion's 0.18215) makes the encoded train split unit-variance. `make_codec`
bundles module, weights and scale into the two pure functions the rest of the library uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from distill_jax.models.norm import GroupNorm
from distill_jax.models.unet import num_groups

Params = Any

# LDM clips the posterior's log-variance to this range for numerical safety.
LOGVAR_RANGE = (-30.0, 20.0)


def downsampling_factor(channel_mult: Sequence[int]) -> int:
    """f: the latent is the image downsampled f times in height and width."""
    return 2 ** (len(channel_mult) - 1)


class _Block(nn.Module):
    """GroupNorm -> swish -> conv, twice, with a (1x1 conv) skip; no conditioning."""

    out_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.out_channels
        h = nn.Conv(c, (3, 3), name="conv_0")(nn.swish(GroupNorm(num_groups(x.shape[-1]))(x)))
        h = nn.Conv(c, (3, 3), name="conv_1")(nn.swish(GroupNorm(num_groups(c))(h)))
        if x.shape[-1] != c:
            x = nn.Conv(c, (1, 1), name="skip")(x)
        return x + h


class Encoder(nn.Module):
    """Image [B, H, W, C] in [-1, 1] -> (mean, logvar) [B, H / f, W / f, latent_channels]."""

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of q(z | x), logvar clipped to LOGVAR_RANGE."""
        h = nn.Conv(self.channels, (3, 3), name="conv_in")(x)
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = _Block(self.channels * mult)(h)
            if level < len(self.channel_mult) - 1:
                h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), name=f"down_{level}")(h)
        h = _Block(h.shape[-1], name="mid")(h)
        h = nn.swish(GroupNorm(num_groups(h.shape[-1]), name="norm_out")(h))
        moments = nn.Conv(2 * self.latent_channels, (3, 3), name="conv_out")(h)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)


class Decoder(nn.Module):
    """Latent [B, h, w, latent_channels] -> image [B, h * f, w * f, out_channels]."""

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    out_channels: int

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """The image of latent z (unscaled)."""
        h = nn.Conv(self.channels * self.channel_mult[-1], (3, 3), name="conv_in")(z)
        h = _Block(h.shape[-1], name="mid")(h)
        for level in reversed(range(len(self.channel_mult))):
            for _ in range(self.num_res_blocks):
                h = _Block(self.channels * self.channel_mult[level])(h)
            if level > 0:
                b, height, width, c = h.shape
                h = jax.image.resize(h, (b, 2 * height, 2 * width, c), "nearest")
                h = nn.Conv(c, (3, 3), name=f"up_{level}")(h)
        h = nn.swish(GroupNorm(num_groups(h.shape[-1]), name="norm_out")(h))
        return nn.Conv(self.out_channels, (3, 3), name="conv_out")(h)


class KLAutoencoder(nn.Module):
    """The encoder and decoder; `__call__` reconstructs (for training and initialisation).

    Attributes:
      channels, channel_mult, num_res_blocks: the widths and depth of both halves.
      latent_channels: channels of the latent.
      image_channels: channels of the images (and of the reconstruction).
    """

    channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    latent_channels: int
    image_channels: int

    def setup(self):
        """The two halves, so `encode` and `decode` can be applied on their own."""
        self.encoder = Encoder(
            self.channels, self.channel_mult, self.num_res_blocks, self.latent_channels
        )
        self.decoder = Decoder(
            self.channels, self.channel_mult, self.num_res_blocks, self.image_channels
        )

    def encode(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, logvar) of q(z | x)."""
        return self.encoder(x)

    def decode(self, z: jax.Array) -> jax.Array:
        """The image of an (unscaled) latent."""
        return self.decoder(z)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None):
        """(reconstruction, mean, logvar); z ~ q(z | x) with `rng`, its mean without."""
        mean, logvar = self.encode(x)
        z = mean
        if rng is not None:
            z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


def build_autoencoder(ae_config, *, image_shape: Sequence[int]) -> KLAutoencoder:
    """The autoencoder `config.autoencoder` describes, for images of `image_shape` (H, W, C).

    Raises:
      ValueError: the image does not halve cleanly len(channel_mult) - 1 times.
    """
    mult = tuple(int(m) for m in ae_config.channel_mult)
    height, width, channels = (int(d) for d in image_shape)
    factor = downsampling_factor(mult)
    if height % factor or width % factor:
        raise ValueError(
            f"image size {height}x{width} is not divisible by the autoencoder's downsampling "
            f"factor {factor} (autoencoder.channel_mult={mult}): change data.image_size or "
            "autoencoder.channel_mult."
        )
    return KLAutoencoder(
        channels=int(ae_config.channels),
        channel_mult=mult,
        num_res_blocks=int(ae_config.num_res_blocks),
        latent_channels=int(ae_config.latent_channels),
        image_channels=channels,
    )


def latent_shape(ae_config, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H / f, W / f, latent_channels) of images of `image_shape`."""
    factor = downsampling_factor(tuple(ae_config.channel_mult))
    return (
        int(image_shape[0]) // factor,
        int(image_shape[1]) // factor,
        int(ae_config.latent_channels),
    )


def init_autoencoder(model: KLAutoencoder, rng: jax.Array, *, data_shape) -> Params:
    """Initial 'params' of the autoencoder for images of `data_shape` (pure in `rng`)."""
    x = jnp.zeros((1, *data_shape), jnp.float32)
    return jax.jit(lambda key: model.init({"params": key}, x)["params"])(rng)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(q(z | x) || N(0, I)) per example, summed over the latent: [B]."""
    terms = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(terms, axis=tuple(range(1, mean.ndim)))


@dataclasses.dataclass(frozen=True)
class _Apply:
    """Static half of a codec function: the module, the method, the scale and the shift."""

    model: nn.Module
    method: str
    scale: float
    shift: float

    def __call__(self, params: Params, x: jax.Array) -> jax.Array:
        if self.method == "encode":
            mean, _ = self.model.apply({"params": params}, x, method="encode")
            return (mean - self.shift) * self.scale
        z = x / self.scale + self.shift
        return self.model.apply({"params": params}, z, method="decode")


def make_codec(
    model: nn.Module, params: Params, scale: float, shift: float = 0.0
) -> tuple[Partial, Partial]:
    """(encode, decode) as pytree Partials: images -> scaled posterior means, and back.

    `model` is this library's `KLAutoencoder` or diffusers' AutoencoderKL (`kl_vae`): any
    module whose `encode(x)` gives (mean, logvar) of q(z | x) and `decode(z)` the image.
    encode(x [B, H, W, C] in [-1, 1]) -> (mean(q(z | x)) - shift) * scale
    [B, h, w, latent_channels]; decode(z) -> the image of z / scale + shift [B, H, W, C] (not
    clipped). For an imported VAE, scale and shift are its config's scaling_factor and
    shift_factor. Jit a function taking them as arguments: new weights are new leaves, not a
    new trace.
    """
    scale, shift = float(scale), float(shift)
    return (
        Partial(_Apply(model, "encode", scale, shift), params),
        Partial(_Apply(model, "decode", scale, shift), params),
    )
