"""Flow-matching teachers (SD3, SD3.5, FLUX-style) as this library's variance-preserving process.

A rectified-flow teacher diffuses z_fm = (1 - s) x + s eps for s in [0, 1] (s = 1 is noise) and
predicts the velocity v = eps - x. Divided by r = sqrt((1 - s)^2 + s^2), z_fm is the VP process
z = alpha x + sigma eps with alpha = (1 - s) / r, sigma = s / r, so every sampler, loss and
distillation target of this library applies unchanged once three things are converted:

- Noise level: lambda = 2 log((1 - s) / s), and back s = sigmoid(-lambda / 2)
  (`logsnr_from_flow_sigma`, `flow_sigma_from_logsnr`). Since alpha + sigma = 1 / r, the
  network's input is z_fm = z / (alpha + sigma) (`flow_input`).
- Time input: the network embeds num_train_timesteps * s, as diffusers' SD3 pipeline passes
  `timestep = sigma * 1000` (`flow_timestep`).
- Output: x-hat = z_fm - s v = (z - sigma v) / (alpha + sigma) (`x_from_velocity`); the error
  of v reaches x-hat multiplied by s <= 1, so (unlike epsilon) nothing is amplified near noise.
  A guided velocity v_w = v_u + g (v_c - v_u) gives x-hat_w = (1 + w) x-hat_c - w x-hat_u with
  g = 1 + w: diffusers' guidance_scale is 1 + w here, as for discrete teachers.

diffusers' Euler step z_fm' = z_fm + (s' - s) v is exactly this library's DDIM step between the
same noise levels (both land on (1 - s') x-hat + s' eps-hat), so a flow teacher's own sampler
is DDIM on the times `times_of_flow_sigmas` gives.

The schedule of noise levels a FlowMatchEulerDiscreteScheduler visits (`scheduler_sigmas`):
linspace(K sigma_max, K sigma_min, N) / K, shifted by `shift` (s -> shift s / (1 + (shift - 1)
s)) or, with use_dynamic_shifting, by the resolution's mu (exp(mu) / (exp(mu) + (1 / s - 1)),
mu linear in the image's token count between base_shift and max_shift), then 0 appended. The
teacher was trained on the shifted training sigmas [sigma_min, 1] (`trained_logsnr_max` gives
the top of that range in log-SNR; its bottom, s = 1, is pure noise: lambda = -infinity, which a
run clips to its own logsnr_min).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion.schedule import alpha_sigma, expand_to, t_from_logsnr

TIME_SHIFT_TYPES = ("exponential", "linear")


def logsnr_from_flow_sigma(s):
    """lambda = 2 log((1 - s) / s) for s in (0, 1); numpy or jax, float64 if given float64."""
    xp = jnp if isinstance(s, jax.Array) else np
    return 2.0 * (xp.log1p(-s) - xp.log(s))


def flow_sigma_from_logsnr(logsnr: jax.Array) -> jax.Array:
    """s = sigmoid(-lambda / 2): the flow's noise level at log-SNR lambda."""
    return jax.nn.sigmoid(-0.5 * jnp.asarray(logsnr))


def flow_timestep(logsnr: jax.Array, num_train_timesteps: int) -> jax.Array:
    """The flow network's time input at log-SNR lambda: num_train_timesteps * s."""
    return float(num_train_timesteps) * flow_sigma_from_logsnr(logsnr)


def flow_input(z: jax.Array, logsnr: jax.Array) -> jax.Array:
    """z_fm = z / (alpha + sigma): the flow network's input for the VP z at log-SNR lambda."""
    alpha, sigma = alpha_sigma(logsnr)
    return z / expand_to(alpha + sigma, z).astype(z.dtype)


def x_from_velocity(z: jax.Array, velocity: jax.Array, logsnr: jax.Array) -> jax.Array:
    """x-hat = (z - sigma v) / (alpha + sigma) for the VP z and the velocity v = eps - x."""
    alpha, sigma = alpha_sigma(logsnr)
    return (z - expand_to(sigma, z) * velocity) / expand_to(alpha + sigma, z)


