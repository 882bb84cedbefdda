"""Samplers over any denoise_fn(z, t, conditions, w) -> xhat: DDIM, ancestral, stochastic.

All samplers walk the grid t_i = t_start * i / N for i = N..0 and end with the x-hat of the
last step (t = 0 is data). Each is one jitted function with a `jax.lax.fori_loop` inside,
compiled once per (sampler, steps, shapes, dtypes, with or without inpainting, schedule).
`t_start` is a traced value, so image-to-image sweeps over `t_start` reuse one compilation.

The denoise_fn is passed into the jitted function as a pytree: give a `jax.tree_util.Partial`
(e.g. Partial(apply_fn, params)) whose function is static and whose bound arguments are traced,
so new parameters do not recompile; a plain callable is wrapped as Partial(fn) and hits the
cache as long as it is the same function object.

Image-to-image (SDEdit): z = noise_to(x, t_start, rng), then run any sampler with the same
t_start. Inpainting: give `known` [B, ...] and `mask` [B, ...] (1 = known pixel); the known
pixels of z_init and of every new z_s are replaced by `known` noised forward to that time with
fresh noise, and the output keeps them exactly: x = mask * known + (1 - mask) * xhat.
"""

from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from distill_jax.diffusion.guidance import DenoiseFn, as_condition, as_partial
from distill_jax.diffusion.schedule import (
    LOGSNR_MAX,
    LOGSNR_MIN,
    alpha_sigma_at,
    expand_to,
    q_sample,
    transition,
)

SAMPLERS = ("ddim", "ancestral", "stochastic")


def ddim_step(
    xhat: jax.Array,
    z_t: jax.Array,
    t: jax.Array,
    s: jax.Array,
    *,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    last: jax.Array | None = None,
) -> jax.Array:
    """One DDIM step t -> s: z_s = alpha_s xhat + sigma_s (z_t - alpha_t xhat) / sigma_t.

    Returns exactly xhat where `last` (default: where s == 0), the last step of a sampler.

    Args:
      xhat: [B, ...] x prediction at (z_t, t).
      z_t: [B, ...] noisy data at time t.
      t: [B] or scalar current times.
      s: [B] or scalar target times, s <= t.
      logsnr_min: the schedule's lower log-SNR clip (as in `schedule`).
      logsnr_max: the schedule's upper log-SNR clip.
      last: [B] or scalar bool, where to return xhat; None means s == 0. A time grid that
        visits t = 0 before its last step (a discrete teacher's own grid, whose timestep 0 is
        the clipped schedule's t = 0) steps onto it as onto any other time.
    """
    kw = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    alpha_t, sigma_t = alpha_sigma_at(t, **kw)
    alpha_s, sigma_s = alpha_sigma_at(s, **kw)
    ratio = expand_to(sigma_s / sigma_t, z_t)
    z_s = ratio * z_t + (expand_to(alpha_s, z_t) - ratio * expand_to(alpha_t, z_t)) * xhat
    is_last = expand_to(jnp.asarray(s) == 0 if last is None else jnp.asarray(last), z_t)
    return jnp.where(is_last, xhat, z_s).astype(z_t.dtype)


def _ancestral_step(
    xhat: jax.Array,
    z_t: jax.Array,
    t: jax.Array,
    s: jax.Array,
    noise: jax.Array,
    **kw: float,
) -> jax.Array:
    """Sample q(z_s | z_t, x = xhat); exactly xhat where s == 0.

    Mean alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 / sigma_t^2 xhat,
    variance sigma_{t|s}^2 sigma_s^2 / sigma_t^2.
    """
    alpha_ts, sigma_ts = transition(t, s, **kw)
    _, sigma_t = alpha_sigma_at(t, **kw)
    alpha_s, sigma_s = alpha_sigma_at(s, **kw)
    coef_z = alpha_ts * sigma_s**2 / sigma_t**2
    coef_x = alpha_s * sigma_ts**2 / sigma_t**2
    std = sigma_ts * sigma_s / sigma_t
    z_s = expand_to(coef_z, z_t) * z_t + expand_to(coef_x, z_t) * xhat + expand_to(std, z_t) * noise
    return jnp.where(expand_to(s == 0, z_t), xhat, z_s).astype(z_t.dtype)


