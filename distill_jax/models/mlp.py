"""Residual MLP denoiser for low-dimensional toy data (the Gaussian-mixture dataset).

Same conditioning and call signature as the U-Net: z [B, D] -> raw output [B, D'] float32,
where D' = output_channels(parameterisation, D). Each residual block is
LayerNorm -> swish -> Dense -> FiLM(emb) -> swish -> dropout -> zero-initialised Dense, and the
output layer is zero-initialised, so a fresh network outputs exactly zero.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from distill_jax.diffusion.parameterisation import output_channels
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN
from distill_jax.models.embeddings import (
    GUIDANCE_HEAD,
    ConditioningEmbedding,
    affine_guidance_output,
)

Dtype = Any

_zeros = nn.initializers.zeros


class MLPBlock(nn.Module):
    """Residual block conditioned by FiLM: x [B, hidden], emb [B, E] -> [B, hidden]."""

    hidden: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, *, train: bool) -> jax.Array:
        """Apply the block; dropout only when `train` (needs a 'dropout' rng)."""
        h = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
        h = nn.Dense(self.hidden, dtype=self.dtype, name="dense_0")(nn.swish(h))
        film = nn.Dense(2 * self.hidden, dtype=self.dtype, name="film")(nn.swish(emb))
        scale, shift = jnp.split(film, 2, axis=-1)
        h = nn.swish(h * (1.0 + scale) + shift)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return x + nn.Dense(self.hidden, dtype=self.dtype, kernel_init=_zeros, name="dense_1")(h)


class MLPDenoiser(nn.Module):
    """Class-conditional residual MLP for vectors z [B, D].

    Attributes:
      num_classes: real classes; label `num_classes` is the NULL class.
      hidden: width of the residual stream (config.model.mlp_hidden).
      depth: residual blocks (config.model.mlp_depth).
      use_guidance: add the guidance-weight branch of a distilled student.
      guidance_fourier_dim: Fourier features of w in that branch.
      guidance_head: 'affine' gives a student a second output layer and outputs
        out + w * direction (see `affine_guidance_output`); 'none' has no such head.
      parameterisation: 'eps', 'x', 'v' or 'both' (which doubles the output width).
      emb_dim: conditioning width; 0 means `hidden`.
      dropout: dropout rate inside the blocks (active only with train=True).
      dtype: compute dtype; parameters stay float32.
      logsnr_min, logsnr_max: bounds of the cosine schedule that turns t into log-SNR.
    """

    num_classes: int = 4
    hidden: int = 256
    depth: int = 4
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    guidance_head: str = "none"
    parameterisation: str = "v"
    emb_dim: int = 0
    dropout: float = 0.0
    dtype: Dtype = jnp.float32
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    both_shift: float = 0.0  # log-SNR where a 'both' head weighs x and eps equally

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        t: jax.Array,
        labels: jax.Array,
        w: jax.Array | None = None,
        *,
        train: bool,
    ) -> jax.Array:
        """Raw network output for z [B, D] at times t [B] in [0, 1].

        Args:
          z: noisy points [B, D].
          t: times [B] (or a scalar, broadcast).
          labels: [B] int32 in [0, num_classes]; num_classes is the NULL class.
          w: guidance weights [B]; required when use_guidance, ignored otherwise.
          train: enables dropout (then apply needs rngs={'dropout': key}).

        Returns:
          [B, output_channels(parameterisation, D)] float32.
        """
        if z.ndim != 2:
            raise ValueError(f"MLPDenoiser expects z of shape [B, D]; got {z.shape}.")
        out_dim = output_channels(self.parameterisation, z.shape[-1])
        emb = ConditioningEmbedding(
            emb_dim=self.emb_dim or self.hidden,
            num_classes=self.num_classes,
            use_guidance=self.use_guidance,
            guidance_fourier_dim=self.guidance_fourier_dim,
            logsnr_min=self.logsnr_min,
            logsnr_max=self.logsnr_max,
            dtype=self.dtype,
            name="cond",
        )(t, labels, w)
        h = nn.Dense(self.hidden, dtype=self.dtype, name="input_dense")(z.astype(self.dtype))
        for i in range(self.depth):
            h = MLPBlock(self.hidden, self.dropout, dtype=self.dtype, name=f"block_{i}")(
                h, emb, train=train
            )
        h = nn.swish(nn.LayerNorm(dtype=self.dtype, name="out_norm")(h))
        dense = dict(features=out_dim, dtype=self.dtype, kernel_init=_zeros)
        out = nn.Dense(**dense, name="output_dense")(h)
        if self.use_guidance and self.guidance_head == "affine":
            out = affine_guidance_output(out, h, w, nn.Dense(**dense, name=GUIDANCE_HEAD))
        return out.astype(jnp.float32)
