"""Conditioning embeddings: log-SNR (time), class label or text, and guidance weight w.

The time input of every network is the log-SNR of t under the configured cosine schedule,
mapped to [0, 1] by arctan(exp(-logsnr / 2)) / (pi / 2) and embedded sinusoidally at the scale
of 1000 discrete steps, as in google-research diffusion_distillation. Classes use an embedding
table with `num_classes + 1` rows; row `num_classes` is the NULL class of classifier-free
guidance. A distilled student adds a guidance branch, Fourier features of w -> Dense -> swish ->
Dense, whose last layer starts at zero: the student then equals its teacher at initialisation,
and its parameters are the teacher's plus the one subtree named `GUIDANCE_BRANCH`. With
guidance_head='affine' the student also has a second zero-initialised output layer,
`GUIDANCE_HEAD`, and outputs out + w * direction (`affine_guidance_output`).

A text-conditioned network (`text_dim > 0`) takes, instead of class labels, the text encoder's token
states [B, L, text_dim] with zeros at padding (`distill_jax.text_encoder`); their masked mean
(the sentence embedding) goes through Dense -> swish -> Dense in place of the class embedding,
and the tokens themselves reach the U-Net's cross-attention blocks. Its null condition is the
empty prompt's states, not a learned row.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion.discrete import timestep_from_logsnr
from distill_jax.diffusion.flow import flow_timestep
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, logsnr_schedule_cosine
from distill_jax.text_encoder import pooled_text

Dtype = Any

# The submodule names of the student's guidance branch and affine guidance head; a student's
# parameters are its teacher's plus these (`student_params_from_teacher` keys on them).
GUIDANCE_BRANCH = "guidance_embed"
GUIDANCE_HEAD = "guidance_head"
# ResBlocks a student may have beyond its teacher (config.model.student_extra_blocks): each
# ends in a zero-initialised conv, so the student still starts equal to its teacher.
STUDENT_EXTRA = "student_extra"
# config.model.guidance_head: 'none' (w reaches the network only through GUIDANCE_BRANCH) or
# 'affine' (also output = out + w * direction, a second zero-initialised output layer).
GUIDANCE_HEADS = ("none", "affine")


def logsnr_to_unit_interval(logsnr: jax.Array) -> jax.Array:
    """Map log-SNR to [0, 1] (+inf -> 0, -inf -> 1): arctan(exp(-logsnr / 2)) / (pi / 2).

    For the cosine schedule this is an affine function of t, so the embedding sees a quantity
    that is spread evenly over the trajectory whatever the clipping bounds are.
    """
    logsnr = jnp.asarray(logsnr, jnp.float32)
    return jnp.arctan(jnp.exp(-0.5 * logsnr)) / (0.5 * jnp.pi)


def network_timestep(
    logsnr: jax.Array, *, timestep_logsnrs: tuple[float, ...] = (), flow_timesteps: int = 0
) -> jax.Array:
    """A network's time input at log-SNR lambda [B].

    A flow-matching teacher's (`flow_timesteps` = its num_train_timesteps): that many times
    its noise level (`diffusion.flow`); a discrete teacher's (`timestep_logsnrs`, its
    lambda_k): the fractional timestep k(lambda) (`diffusion.discrete`); otherwise, a network
    trained here: 1000 * `logsnr_to_unit_interval`.
    """
    if flow_timesteps:
        return flow_timestep(logsnr, flow_timesteps)
    if timestep_logsnrs:
        return timestep_from_logsnr(logsnr, np.asarray(timestep_logsnrs))
    return 1000.0 * logsnr_to_unit_interval(logsnr)


def sinusoidal_embedding(
    x: jax.Array, dim: int, *, scale: float = 1000.0, max_period: float = 10000.0
) -> jax.Array:
    """Transformer-style sinusoidal embedding of one scalar per example.

    Args:
      x: [B] values (here log-SNR mapped to [0, 1]).
      dim: even number of output features.
      scale: multiplies x first, so x in [0, 1] spans the range of 1000 discrete steps.
      max_period: the longest period, in units of `scale * x`.

    Returns:
      [B, dim] float32: sin features then cos features, frequencies log-spaced from 1 down
      to 1 / max_period.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"sinusoidal embedding dim={dim} must be an even number >= 2.")
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    args = scale * jnp.asarray(x, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def guidance_fourier_features(
    w: jax.Array, dim: int, *, min_period: float = 0.5, max_period: float = 64.0
) -> jax.Array:
    """Fourier features of the guidance weight with fixed log-spaced frequencies.

    Args:
      w: [B] guidance weights (about [-1, 14] in practice).
      dim: even number of output features (`guidance_fourier_dim`).
      min_period: period, in units of w, of the fastest frequency.
      max_period: period of the slowest frequency; long enough that every w of the paper's
        ranges gets a distinct code.

    Returns:
      [B, dim] float32: sin(2 pi w / p) for dim / 2 log-spaced periods p, then the cosines.
    """
    if dim < 2 or dim % 2:
        raise ValueError(f"guidance_fourier_dim={dim} must be an even number >= 2.")
    periods = jnp.geomspace(max_period, min_period, dim // 2, dtype=jnp.float32)
    args = 2.0 * jnp.pi * jnp.asarray(w, jnp.float32)[:, None] / periods[None, :]
    return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class GuidanceEmbedding(nn.Module):
    """The student's w branch: Fourier(w) -> Dense -> swish -> Dense (zero-initialised).

    Maps w [B] to [B, emb_dim]; exactly zero at initialisation.
    """

    emb_dim: int
    fourier_dim: int = 32
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, w: jax.Array | None, batch: int) -> jax.Array:
        """Embed w [B] (or a scalar, broadcast to `batch`) -> [B, emb_dim].

        Raises:
          ValueError: w is None (a student must be given its guidance weight).
        """
        if w is None:
            raise ValueError(
                "this model has a guidance branch (use_guidance=True): pass the guidance "
                "weight w [B]."
            )
        w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch,))
        h = guidance_fourier_features(w, self.fourier_dim)
        h = nn.Dense(self.emb_dim, dtype=self.dtype, name="dense_0")(h)
        h = nn.swish(h)
        return nn.Dense(
            self.emb_dim,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="dense_1",
        )(h)