def _stochastic_step(
    xhat: jax.Array,
    z_t: jax.Array,
    t: jax.Array,
    s: jax.Array,
    u: jax.Array,
    noise: jax.Array,
    **kw: float,
) -> jax.Array:
    """DDIM from t down to u, then forward noise from u up to s; plain DDIM to s where s == 0."""
    z_u = ddim_step(xhat, z_t, t, u, **kw)
    alpha_su, sigma_su = transition(s, u, **kw)
    z_s = expand_to(alpha_su, z_t) * z_u + expand_to(sigma_su, z_t) * noise
    last = ddim_step(xhat, z_t, t, s, **kw)
    return jnp.where(expand_to(s == 0, z_t), last, z_s).astype(z_t.dtype)


def _paste_known(
    z: jax.Array,
    s: jax.Array,
    known: jax.Array | None,
    mask: jax.Array | None,
    noise: jax.Array,
    **kw: float,
) -> jax.Array:
    """Replace known pixels of z (at times s) by `known` noised to s; `known` itself at s == 0."""
    if known is None:
        return z
    noised = q_sample(known, s, noise, **kw)
    noised = jnp.where(expand_to(s == 0, z), known, noised)
    return (mask * noised + (1 - mask) * z).astype(z.dtype)


@functools.partial(jax.jit, static_argnames=("sampler", "steps", "logsnr_min", "logsnr_max"))
def _sample(
    denoise_fn: Partial,
    z_init: jax.Array,
    conditions: jax.Array,
    w: jax.Array,  # [steps, B]
    rng: jax.Array | None,
    known: jax.Array | None,
    mask: jax.Array | None,
    grid: jax.Array,  # [steps + 1]: grid[i] is t_i, grid[0] = 0
    *,
    sampler: str,
    steps: int,
    logsnr_min: float,
    logsnr_max: float,
) -> jax.Array:
    kw = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    batch = z_init.shape[0]

    def times(i: jax.Array) -> jax.Array:
        # t_i per example; i - 2 is -1 at the last step, whose u is unused.
        return jnp.full((batch,), grid[jnp.maximum(i, 0)], jnp.float32)

    def noise_pair(i: jax.Array) -> tuple[jax.Array, jax.Array]:
        key = jax.random.fold_in(rng, i)
        k_step, k_known = jax.random.split(key)
        shape, dtype = z_init.shape, z_init.dtype
        return jax.random.normal(k_step, shape, dtype), jax.random.normal(k_known, shape, dtype)

    z = z_init
    if known is not None:
        z = _paste_known(z, times(steps), known, mask, noise_pair(steps + 1)[1], **kw)

    def body(k: jax.Array, z: jax.Array) -> jax.Array:
        i = steps - k
        t, s = times(i), times(i - 1)
        xhat = denoise_fn(z, t, conditions, w[k]).astype(z.dtype)
        if sampler == "ddim":
            z_s = ddim_step(xhat, z, t, s, last=i == 1, **kw)
        else:
            step_noise, _ = noise_pair(i)
            if sampler == "ancestral":
                z_s = _ancestral_step(xhat, z, t, s, step_noise, **kw)
            else:
                z_s = _stochastic_step(xhat, z, t, s, times(i - 2), step_noise, **kw)
        if known is not None:
            z_s = _paste_known(z_s, s, known, mask, noise_pair(i)[1], **kw)
        return z_s

    return jax.lax.fori_loop(0, steps, body, z)


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps={steps!r} is invalid: accepted an integer >= 1.")


def _check_t_start(t_start: float) -> float:
    if isinstance(t_start, bool) or not isinstance(t_start, numbers.Real):
        raise ValueError(f"t_start={t_start!r} is invalid: accepted a number in (0, 1].")
    if not 0.0 < float(t_start) <= 1.0:
        raise ValueError(f"t_start={t_start!r} is invalid: accepted a number in (0, 1].")
    return float(t_start)


