"""Conversions between the eps, x and v parameterisations, and the "both" mixture.

With z = alpha x + sigma eps and v = alpha eps - sigma x (alpha^2 + sigma^2 = 1):
x = alpha z - sigma v, eps = sigma z + alpha v, x = (z - sigma eps) / alpha.
"both" means the network outputs an x prediction and an eps prediction stacked on the last
axis; they are mixed as x = sigma^2 x_direct + alpha^2 x_from_eps, which trusts the direct x
where noise dominates and the eps route where signal dominates (as in progressive distillation);
`both_shift` moves the crossing from log-SNR 0 to another lambda_0.
"flow" is a flow-matching network's velocity v = eps - x, fed z / (alpha + sigma) (the flow's
own z, `network_input`): x = (z - sigma v) / (alpha + sigma) (`diffusion.flow`).
All samplers and losses work on x-hat, so `xhat_from_output` is the single entry point.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from distill_jax.diffusion.flow import flow_input, x_from_velocity
from distill_jax.diffusion.schedule import alpha_sigma, expand_to

PARAMETERISATIONS = ("eps", "x", "v", "both", "flow")


def check_parameterisation(name: str) -> str:
    """Return `name` if it is a known parameterisation, else raise a ValueError naming them."""
    if name not in PARAMETERISATIONS:
        raise ValueError(
            f"parameterisation={name!r} is unknown: accepted {', '.join(PARAMETERISATIONS)}."
        )
    return name


def output_channels(name: str, data_channels: int) -> int:
    """Channels the network must output for `name` ('both' needs x and eps)."""
    check_parameterisation(name)
    return 2 * data_channels if name == "both" else data_channels


def network_input(z: jax.Array, logsnr: jax.Array, *, parameterisation: str) -> jax.Array:
    """What the network is fed for the VP z: z itself, or a flow network's z / (alpha + sigma)."""
    return flow_input(z, logsnr) if parameterisation == "flow" else z


def x_from_eps(z: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    """x = (z - sigma eps) / alpha; logsnr [B] or scalar, z and eps [B, ...]."""
    alpha, sigma = alpha_sigma(logsnr)
    return (z - expand_to(sigma, z) * eps) / expand_to(alpha, z)


def eps_from_x(z: jax.Array, x: jax.Array, logsnr: jax.Array) -> jax.Array:
    """eps = (z - alpha x) / sigma."""
    alpha, sigma = alpha_sigma(logsnr)
    return (z - expand_to(alpha, z) * x) / expand_to(sigma, z)


def x_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
    """x = alpha z - sigma v."""
    alpha, sigma = alpha_sigma(logsnr)
    return expand_to(alpha, z) * z - expand_to(sigma, z) * v


def eps_from_v(z: jax.Array, v: jax.Array, logsnr: jax.Array) -> jax.Array:
    """eps = sigma z + alpha v."""
    alpha, sigma = alpha_sigma(logsnr)
    return expand_to(sigma, z) * z + expand_to(alpha, z) * v


def v_from_x_eps(x: jax.Array, eps: jax.Array, logsnr: jax.Array) -> jax.Array:
    """v = alpha eps - sigma x."""
    alpha, sigma = alpha_sigma(logsnr)
    return expand_to(alpha, x) * eps - expand_to(sigma, x) * x


def xhat_from_output(
    output: jax.Array,
    z: jax.Array,
    logsnr: jax.Array,
    *,
    parameterisation: str,
    both_shift: float = 0.0,
) -> jax.Array:
    """Turn a network output into x-hat.

    Args:
      output: [B, ..., C] for 'eps', 'x', 'v', 'flow'; [B, ..., 2C] for 'both' (x first, then
        eps).
      z: the noisy input [B, ..., C].
      logsnr: [B] or scalar log-SNR of z.
      parameterisation: one of PARAMETERISATIONS.
      both_shift: the log-SNR lambda_0 where 'both' weighs its two halves equally: x =
        sigmoid(lambda_0 - lambda) x_direct + sigmoid(lambda - lambda_0) x_from_eps. 0 is
        Salimans & Ho's sigma^2 / alpha^2 mixture; below 0 trusts the eps half to higher noise.
    """
    check_parameterisation(parameterisation)
    output = output.astype(z.dtype)
    if parameterisation == "x":
        return output
    if parameterisation == "eps":
        return x_from_eps(z, output, logsnr)
    if parameterisation == "v":
        return x_from_v(z, output, logsnr)
    if parameterisation == "flow":
        return x_from_velocity(z, output, logsnr)
    x_direct, eps = jnp.split(output, 2, axis=-1)
    logsnr = jnp.asarray(logsnr, jnp.float32)
    # Each weight from its own sigmoid: 1 - sigmoid(-lambda) rounds to 0 in float32 where
    # lambda is large and negative, and that is what weights the eps route there.
    shifted = logsnr - float(both_shift)
    w_direct, w_eps = jax.nn.sigmoid(-shifted), jax.nn.sigmoid(shifted)
    return expand_to(w_direct, z) * x_direct + expand_to(w_eps, z) * x_from_eps(z, eps, logsnr)
