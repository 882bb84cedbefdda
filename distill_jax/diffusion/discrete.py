"""Discrete-time DDPM schedules (diffusers' K-step teachers) as continuous log-SNR time.

A teacher trained with a discrete schedule has K timesteps k = 0..K-1 with alphas_cumprod
abar_k (k = 0 is the least noisy). Its forward process z_k = sqrt(abar_k) x + sqrt(1 - abar_k)
eps is the variance-preserving process of this library at log-SNR
lambda_k = log(abar_k / (1 - abar_k)), so z needs no rescaling: only the network's time input
and its output convention change.

- Time input. A log-SNR lambda maps to the fractional timestep k(lambda) by linear
  interpolation of k against lambda_k (`timestep_from_logsnr`; lambda_k falls strictly with
  k). The choice between grid points: the network sees a timestep between the two trained
  integers whose log-SNRs bracket lambda, in proportion to the log-SNR distance. On the grid
  points it is exact; in between, the network's own interpolation in its timestep embedding
  decides (bench/discrete_time.py measures what this costs against rounding to the nearest
  trained timestep).
- Output. diffusers' prediction types are this library's parameterisations:
  'epsilon' -> 'eps', 'v_prediction' -> 'v' (v = alpha eps - sigma x, the same sign), and
  'sample' -> 'x'; `xhat_from_output` converts them to x-hat.
- Range. The teacher was trained on [lambda_{K-1}, lambda_0]; a run clips its cosine schedule
  to that range (`trained_logsnr_range`), so samplers and losses never leave it.

Betas follow diffusers' DDPMScheduler: 'linear' (linspace(beta_start, beta_end, K)),
'scaled_linear' (linspace(sqrt(beta_start), sqrt(beta_end), K)^2) and 'squaredcos_cap_v2'
(Nichol and Dhariwal's cosine alpha-bar, betas capped at 0.999), computed in float32 as
diffusers does.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion.schedule import t_from_logsnr

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# diffusers' prediction_type -> this library's parameterisation.
PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x"}


def _cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' betas_for_alpha_bar(alpha_transform_type='cosine')."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    steps = range(num_timesteps)
    betas = [
        min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
        for i in steps
    ]
    return np.asarray(betas, np.float32)


def discrete_betas(
    beta_schedule: str, *, num_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
    """The K betas of a diffusers beta schedule, float32 [K].

    Raises:
      ValueError: an unknown schedule or fewer than 2 timesteps.
    """
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule={beta_schedule!r} is not supported: accepted "
            f"{', '.join(BETA_SCHEDULES)}."
        )
    if int(num_timesteps) < 2:
        raise ValueError(f"num_train_timesteps={num_timesteps} must be at least 2.")
    k = int(num_timesteps)
    if beta_schedule == "linear":
        return np.linspace(beta_start, beta_end, k, dtype=np.float32)
    if beta_schedule == "scaled_linear":
        return np.linspace(beta_start**0.5, beta_end**0.5, k, dtype=np.float32) ** 2
    return _cosine_betas(k)


def alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """abar_k = prod_{j <= k} (1 - beta_j), float32 as diffusers computes it."""
    return np.cumprod(1.0 - np.asarray(betas, np.float32), dtype=np.float32)


def logsnr_table(
    beta_schedule: str, *, num_timesteps: int, beta_start: float, beta_end: float
) -> np.ndarray:
    """lambda_k = log(abar_k / (1 - abar_k)) for k = 0..K-1, float64 [K], strictly falling.

    Raises:
      ValueError: a schedule whose log-SNR is not finite and strictly falling (a zero
        terminal SNR, or betas that are not all in (0, 1)).
    """
    abar = alphas_cumprod(
        discrete_betas(
            beta_schedule, num_timesteps=num_timesteps, beta_start=beta_start, beta_end=beta_end
        )
    ).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        table = np.log(abar) - np.log1p(-abar)
    if not np.all(np.isfinite(table)) or not np.all(np.diff(table) < 0):
        raise ValueError(
            f"The {beta_schedule} schedule (beta_start={beta_start}, beta_end={beta_end}, "
            f"{num_timesteps} steps) has no finite, strictly falling log-SNR: accepted are "
            "betas strictly between 0 and 1 (no zero terminal SNR)."
        )
    return table


def trained_logsnr_range(table: np.ndarray) -> tuple[float, float]:
    """(lambda_{K-1}, lambda_0): the log-SNR range the discrete teacher was trained on."""
    return float(table[-1]), float(table[0])


def timestep_from_logsnr(logsnr: jax.Array, table: np.ndarray) -> jax.Array:
    """The fractional timestep k(lambda): k linearly interpolated against lambda_k.

    Args:
      logsnr: log-SNRs, any shape; values outside [lambda_{K-1}, lambda_0] clip to 0 or K-1.
      table: lambda_k [K] from `logsnr_table` (strictly falling).

    Returns:
      k in [0, K-1], logsnr's shape, in logsnr's float dtype (float32 unless x64 is on).
    """
    logsnr = jnp.asarray(logsnr)
    dtype = logsnr.dtype if jnp.issubdtype(logsnr.dtype, jnp.floating) else jnp.float32
    rising = jnp.asarray(np.asarray(table)[::-1], dtype)
    steps = jnp.arange(len(table) - 1, -1, -1, dtype=dtype)
    return jnp.interp(logsnr.astype(dtype), rising, steps)


def logsnr_from_timestep(timestep: jax.Array, table: np.ndarray) -> jax.Array:
    """The inverse of `timestep_from_logsnr`: lambda linearly interpolated at fractional k."""
    timestep = jnp.asarray(timestep)
    dtype = timestep.dtype if jnp.issubdtype(timestep.dtype, jnp.floating) else jnp.float32
    grid = jnp.arange(len(table), dtype=dtype)
    return jnp.interp(timestep.astype(dtype), grid, jnp.asarray(table, dtype))


def parameterisation_of(prediction_type: str) -> str:
    """The parameterisation ('eps', 'v', 'x') of a diffusers prediction_type.

    Raises:
      ValueError: an unknown prediction type, naming the accepted ones.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type={prediction_type!r} is not supported: accepted "
            f"{', '.join(PREDICTION_TYPES)}."
        )
    return PREDICTION_TYPES[prediction_type]


TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def scheduler_timesteps(
    num_inference_steps: int,
    *,
    num_timesteps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
) -> np.ndarray:
    """The integer timesteps diffusers' DDIMScheduler.set_timesteps visits, noisiest first.

    'leading' arange(N) * (K // N) + offset, 'trailing' round(arange(K, 0, -K / N)) - 1,
    'linspace' round(linspace(0, K - 1, N)).

    Raises:
      ValueError: an unknown spacing, or more steps than the schedule has timesteps.
    """
    n, k = int(num_inference_steps), int(num_timesteps)
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(
            f"timestep_spacing={spacing!r} is not supported: accepted "
            f"{', '.join(TIMESTEP_SPACINGS)}."
        )
    if not 1 <= n <= k:
        raise ValueError(f"{n} sampling steps are invalid for {k} timesteps: accepted 1..{k}.")
    if spacing == "leading":
        steps = (np.arange(n) * (k // n)).round()[::-1].astype(np.int64) + int(steps_offset)
    elif spacing == "trailing":
        steps = np.round(np.arange(k, 0, -k / n)).astype(np.int64) - 1
    else:
        steps = np.linspace(0, k - 1, n).round()[::-1].astype(np.int64)
    return steps


def times_of_timesteps(
    timesteps: np.ndarray, table: np.ndarray, *, logsnr_min: float, logsnr_max: float
) -> np.ndarray:
    """A DDIM time grid [N + 1] that visits discrete `timesteps` (noisiest first).

    The grid rises from 0 (`samplers.run_sampler(times=...)`) on a run's clipped cosine
    schedule.

    The last step goes from the smallest timestep to t = 0 and returns x-hat, as diffusers'
    DDIM does with set_alpha_to_one=True.
    """
    logsnrs = np.asarray(table, np.float64)[np.asarray(timesteps)[::-1]]
    logsnrs = np.clip(logsnrs, logsnr_min, logsnr_max)
    times = t_from_logsnr(logsnrs, logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    return np.concatenate([[0.0], np.clip(np.asarray(times), 0.0, 1.0)]).astype(np.float32)
