"""GroupNorm with float32 statistics, folded into one scale and shift per example and channel.

Same math and parameters as `flax.linen.GroupNorm` (per example, the mean and variance over
the spatial axes and the channels of each group; learned per-channel `scale` and `bias`;
epsilon 1e-6), formulated so XLA's CPU backend does less work (issue 14: GroupNorm was 11-16%
of a digits train step):

- the statistics are computed in float32 whatever the compute dtype, the variance as the mean
  of squared deviations (Flax uses E[x^2] - E[x]^2, which loses every digit when an
  activation's mean is large against its spread);
- normalisation and the affine are folded into per-(example, channel) coefficients, so the
  full-size tensor sees a single multiply-add: y = x * a + b with a = scale / sqrt(var + eps)
  and b = bias - mean * a.

On the 2-core CPU of the README's benchmarks, one norm's forward and backward pass takes
20-35% less time than Flax's, but XLA already fuses most of Flax's version into its
neighbours: the whole teacher step gained 0% on 8x8 digits and 4% on 32x32x3. What this keeps
for sure is the float32 statistics that stay exact for large activations. `tests/test_norm.py`
checks it against a float64 reference, large activations included, and a fixed-seed 50-step
training run against Flax's GroupNorm.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float = 1e-6
) -> jax.Array:
    """Normalise x [B, ..., C] per example over each of `num_groups` channel groups.

    Returns float32 [B, ..., C]: (x - mean) / sqrt(var + epsilon) * scale + bias, with the
    statistics over the middle axes and the C / num_groups channels of a group.
    """
    b, c = x.shape[0], x.shape[-1]
    if c % num_groups:
        raise ValueError(f"GroupNorm: {num_groups} groups do not divide {c} channels.")
    g = x.astype(jnp.float32).reshape(b, -1, num_groups, c // num_groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(g - mean), axis=(1, 3), keepdims=True)
    gain = jax.lax.rsqrt(var + epsilon) * scale.astype(jnp.float32).reshape(num_groups, -1)
    shift = bias.astype(jnp.float32).reshape(num_groups, -1) - mean * gain
    return (g * gain + shift).reshape(x.shape)


class GroupNorm(nn.Module):
    """Drop-in for `flax.linen.GroupNorm(num_groups, dtype=...)`: same 'scale' and 'bias'.

    Parameters are float32; the output is in `dtype` (the input's dtype when None).
    """

    num_groups: int
    epsilon: float = 1e-6
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Normalise x [B, ..., C]."""
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = group_norm(x, scale, bias, self.num_groups, self.epsilon)
        return y.astype(self.dtype or x.dtype)
