"""Guided distillation: the stage-one and stage-two (halving round) losses.

Stage one (Meng et al. Sec. 3.1): the student xhat_eta(z_t, c, w) - the teacher's network plus
the guidance branch - regresses the guided teacher (1 + w) xhat(z_t, c) - w xhat(z_t, null),
with w ~ U[w_min, w_max] per example (or a symmetric Beta(w_beta, w_beta) scaled to the range,
config.stage1.w_beta; stage two has its own, config.stage2.w_beta) and t ~ U[0, 1]. The
teacher is frozen: its params are the step's `teacher` argument and its two halves are one
batched call.

Stage two (Sec. 3.2, progressive distillation): in the round whose student has N steps, the
teacher is the previous round's result (stage one's for the first round, used as a 2N-step
sampler). i ~ U{1..N}, t = i/N; the teacher takes two DDIM steps t -> t - 0.5/N -> t - 1/N and
the student regresses the xtilde that makes one of its DDIM steps land on the teacher's result.

Stochastic variant (config stage2.stochastic; the reading implemented here): the stochastic
sampler steps deterministically from t = i/N to (i - 2)/N and re-noises to (i - 1)/N, and the
last step goes from 1/N to 0. So for i >= 2 the student is trained for a jump of 2/N, matching
two teacher jumps of 1/N (t -> t - 1/N -> t - 2/N; the teacher, trained the same way on its 2N
grid, was trained for exactly those jumps). For i = 1 the student jumps 1/N to 0: in the first
round (a continuous-time teacher) it matches two teacher half-steps 1/N -> 0.5/N -> 0; in later
rounds the teacher was trained at t = 1/N only for the jump straight to 0, so the target is
that jump (the teacher's own x-hat at t = 1/N).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.tree_util import Partial

from distill_jax.diffusion import guidance as guidance_lib
from distill_jax.diffusion import schedule, targets, weighting
from distill_jax.models import denoiser
from distill_jax.training.state import LossFn

PyTree = Any
# teacher state (its params, or a GaussianMixture) -> its x-hat denoise_fn(z, t, conditions, w).
TeacherDenoiser = Callable[[PyTree], Partial]


def _sample_common(batch: dict, rng: jax.Array, guidance: ml_collections.ConfigDict, w_beta: float):
    x, conditions = batch["x"], batch["condition"]
    w_rng, eps_rng, rest = jax.random.split(rng, 3)
    low, high, beta = float(guidance.w_min), float(guidance.w_max), float(w_beta)
    if beta == 1.0:  # uniform (the same draws as before w_beta existed)
        w = jax.random.uniform(w_rng, (x.shape[0],), minval=low, maxval=high)
    else:
        w = low + (high - low) * jax.random.beta(w_rng, beta, beta, (x.shape[0],))
    eps = jax.random.normal(eps_rng, x.shape, x.dtype)
    return x, conditions, w, eps, rest


def _student_regression(
    student: nn.Module,
    params: PyTree,
    z: jax.Array,
    t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
    target: jax.Array,
    dropout_rng: jax.Array,
    *,
    diffusion: ml_collections.ConfigDict,
    loss_weighting: str | None = None,
) -> tuple[jax.Array, dict]:
    """The loss both stages share: weight(lambda_t) * ||xhat_student(z, t, c, w) - target||^2.

    The weighting is `loss_weighting`, else `diffusion.loss_weighting`.
    """
    target = jax.lax.stop_gradient(target)
    student_fn = denoiser.make_denoise_fn(student, params, train=True, dropout_rng=dropout_rng)
    xhat = student_fn(z, t, conditions, w)
    logsnr = schedule.logsnr_schedule_cosine(
        t, logsnr_min=diffusion.logsnr_min, logsnr_max=diffusion.logsnr_max
    )
    name = loss_weighting or diffusion.loss_weighting
    per_example = weighting.weighted_mse(xhat, target, logsnr, weighting=name)
    return jnp.mean(per_example), {"target_mse": jnp.mean((xhat - target) ** 2)}


def make_stage_one_loss(
    student: nn.Module,
    teacher_denoiser: TeacherDenoiser,
    *,
    null_condition: Any,
    diffusion: ml_collections.ConfigDict,
    guidance: ml_collections.ConfigDict,
    w_beta: float = 1.0,
    loss_weighting: str | None = None,
) -> LossFn:
    """Loss (params, batch, rng, teacher_state) -> (loss, metrics) of stage one.

    `teacher_denoiser(teacher_state)` is the conditional teacher; `teacher_state` (its params,
    or a GaussianMixture) is the step's teacher argument. The target is the guided teacher
    `guidance.guided_xhat`, both halves in one batched call. w is drawn from
    Beta(w_beta, w_beta) scaled to [guidance.w_min, guidance.w_max] (1: uniform). The loss is
    weighted by `loss_weighting` (default `diffusion.loss_weighting`).
    """
    bounds = dict(logsnr_min=diffusion.logsnr_min, logsnr_max=diffusion.logsnr_max)

    def loss_fn(params: PyTree, batch: dict, rng: jax.Array, teacher_state: PyTree):
        x, conditions, w, eps, rest = _sample_common(batch, rng, guidance, w_beta)
        t_rng, dropout_rng = jax.random.split(rest)
        t = jax.random.uniform(t_rng, (x.shape[0],))
        z = schedule.q_sample(x, t, eps, **bounds)
        teacher_fn = teacher_denoiser(teacher_state)
        target = guidance_lib.guided_xhat(
            teacher_fn, z, t, conditions, w, null_condition=null_condition
        )
        return _student_regression(
            student,
            params,
            z,
            t,
            conditions,
            w,
            target,
            dropout_rng,
            diffusion=diffusion,
            loss_weighting=loss_weighting,
        )

    return loss_fn


def make_stage_two_loss(
    student: nn.Module,
    *,
    stochastic: bool,
    first_round: bool,
    diffusion: ml_collections.ConfigDict,
    guidance: ml_collections.ConfigDict,
    w_beta: float = 1.0,
) -> LossFn:
    """Loss (params, batch, rng, teacher) -> (loss, metrics) of a halving round.

    w is drawn as in stage one, with this stage's `w_beta`.
    teacher = {'params': the teacher's params, 'steps': the student's N as an int32 scalar}.
    N is an argument, not a constant, so rounds with the same number of training steps (which
    the learning-rate schedule bakes in) and the same `first_round` value lower to the same
    program, which the persistent compilation cache then reuses. The teacher has the student's
    architecture (the previous round's student, or stage one's).
    """
    bounds = dict(logsnr_min=diffusion.logsnr_min, logsnr_max=diffusion.logsnr_max)

    def loss_fn(params: PyTree, batch: dict, rng: jax.Array, teacher: PyTree):
        teacher_params, steps = teacher["params"], teacher["steps"]
        x, conditions, w, eps, rest = _sample_common(batch, rng, guidance, w_beta)
        i_rng, dropout_rng = jax.random.split(rest)
        i = jax.random.randint(i_rng, (x.shape[0],), 1, steps + 1)
        t, t_mid, t_end = targets.round_times(i, steps=steps, stochastic=stochastic)
        z_t = schedule.q_sample(x, t, eps, **bounds)
        teacher_fn = denoiser.make_denoise_fn(student, teacher_params)
        # Later stochastic rounds: at i = 1 the target is the teacher's own jump to 0.
        single_jump = (i == 1) if stochastic and not first_round else None
        target, _ = targets.progressive_target(
            teacher_fn,
            z_t,
            conditions,
            w,
            t=t,
            t_mid=t_mid,
            t_end=t_end,
            single_jump=single_jump,
            **bounds,
        )
        return _student_regression(
            student, params, z_t, t, conditions, w, target, dropout_rng, diffusion=diffusion
        )

    return loss_fn