def per_step_weights(w, *, steps: int, batch: int) -> jax.Array:
    """w as [steps, batch] float32: a scalar or [B] repeated per step, [steps, B|1] broadcast."""
    w = jnp.asarray(w, jnp.float32)
    constant = w.ndim <= 1 and w.size in (1, batch)
    per_step = w.ndim == 2 and w.shape[0] == steps and w.shape[1] in (1, batch)
    if not (constant or per_step):
        raise ValueError(
            f"w of shape {w.shape} is invalid: accepted a scalar, [B] (B = {batch}), or per "
            f"step [{steps}, B] or [{steps}, 1]."
        )
    if constant:
        w = jnp.reshape(w, (1, -1))
    return jnp.broadcast_to(w, (steps, batch))


def _time_grid(sampler: str, steps: int, t_start: float, times) -> jax.Array:
    """[steps + 1] times, t_0 = 0 first: t_start * i / steps, or the given grid checked."""
    if times is None:
        return jnp.float32(t_start) * jnp.arange(steps + 1, dtype=jnp.float32) / steps
    grid = jnp.asarray(times, jnp.float32)
    if sampler != "ddim" or t_start != 1.0:
        raise ValueError(
            "times (a custom time grid) is accepted with sampler='ddim' and t_start=1 only."
        )
    ok = grid.shape == (steps + 1,) and bool(grid[0] == 0) and bool(jnp.all(jnp.diff(grid) >= 0))
    if not ok or not bool(grid[-1] <= 1):
        raise ValueError(
            f"times of shape {grid.shape} is invalid: accepted [steps + 1] = [{steps + 1}] "
            "rising times in [0, 1] that start at 0."
        )
    return grid


def _check_inpainting(z_init: jax.Array, known, mask):
    """(known, mask) as arrays of z_init's shape and dtype, or (None, None)."""
    if (known is None) != (mask is None):
        raise ValueError("known and mask must be given together (inpainting) or both be None.")
    if known is None:
        return None, None
    known = jnp.asarray(known, z_init.dtype)
    mask = jnp.asarray(mask, z_init.dtype)
    for name, value in (("known", known), ("mask", mask)):
        if value.shape != z_init.shape:
            raise ValueError(
                f"{name} shape {value.shape} is invalid: accepted z_init's shape {z_init.shape}."
            )
    return known, mask


def run_sampler(
    sampler: str,
    denoise_fn: DenoiseFn,
    z_init: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
    rng: jax.Array | None = None,
    *,
    steps: int,
    t_start: float = 1.0,
    known: jax.Array | None = None,
    mask: jax.Array | None = None,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
    times: jax.Array | None = None,
) -> jax.Array:
    """Run the sampler named `sampler` ('ddim', 'ancestral' or 'stochastic'); x at t = 0.

    Args:
      sampler: one of SAMPLERS (see `ddim_sample`, `ancestral_sample`, `stochastic_sample`).
      denoise_fn: denoise_fn(z, t, conditions, w) -> xhat; a Partial keeps bound params traced.
      z_init: [B, ...] start at t_start (N(0, I) for t_start = 1, `noise_to(x, ...)` otherwise).
      conditions: [B] int class labels (or a scalar, broadcast), or text conditions [B, L, D].
      w: guidance weights: a scalar or [B] (the same at every step), or per step [steps, B]
        or [steps, 1], first step first (a guidance schedule, see `guidance_schedule`).
      rng: PRNG key for the step noise (ancestral, stochastic) or inpainting; unused by plain
        DDIM.
      steps: number of network evaluations N >= 1.
      t_start: start time in (0, 1]; below 1 for image-to-image.
      known: [B, ...] inpainting values, or None; known pixels are kept exactly.
      mask: [B, ...] 1 where `known` holds a known pixel, 0 elsewhere; None with `known`.
      logsnr_min: the schedule's lower log-SNR clip (as in `schedule`).
      logsnr_max: the schedule's upper log-SNR clip.
      times: 'ddim' only: the time grid [steps + 1] instead of t_start * i / steps, rising
        from times[0] = 0 (e.g. a discrete teacher's own timesteps,
        `discrete.times_of_timesteps`); the sampler starts at times[-1].

    Returns:
      [B, ...] samples, the x-hat of the last step.
    """
    z_init = jnp.asarray(z_init)
    conditions, w, rng, known, mask = _checked_inputs(
        sampler, z_init, conditions, w, rng, known, mask, steps=steps
    )
    return _sample(
        as_partial(denoise_fn),
        z_init,
        conditions,
        w,
        rng,
        known,
        mask,
        _time_grid(sampler, steps, _check_t_start(t_start), times),
        sampler=sampler,
        steps=int(steps),
        logsnr_min=float(logsnr_min),
        logsnr_max=float(logsnr_max),
    )