def affine_guidance_output(
    out: jax.Array, features: jax.Array, w: jax.Array, head: nn.Module
) -> jax.Array:
    """out + w * head(features): the student's output made affine in w for given features.

    The guided teacher is affine in w, (1 + w) xhat_c - w xhat_u = xhat_c + w (xhat_c - xhat_u),
    and so is its raw output under every parameterisation (x-hat is affine in it for fixed z,
    t). With this head a one-call student can represent stage one's target exactly at every w:
    `out` the conditional output, `head(features)` the guidance direction. `head` is
    zero-initialised, so the student still starts equal to its teacher. w [B] (or a scalar)
    broadcasts over the trailing axes of `out`.
    """
    direction = head(features).astype(out.dtype)
    w = jnp.broadcast_to(jnp.asarray(w, out.dtype), out.shape[:1])
    return out + w.reshape(-1, *([1] * (out.ndim - 1))) * direction


class ConditioningEmbedding(nn.Module):
    """Sum of the time (log-SNR) MLP, the class (or text) embedding and a student's w branch.

    Attributes:
      emb_dim: width of the conditioning vector.
      num_classes: real classes; label `num_classes` is the NULL class.
      text_dim: width of the text encoder's token states; 0 for class labels.
      use_guidance: add the `GuidanceEmbedding` submodule named `GUIDANCE_BRANCH`.
      guidance_fourier_dim: Fourier features of w in that branch.
      time_features: sinusoidal features of the log-SNR; 0 means emb_dim // 4 (rounded to even).
      logsnr_min, logsnr_max: bounds of the cosine schedule that turns t into log-SNR.
      dtype: compute dtype; parameters stay float32.
    """

    emb_dim: int
    num_classes: int
    text_dim: int = 0
    use_guidance: bool = False
    guidance_fourier_dim: int = 32
    time_features: int = 0
    logsnr_min: float = LOGSNR_MIN
    logsnr_max: float = LOGSNR_MAX
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, t: jax.Array, conditions: jax.Array, w: jax.Array | None = None
    ) -> jax.Array:
        """Embed t [B] (times in [0, 1]), conditions [B] int (or text [B, L, D]) and w [B].

        Returns [B, emb_dim]. A scalar t or w is broadcast to the batch. w is required when
        `use_guidance` and ignored otherwise, so a teacher and its student share one signature.
        """
        batch = jnp.shape(conditions)[0]
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
        logsnr = logsnr_schedule_cosine(t, logsnr_min=self.logsnr_min, logsnr_max=self.logsnr_max)
        features = self.time_features or max(2, 2 * (self.emb_dim // 8))
        h = sinusoidal_embedding(logsnr_to_unit_interval(logsnr), features)
        h = nn.Dense(self.emb_dim, dtype=self.dtype, name="time_dense_0")(h)
        h = nn.Dense(self.emb_dim, dtype=self.dtype, name="time_dense_1")(nn.swish(h))
        if self.text_dim:
            pooled = pooled_text(jnp.asarray(conditions, jnp.float32))
            text = nn.Dense(self.emb_dim, dtype=self.dtype, name="text_dense_0")(pooled)
            emb = h + nn.Dense(self.emb_dim, dtype=self.dtype, name="text_dense_1")(nn.swish(text))
        else:
            emb = h + nn.Embed(
                self.num_classes + 1, self.emb_dim, dtype=self.dtype, name="class_embed"
            )(jnp.asarray(conditions, jnp.int32))
        if self.use_guidance:
            emb = emb + GuidanceEmbedding(
                self.emb_dim, self.guidance_fourier_dim, dtype=self.dtype, name=GUIDANCE_BRANCH
            )(w, batch)
        return emb
