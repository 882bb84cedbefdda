"""Distillation targets: stage one is the guided teacher; stage two's xtilde makes one student
DDIM step land on the teacher's two steps."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from distill_jax.data import sample_mixture
from distill_jax.diffusion import gmm as gmm_lib
from distill_jax.diffusion import guidance, samplers, targets
from distill_jax.diffusion.schedule import q_sample

K = 3


def cond_gmm(gmm, z, t, labels):
    return gmm_lib.gmm_xhat(gmm, z, t, labels)


@pytest.fixture
def teacher():
    gmm = gmm_lib.make_gmm(num_classes=K, dim=2, std=0.2)
    return gmm, guidance.make_guided_denoise_fn(Partial(cond_gmm, gmm), null_condition=K)


def noisy_batch(gmm, t, seed=0):
    _, ke, kw = jax.random.split(jax.random.PRNGKey(seed), 3)
    x, labels = sample_mixture(gmm, num=t.shape[0], seed=seed)
    z_t = q_sample(x, t, jax.random.normal(ke, x.shape))
    w = jax.random.uniform(kw, t.shape, minval=0.0, maxval=4.0)
    return z_t, labels, w


def test_round_times():
    i = jnp.array([1, 2, 4])
    t, t_mid, t_end = targets.round_times(i, steps=4)
    for value in (t, t_mid, t_end):
        chex.assert_shape(value, (3,))
        chex.assert_type(value, jnp.float32)
    np.testing.assert_allclose(t, [0.25, 0.5, 1.0])
    np.testing.assert_allclose(t_mid, [0.125, 0.375, 0.875])
    np.testing.assert_allclose(t_end, [0.0, 0.25, 0.75])
    assert float(t_end[0]) == 0.0  # exactly, so the last step returns x-hat
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="steps=.*integer >= 1"):
            targets.round_times(i, steps=bad)


@pytest.mark.parametrize("steps", [1, 4, 16])
def test_one_student_step_lands_on_two_teacher_steps(teacher, steps):
    gmm, teacher_fn = teacher
    batch = 64
    i = jax.random.randint(jax.random.PRNGKey(steps), (batch,), 1, steps + 1)
    i = i.at[0].set(1).at[1].set(steps)  # always cover the last and the first student step
    t, t_mid, t_end = targets.round_times(i, steps=steps)
    z_t, labels, w = noisy_batch(gmm, t)
    xtilde, z_end = jax.jit(targets.progressive_target)(
        teacher_fn, z_t, labels, w, t=t, t_mid=t_mid, t_end=t_end
    )
    chex.assert_shape((xtilde, z_end), (batch, 2))
    chex.assert_tree_all_finite((xtilde, z_end))
    # The teacher's two DDIM steps, written out.
    z_mid = samplers.ddim_step(teacher_fn(z_t, t, labels, w), z_t, t, t_mid)
    expect_end = samplers.ddim_step(teacher_fn(z_mid, t_mid, labels, w), z_mid, t_mid, t_end)
    np.testing.assert_allclose(z_end, expect_end, atol=1e-5)
    # One student step with xhat = xtilde reproduces them.
    student_end = samplers.ddim_step(xtilde, z_t, t, t_end)
    np.testing.assert_allclose(student_end, z_end, atol=2e-4, rtol=1e-4)
    last = np.asarray(i == 1)
    np.testing.assert_array_equal(np.asarray(xtilde)[last], np.asarray(z_end)[last])


def test_last_student_step_target_is_the_teachers_two_step_sample(teacher):
    gmm, teacher_fn = teacher
    steps, batch = 4, 16
    t, t_mid, t_end = targets.round_times(jnp.ones((batch,), jnp.int32), steps=steps)
    z_t, labels, w = noisy_batch(gmm, t, seed=1)
    xtilde, _ = targets.progressive_target(
        teacher_fn, z_t, labels, w, t=t, t_mid=t_mid, t_end=t_end
    )
    two_step = samplers.ddim_sample(teacher_fn, z_t, labels, w, steps=2, t_start=1 / steps)
    np.testing.assert_allclose(xtilde, two_step, atol=1e-5)


def test_stochastic_round_times_jump_two_grid_steps_except_the_last():
    i = jnp.array([1, 2, 3, 4])
    t, t_mid, t_end = targets.round_times(i, steps=4, stochastic=True)
    np.testing.assert_allclose(t, [0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(t_mid, [0.125, 0.25, 0.5, 0.75])
    np.testing.assert_allclose(t_end, [0.0, 0.0, 0.25, 0.5])
    # A traced N gives the same times as a Python int.
    traced = jax.jit(lambda n: targets.round_times(i, steps=n, stochastic=True))(jnp.int32(4))
    for a, b in zip(traced, (t, t_mid, t_end), strict=True):
        np.testing.assert_array_equal(a, b)
