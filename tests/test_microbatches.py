"""Gradient accumulation (config.train.microbatches): the same gradients from a fraction of the
activations.

The accumulation is checked exactly on a loss without noise; the real teacher step of the
digits smoke config is compiled for this CPU (`plan --topology=cpu`) at 1 and 4 microbatches,
and its temporaries must shrink. (For the TPU v5e the compiler reports about the same
temporaries either way on a network this small: it already schedules the step within them.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import planning
from distill_jax.config import load_config
from distill_jax.config_checks import validate_config
from distill_jax.training import state as state_lib


def _loss(params, batch, rng, teacher):
    del rng, teacher  # no noise: slices and the whole batch must agree exactly
    error = batch["x"] @ params["w"] + params["b"] - batch["y"]
    return jnp.mean(error**2), {"error": jnp.mean(jnp.abs(error))}


@pytest.mark.parametrize("count", [2, 4, 8])
def test_microbatches_sum_to_the_whole_batchs_gradients(count):
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(5, 3))), "b": jnp.zeros(3)}
    batch = {"x": jnp.asarray(rng.normal(size=(16, 5))), "y": jnp.asarray(rng.normal(size=(16, 3)))}
    key = jax.random.key(0)
    whole = state_lib.microbatch_gradients(_loss, params, batch, key, None, 1)
    sliced = jax.jit(state_lib.microbatch_gradients, static_argnums=(0, 5))(
        _loss, params, batch, key, None, count
    )
    for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(sliced), strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_a_batch_that_microbatches_do_not_divide_is_refused():
    config = load_config("configs/digits.py:smoke")
    config.train.microbatches = 3
    with pytest.raises(ValueError, match="a multiple of train.microbatches=3"):
        validate_config(config)


def test_microbatches_shrink_the_compiled_steps_temporaries():
    temps = {}
    for count in (1, 4):
        config = load_config("configs/digits.py:smoke")
        config.teacher.batch_size, config.train.microbatches = 256, count
        plan = planning.plan_run(config, "cpu", stages=("teacher",), log=lambda line: None)
        (teacher,) = plan["programs"]
        temps[count] = teacher["temp_bytes"]
    assert temps[4] < 0.5 * temps[1], temps