def velocity_from_x_eps(x: jax.Array, eps: jax.Array) -> jax.Array:
    """v = eps - x, the flow teacher's target."""
    return eps - x


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's static shift: s -> shift s / (1 + (shift - 1) s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def dynamic_shift_mu(
    image_seq_len: int,
    *,
    base_image_seq_len: int,
    max_image_seq_len: int,
    base_shift: float,
    max_shift: float,
) -> float:
    """diffusers' calculate_shift: mu linear in the token count, base_shift .. max_shift."""
    slope = (max_shift - base_shift) / (max_image_seq_len - base_image_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_image_seq_len)


def time_shift(sigmas: np.ndarray, mu: float, kind: str = "exponential") -> np.ndarray:
    """Resolution-dependent shifting: exp(mu) / (exp(mu) + (1/s - 1)), or mu / (mu + (1/s - 1))."""
    if kind not in TIME_SHIFT_TYPES:
        raise ValueError(
            f"time_shift_type={kind!r} is not supported: accepted {', '.join(TIME_SHIFT_TYPES)}."
        )
    scale = math.exp(mu) if kind == "exponential" else mu
    return scale / (scale + (1 / sigmas - 1))


def training_sigmas(num_train_timesteps: int, shift: float = 1.0) -> np.ndarray:
    """The scheduler's K training sigmas, noisiest first: (K..1) / K, statically shifted.

    With use_dynamic_shifting diffusers leaves them unshifted (pass shift=1).
    """
    k = int(num_train_timesteps)
    timesteps = np.linspace(1, k, k, dtype=np.float32)[::-1].copy()
    sigmas = timesteps / k
    return shift_sigmas(sigmas, float(shift)).astype(np.float32)


def scheduler_sigmas(
    num_inference_steps: int,
    *,
    num_train_timesteps: int,
    shift: float = 1.0,
    mu: float | None = None,
    time_shift_type: str = "exponential",
) -> np.ndarray:
    """The N + 1 noise levels FlowMatchEulerDiscreteScheduler.set_timesteps(N) visits.

    `mu` given (use_dynamic_shifting) replaces the static `shift`. Float32, noisiest first,
    ending in 0.

    Raises:
      ValueError: fewer than 1 step.
    """
    n, k = int(num_inference_steps), int(num_train_timesteps)
    if n < 1:
        raise ValueError(f"{n} sampling steps are invalid: accepted 1 or more.")
    train = training_sigmas(k, 1.0 if mu is not None else shift)
    timesteps = np.linspace(float(train[0]) * k, float(train[-1]) * k, n)
    sigmas = timesteps / k
    if mu is not None:
        sigmas = time_shift(sigmas, float(mu), time_shift_type)
    else:
        sigmas = shift_sigmas(sigmas, float(shift))
    return np.concatenate([sigmas.astype(np.float32), np.zeros(1, np.float32)])


def trained_logsnr_max(num_train_timesteps: int, shift: float = 1.0) -> float:
    """lambda of the least noisy training sigma: the top of the flow teacher's trained range."""
    sigma_min = float(training_sigmas(num_train_timesteps, shift)[-1])
    return float(logsnr_from_flow_sigma(np.float64(sigma_min)))


def times_of_flow_sigmas(sigmas: np.ndarray, *, logsnr_min: float, logsnr_max: float) -> np.ndarray:
    """The DDIM time grid (rising from 0, `samplers.run_sampler(times=...)`) of flow sigmas.

    `sigmas` are a flow scheduler's noise levels, noisiest first, ending in 0 (as
    `scheduler_sigmas` gives): s = 1 maps to t = 1 (the run's logsnr_min), s = 0 to t = 0
    (the last step returns x-hat, as diffusers' last Euler step to sigma 0 does).
    """
    sigmas = np.asarray(sigmas, np.float64)[::-1]
    inner = (sigmas > 0) & (sigmas < 1)
    logsnrs = np.where(sigmas >= 1, logsnr_min, logsnr_max)
    logsnrs[inner] = logsnr_from_flow_sigma(sigmas[inner])
    logsnrs = np.clip(logsnrs, logsnr_min, logsnr_max)
    times = np.asarray(t_from_logsnr(logsnrs, logsnr_min=logsnr_min, logsnr_max=logsnr_max))
    times = np.where(sigmas <= 0, 0.0, np.clip(times, 0.0, 1.0))
    return times.astype(np.float32)
