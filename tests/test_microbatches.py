"""Gradient accumulation (config.train.microbatches): the same gradients from a fraction of the
activations.

The accumulation is checked exactly on a loss without noise; the real teacher step of the
digits smoke config, at a batch larger than this machine's memory, is planned for this CPU
(`plan --topology=cpu`) and the plan must advise the microbatches it compiled and found fitting.
"""

from __future__ import annotations

import math
import os
import re

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


def test_a_step_larger_than_memory_is_planned_with_the_fewest_microbatches_that_fit():
    """The digits teacher step on this CPU (`plan --topology=cpu`, its RAM as the chip's
    memory) at a batch whose activations need about twice the RAM: it does not fit, and the
    plan's advice is the microbatches it compiled and found fitting, with their temporaries
    shrunk in proportion."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = 2 ** math.ceil(math.log2(2 * ram / (0.45 * 2**20)))  # ~0.45 MiB per example
    config = load_config("configs/digits.py:smoke")
    config.teacher.batch_size = batch
    logged = []
    plan = planning.plan_run(config, "cpu", stages=("teacher",), log=logged.append)
    (teacher,) = plan["programs"]
    assert not teacher["fits"] and teacher["temp_bytes"] > ram
    found = re.fullmatch(
        r"fits with --config\.train\.microbatches=(\d+): (.*) per chip", teacher["advice"]
    )
    assert found and int(found.group(1)) >= 2, teacher["advice"]
    assert any("compiled" in line for line in logged[1:])  # the advice was compiled, not guessed


def test_plans_try_the_fewest_microbatches_then_recomputation():
    from distill_jax.planning import estimate

    gib = 1024**3
    result = estimate.Estimate(
        "teacher", "train", 2**20, 1, total_bytes=69 * gib, temp_bytes=68 * gib, hbm_bytes=16 * gib
    )
    # 15 GiB free for 68 GiB of temporaries: 5 slices at least, so 8, then 16; then remat.
    assert estimate.saver_candidates(
        result, batch=2**20, chips=4, microbatches=1, remat="none"
    ) == [(8, "none"), (16, "none"), (16, "dots_saveable"), (16, "full")]
    # A batch of 64 on 4 chips allows at most 16 slices of 4.
    assert estimate.saver_candidates(result, batch=64, chips=4, microbatches=1, remat="full") == [
        (8, "full"),
        (16, "full"),
    ]


def test_plans_on_a_tpu_try_the_splash_kernel_first():
    from distill_jax import topologies
    from distill_jax.planning import estimate, plan

    gib = 1024**3
    result = estimate.Estimate(
        "teacher", "train", 2**20, 1, total_bytes=69 * gib, temp_bytes=68 * gib, hbm_bytes=16 * gib
    )
    config = load_config("configs/digits.py")
    tpu = topologies.abstract_devices(topologies.topology("v5e-4"))
    # The kernel alone first, then with the microbatches; three compiles at most.
    assert plan._saver_settings(result, tpu, config) == [
        (1, "none", "splash"),
        (8, "none", "splash"),
        (16, "none", "splash"),
    ]
    # Elsewhere the config's own attention throughout.
    assert plan._saver_settings(result, jax.devices("cpu") * 4, config)[0] == (8, "none", "xla")
