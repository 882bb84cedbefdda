"""Distillation targets: stage two's progressive halving target and its step times.

Stage one: the student xhat_eta(z_t, c, w) regresses the guided teacher
(1 + w) xhat(z_t, c) - w xhat(z_t, null), evaluated as one batched teacher call: that target is
`guidance.guided_xhat` itself.

Stage two (one halving round, student with N steps): for i ~ U{1..N}, t = i/N,
t' = t - 0.5/N, t'' = t - 1/N, the teacher takes two DDIM steps t -> t' -> t'' and the target
xtilde = (z_t'' - (sigma_t''/sigma_t) z_t) / (alpha_t'' - (sigma_t''/sigma_t) alpha_t)
is the x that makes ONE student DDIM step t -> t'' land on the teacher's z_t''.
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from distill_jax.diffusion.guidance import DenoiseFn
from distill_jax.diffusion.samplers import ddim_step
from distill_jax.diffusion.schedule import LOGSNR_MAX, LOGSNR_MIN, alpha_sigma_at, expand_to


def progressive_target(
    teacher_denoise_fn: DenoiseFn,
    z_t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
    *,
    t: jax.Array,
    t_mid: jax.Array,
    t_end: jax.Array,
    single_jump: jax.Array | None = None,
    logsnr_min: float = LOGSNR_MIN,
    logsnr_max: float = LOGSNR_MAX,
) -> tuple[jax.Array, jax.Array]:
    """Two teacher DDIM steps t -> t_mid -> t_end and the student's one-step x target.

    xtilde = (z_end - (sigma_end / sigma_t) z_t) / (alpha_end - (sigma_end / sigma_t) alpha_t),
    so that ddim_step(xtilde, z_t, t, t_end) == z_end. Where t_end == 0 the teacher's second
    step already returns its x-hat, and the student's DDIM step to 0 returns its x-hat, so the
    target is z_end itself.

    Args:
      teacher_denoise_fn: teacher(z, t, conditions, w) -> xhat (a guided teacher or a student of
        the previous round).
      z_t: [B, ...] noisy data at times t.
      conditions: [B] int class labels.
      w: [B] guidance weights.
      t: [B] start times.
      t_mid: [B] intermediate times, t_end < t_mid < t.
      t_end: [B] end times, 0 <= t_end.
      single_jump: optional [B] bool; where True the target is the teacher's own x-hat at
        (z_t, t) (its single jump, already computed as the first step) instead of xtilde.
      logsnr_min: the schedule's lower log-SNR clip.
      logsnr_max: the schedule's upper log-SNR clip.

    Returns:
      (xtilde [B, ...], z_end [B, ...]).
    """
    kw = dict(logsnr_min=logsnr_min, logsnr_max=logsnr_max)
    t, t_mid, t_end = (jnp.asarray(v, jnp.float32) for v in (t, t_mid, t_end))
    x_first = teacher_denoise_fn(z_t, t, conditions, w).astype(z_t.dtype)
    z_mid = ddim_step(x_first, z_t, t, t_mid, **kw)
    x_second = teacher_denoise_fn(z_mid, t_mid, conditions, w).astype(z_t.dtype)
    z_end = ddim_step(x_second, z_mid, t_mid, t_end, **kw)

    alpha_t, sigma_t = alpha_sigma_at(t, **kw)
    alpha_end, sigma_end = alpha_sigma_at(t_end, **kw)
    ratio = sigma_end / sigma_t
    xtilde = (z_end - expand_to(ratio, z_t) * z_t) / expand_to(alpha_end - ratio * alpha_t, z_t)
    xtilde = jnp.where(expand_to(t_end == 0, z_t), z_end, xtilde)
    if single_jump is not None:
        xtilde = jnp.where(expand_to(single_jump, z_t), x_first, xtilde)
    return xtilde.astype(z_t.dtype), z_end


def round_times(
    i: jax.Array, *, steps: int | jax.Array, stochastic: bool = False
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(t, t_mid, t_end), each float32 [B], of the teacher's two steps for student steps i.

    Standard rounds: (i/N, (i - 0.5)/N, (i - 1)/N). For a student trained for the stochastic
    sampler (jumps of 2/N, the last jump 1/N): (i/N, (i - 1)/N, (i - 2)/N) for i >= 2 and the
    standard times for i = 1.

    Args:
      i: [B] int student step indices in 1..N.
      steps: the student's number of steps N >= 1 (the teacher has 2N); may be traced, so
        rounds that differ only in N lower to the same program (each round still jits its own
        step; the persistent compilation cache is what reuses the compiled code).
      stochastic: the times of the stochastic variant.
    """
    python_number = isinstance(steps, numbers.Number)
    if python_number and (not isinstance(steps, numbers.Integral) or steps < 1 or steps is True):
        raise ValueError(f"steps={steps!r} is invalid: accepted an integer >= 1.")
    i = jnp.asarray(i, jnp.float32)
    steps = jnp.asarray(steps, jnp.float32)
    # i - 1 and i - 0.5 are exact in float32, so t_end is exactly 0 for i = 1.
    t, t_mid, t_end = i / steps, (i - 0.5) / steps, (i - 1.0) / steps
    if not stochastic:
        return t, t_mid, t_end
    jump = i >= 2  # jumps of 2/N, made of two teacher jumps of 1/N
    return (
        t,
        jnp.where(jump, (i - 1.0) / steps, t_mid),
        jnp.where(jump, (i - 2.0) / steps, t_end),
    )
