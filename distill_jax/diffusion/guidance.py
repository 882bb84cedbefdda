"""Classifier-free guidance over a conditional denoiser, as ONE batched network call.

Two function shapes are used across the project:

- cond_fn(z, t, conditions) -> xhat: a conditional denoiser (the teacher network). z [B, ...],
  t [B] float times in [0, 1], conditions: [B] int32 class labels with the integer
  `null_condition` meaning unconditional, or a text condition float32 [B, L, D] (token states)
  whose `null_condition` is the empty prompt's [L, D].
- denoise_fn(z, t, conditions, w) -> xhat: what every sampler and target consumes; w [B] float is
  the guidance weight (a student takes it as input, a guided teacher applies it).

Guidance: xhat_w = (1 + w) xhat(z, c) - w xhat(z, null); w = 0 is the conditional model and
w = -1 the unconditional one. The two halves are stacked into one batch of 2B so a network is
evaluated once per guided call.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from distill_jax.diffusion.schedule import expand_to

CondFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
DenoiseFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def as_partial(fn: Callable) -> Partial:
    """Return `fn` as a `jax.tree_util.Partial` (a pytree whose function is static).

    A Partial is returned as is, so its bound arguments (e.g. network parameters) stay traced
    leaves; any other callable is wrapped as Partial(fn), whose identity is its function object.
    """
    if isinstance(fn, Partial):
        return fn
    if not callable(fn):
        raise TypeError(f"expected a callable or a jax.tree_util.Partial, got {type(fn)!r}.")
    return Partial(fn)


def as_condition(conditions) -> jax.Array:
    """A condition as an array: int32 class labels, or float32 (text token states)."""
    conditions = jnp.asarray(conditions)
    if jnp.issubdtype(conditions.dtype, jnp.integer) or conditions.dtype == jnp.bool_:
        return conditions.astype(jnp.int32)
    return conditions.astype(jnp.float32)


def null_like(conditions: jax.Array, null_condition: int | jax.Array) -> jax.Array:
    """The null condition broadcast to the shape of `conditions` (a class index or a prompt's)."""
    return jnp.broadcast_to(jnp.asarray(null_condition, conditions.dtype), conditions.shape)


def guided_xhat(
    cond_fn: CondFn,
    z: jax.Array,
    t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
    *,
    null_condition: int | jax.Array,
) -> jax.Array:
    """Guided x-hat (1 + w) xhat(z, c) - w xhat(z, null) [B, ...] with one call of `cond_fn`.

    Args:
      cond_fn: cond_fn(z, t, conditions) -> xhat, called once on a batch of 2B.
      z: [B, ...] noisy data.
      t: [B] (or scalar) times in [0, 1].
      conditions: [B] int class labels, or a text condition [B, L, D].
      w: [B] (or scalar) guidance weights.
      null_condition: the label meaning "no class" (the number of classes by convention), or the
        empty prompt's condition [L, D].
    """
    batch = z.shape[0]
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (batch,))
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), (batch,))
    conditions = as_condition(conditions)
    null = null_like(conditions, null_condition)
    xhat = cond_fn(
        jnp.concatenate([z, z], axis=0),
        jnp.concatenate([t, t], axis=0),
        jnp.concatenate([conditions, null], axis=0),
    )
    x_cond, x_uncond = xhat[:batch], xhat[batch:]
    w = expand_to(w, x_cond).astype(x_cond.dtype)
    return (1.0 + w) * x_cond - w * x_uncond


def _guided_denoise(
    cond_fn: CondFn,
    null_condition: int | jax.Array,
    z: jax.Array,
    t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
) -> jax.Array:
    return guided_xhat(cond_fn, z, t, conditions, w, null_condition=null_condition)


def _conditional(
    cond_fn: CondFn,
    null_condition: int | jax.Array,
    z: jax.Array,
    t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
) -> jax.Array:
    """The conditional half alone, one evaluation: the guided x-hat where w is 0."""
    del null_condition, w  # the guided formula at w = 0 is (1 + 0) xhat(z, c)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    return cond_fn(z, t, as_condition(conditions)).astype(z.dtype)


def _guided_or_conditional(
    cond_fn: CondFn,
    null_condition: int | jax.Array,
    z: jax.Array,
    t: jax.Array,
    conditions: jax.Array,
    w: jax.Array,
) -> jax.Array:
    """Guided x-hat, or `_conditional` where every example's w is 0 (a `lax.cond`)."""
    w = jnp.broadcast_to(jnp.asarray(w, jnp.float32), z.shape[:1])

    def guided(*args):
        return _guided_denoise(*args).astype(z.dtype)

    branches = (
        Partial(_conditional, cond_fn, null_condition),
        Partial(guided, cond_fn, null_condition),
    )
    return jax.lax.cond(jnp.all(w == 0), *branches, z, t, conditions, w)


UNGUIDED_STEPS = ("none", "some", "all")


def make_guided_denoise_fn(
    cond_fn: CondFn, *, null_condition: int, unguided_steps: str = "none"
) -> Partial:
    """A denoise_fn(z, t, conditions, w) -> guided xhat built from a conditional `cond_fn`.

    The result is a `jax.tree_util.Partial`, so passing it to a jitted sampler with new
    parameters bound in `cond_fn` (itself a Partial, e.g. Partial(apply_fn, params)) reuses
    the compiled sampler. `unguided_steps` says how many sampler steps have w = 0 for every
    example (a guidance schedule's, or a constant w = 0): 'none' evaluates both halves at every
    call; 'some' only the conditional half at calls whose w is all 0 (a `lax.cond`, which
    compiles the network twice, so meant for samplers, not train steps); 'all' only the
    conditional half, ignoring w (the caller guarantees w = 0).
    """
    if unguided_steps not in UNGUIDED_STEPS:
        raise ValueError(
            f"unguided_steps={unguided_steps!r} is invalid: accepted {UNGUIDED_STEPS}."
        )
    fn = {"none": _guided_denoise, "some": _guided_or_conditional, "all": _conditional}
    return Partial(fn[unguided_steps], as_partial(cond_fn), null_condition)