def _checked_inputs(sampler, z_init, conditions, w, rng, known, mask, *, steps: int) -> tuple:
    """`run_sampler`'s inputs checked and broadcast: (conditions, w [steps, B], rng, known, mask).

    rng is None where the sampler does not draw noise (plain DDIM without inpainting).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is unknown: accepted {', '.join(SAMPLERS)}.")
    _check_steps(steps)
    if z_init.ndim < 1:
        raise ValueError(f"z_init must have a batch axis: got shape {z_init.shape}.")
    known, mask = _check_inpainting(z_init, known, mask)
    batch = z_init.shape[0]
    w = per_step_weights(w, steps=steps, batch=batch)
    needs_rng = sampler != "ddim" or known is not None
    if needs_rng and rng is None:
        raise ValueError(f"rng is required by the {sampler} sampler (or for inpainting).")
    conditions = as_condition(conditions)
    if conditions.ndim < 2:  # class labels (a scalar broadcasts); text conditions are [B, L, D]
        conditions = jnp.broadcast_to(conditions, (batch,))
    return conditions, w, rng if needs_rng else None, known, mask


def _named_sampler(sampler: str, doc: str) -> functools.partial:
    """`run_sampler` with its first argument fixed, documented as its own function."""
    named = functools.partial(run_sampler, sampler)
    named.__doc__ = doc
    return named


ddim_sample = _named_sampler(
    "ddim",
    """Deterministic DDIM: `steps` steps on t_i = t_start * i / steps, returning x at t = 0.

    ddim_sample(denoise_fn, z_init, conditions, w, rng=None, *, steps, ...): arguments as in
    `run_sampler`; `rng` is needed only for inpainting (noise for the known pixels).
    """,
)

ancestral_sample = _named_sampler(
    "ancestral",
    """DDPM ancestral sampling: z_s ~ q(z_s | z_t, x = xhat) on t_i = t_start * i / steps.

    The posterior has mean alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma_{t|s}^2 /
    sigma_t^2 xhat and variance sigma_{t|s}^2 sigma_s^2 / sigma_t^2; the last step returns xhat.
    ancestral_sample(denoise_fn, z_init, conditions, w, rng, *, steps, ...): arguments as in
    `run_sampler`; `rng` is a PRNG key for the step noise.
    """,
)

stochastic_sample = _named_sampler(
    "stochastic",
    """The distilled model's stochastic sampler (Meng et al. 2022, section 3.2 of the note).

    Reading implemented (with h = t_start / steps): from t = i h with i > 1, one DDIM jump of
    2h down to u = (i - 2) h, then forward noise of h back up to s = (i - 1) h:
    z_s = (alpha_s / alpha_u) z_u + sigma_{s|u} xi, xi ~ N(0, I). The last step (i = 1) is a
    plain DDIM step of h to 0 and returns xhat. So the network is evaluated `steps` times and
    sees jumps of 2h except the last jump of h, which is what a student trained for stochastic
    sampling expects. At i = 2, u = 0 and the DDIM jump returns xhat; the forward noise uses
    the clipped schedule's alpha_0 and sigma_{s|0}. stochastic_sample(denoise_fn, z_init,
    conditions, w, rng, *, steps, ...): arguments as in `run_sampler`.
    """,
)


def noise_to(
    x: jax.Array,
    t_start: float,
    rng: jax.Array,
    *,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> jax.Array:
    """Image-to-image start point z = alpha x + sigma eps at time t_start in (0, 1]; [B, ...].

    Run any sampler from it with the same `t_start` (SDEdit): small t_start keeps the input
    close, t_start = 1 ignores it.
    """
    t_start = _check_t_start(t_start)
    x = jnp.asarray(x)
    eps = jax.random.normal(rng, x.shape, x.dtype)
    t = jnp.full(x.shape[:1], t_start, jnp.float32)
    return q_sample(x, t, eps, logsnr_min=logsnr_min, logsnr_max=logsnr_max).astype(x.dtype)
