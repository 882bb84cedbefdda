"""The train state pytree, the optimiser built from a config, and the generic train step.

A stage differs from another only by its loss function
`loss_fn(params, batch, rng, teacher) -> (loss, metrics)`; `make_train_step` wraps it into a
pure step `(state, batch, teacher) -> (state, metrics)` that applies AdamW, updates the EMA and
advances the step. `teacher` carries the frozen teacher (its parameters, or None): an argument of
the step, never part of the optimiser or the state, so it is never updated or re-saved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any
LossFn = Callable[[PyTree, dict, jax.Array, PyTree], tuple[jax.Array, dict]]


@flax.struct.dataclass
class TrainState:
    """Everything a stage checkpoints: step, params, EMA params, optimiser state, base rng.

    rng is a raw uint32[2] key; the step's key is fold_in(rng, step), so a resumed run draws the
    same randomness as an uninterrupted one.
    """

    step: jax.Array
    params: PyTree
    ema_params: PyTree
    opt_state: PyTree
    rng: jax.Array


def learning_rate_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
    """Linear warmup over opt.warmup_steps, then 'cosine' or 'linear' decay, or 'constant'."""
    warmup = max(0, min(int(opt.warmup_steps), num_steps))
    peak = float(opt.learning_rate)
    if opt.decay == "cosine":
        after = optax.cosine_decay_schedule(
            peak, max(1, num_steps - warmup), alpha=float(opt.end_learning_rate_factor)
        )
    elif opt.decay == "linear":
        after = optax.linear_schedule(
            peak, peak * float(opt.end_learning_rate_factor), max(1, num_steps - warmup)
        )
    elif opt.decay == "constant":
        after = optax.constant_schedule(peak)
    else:
        raise ValueError(
            f"optimizer.decay={opt.decay!r} is invalid: accepted 'cosine', 'linear', 'constant'."
        )
    if warmup == 0:
        return after
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), after], boundaries=[warmup]
    )


def make_optimizer(opt: ml_collections.ConfigDict, num_steps: int) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW with the warmup/decay schedule of `opt`."""
    schedule = learning_rate_schedule(opt, num_steps)
    parts = []
    if opt.grad_clip and opt.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(opt.grad_clip)))
    parts.append(
        optax.adamw(
            schedule,
            b1=float(opt.b1),
            b2=float(opt.b2),
            eps=float(opt.eps),
            weight_decay=float(opt.weight_decay),
        )
    )
    return optax.chain(*parts)


def create_state(
    params: PyTree, optimizer: optax.GradientTransformation, *, seed: int
) -> TrainState:
    """A fresh state at step 0 whose EMA starts at `params`."""
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        ema_params=jax.tree.map(jnp.copy, params),
        opt_state=optimizer.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def microbatch_gradients(
    loss_fn: LossFn, params: PyTree, batch: dict, rng: jax.Array, teacher: PyTree, count: int
) -> tuple[jax.Array, dict, PyTree]:
    """(loss, metrics, gradients) of the batch's mean loss, from `count` microbatches.

    The batch [B, ...] is cut into `count` slices of B / count examples (example i goes to
    slice i mod count, so each slice keeps the batch's sharding over the data axis), and a scan
    sums the slices' gradients: only one slice's activations are alive at a time. Slice j
    draws its noise from fold_in(rng, j). With count = 1 this is value_and_grad itself.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if count == 1:
        (loss, aux), grads = grad_fn(params, batch, rng, teacher)
        return loss, aux, grads

    def slices(leaf):
        return jnp.swapaxes(leaf.reshape(leaf.shape[0] // count, count, *leaf.shape[1:]), 0, 1)

    def one(index, micro):
        (loss, aux), grads = grad_fn(params, micro, jax.random.fold_in(rng, index), teacher)
        return loss, aux, grads

    def body(total, inputs):
        return jax.tree.map(jnp.add, total, one(*inputs)), None

    first = jax.tree.map(lambda leaf: leaf[0], jax.tree.map(slices, batch))
    zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(one, jnp.int32(0), first))
    inputs = (jnp.arange(count), jax.tree.map(slices, batch))
    total, _ = jax.lax.scan(body, zeros, inputs)
    return jax.tree.map(lambda x: x / count, total)


def make_train_step(
    loss_fn: LossFn,
    optimizer: optax.GradientTransformation,
    *,
    ema_decay: float,
    schedule: optax.Schedule | None = None,
    microbatches: int = 1,
) -> Callable[[TrainState, dict, PyTree], tuple[TrainState, dict]]:
    """Build the pure step (state, batch, teacher) -> (state, metrics).

    metrics holds scalars: loss, grad_norm, param_norm (of the updated params), learning_rate
    (when `schedule` is given) and the loss function's own metrics, the means over
    `microbatches` (gradient accumulation: `microbatch_gradients`). The caller jits it with
    shardings and donates the state.
    """

    def step(state: TrainState, batch: dict, teacher: PyTree) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(state.rng, state.step)
        loss, aux, grads = microbatch_gradients(
            loss_fn, state.params, batch, rng, teacher, microbatches
        )
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema_params = optax.incremental_update(params, state.ema_params, 1.0 - ema_decay)
        # param_norm is of the updated params, the ones a save after this step writes: the
        # NaN guard checks what it saves (in float32 it overflows to inf near |p| ~ 1e19).
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(params),
            **aux,
        }
        if schedule is not None:
            metrics["learning_rate"] = schedule(state.step)
        new_state = state.replace(
            step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
        )
        return new_state, metrics

    return step
