"""Guidance schedules: per-step weights in the samplers, the teacher's evaluation count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from distill_jax import sampling
from distill_jax.diffusion import guidance, samplers
from distill_jax.diffusion.guidance_schedule import (
    CONSTANT,
    GuidanceSchedule,
    guided_evaluations,
    parse_schedule,
)
from distill_jax.run import Run


def _toy_denoise(z, t, labels, w):
    # Depends on every argument, so a changed weight at any step changes the samples.
    shift = (labels.astype(jnp.float32) - 4.5) / 10
    scale = 1 / (1 + samplers.expand_to(t, z) + samplers.expand_to(w, z) ** 2)
    return jnp.tanh(z * scale + samplers.expand_to(shift * (1 + w), z))


def _draw(sampler, w, steps=4):
    z = jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 1))
    labels = jnp.arange(6) % 3
    key = jax.random.PRNGKey(1)
    return np.asarray(samplers.run_sampler(sampler, _toy_denoise, z, labels, w, key, steps=steps))


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_constant_and_full_interval_schedules_equal_the_scalar_sampler(sampler):
    scalar = _draw(sampler, 1.5)
    for schedule in (CONSTANT, parse_schedule("interval:0,1"), parse_schedule("ramp:1,1")):
        weights = schedule.weights(1.5, steps=4)
        np.testing.assert_array_equal(weights, np.full(4, 1.5, np.float32))
        np.testing.assert_array_equal(_draw(sampler, weights[:, None]), scalar)


def test_interval_excluding_every_step_equals_w_zero_and_a_partial_one_differs():
    # 4 steps call the network at t = 1, 0.75, 0.5, 0.25.
    outside = parse_schedule("interval:0.05,0.2").weights(3.0, steps=4)
    np.testing.assert_array_equal(outside, np.zeros(4, np.float32))
    np.testing.assert_array_equal(_draw("ddim", outside[:, None]), _draw("ddim", 0.0))
    middle = parse_schedule("interval:0.4,0.8").weights(3.0, steps=4)
    np.testing.assert_array_equal(middle, [0.0, 3.0, 3.0, 0.0])
    partial = _draw("ddim", middle[:, None])
    assert not np.allclose(partial, _draw("ddim", 3.0))
    assert not np.allclose(partial, _draw("ddim", 0.0))


def test_ramp_is_linear_in_t_and_per_example_weights_broadcast():
    np.testing.assert_allclose(
        parse_schedule("ramp:0,2").weights(2.0, steps=4), [0.0, 1.0, 2.0, 3.0], atol=1e-6
    )
    per_example = jnp.linspace(0, 2, 6)
    steps = jnp.broadcast_to(per_example, (4, 6))
    np.testing.assert_array_equal(_draw("ddim", steps), _draw("ddim", per_example))


def test_teacher_skips_the_unconditional_half_exactly_at_unguided_steps():
    """Counts the conditional network's evaluations as they run, per sample."""
    calls = []

    def cond_fn(z, t, labels):
        jax.debug.callback(lambda n: calls.append(int(n)), z.shape[0])
        return _toy_denoise(z, t, labels, jnp.zeros_like(t))

    batch = 5
    skipping = guidance.make_guided_denoise_fn(cond_fn, null_condition=9, unguided_steps="some")
    plain = guidance.make_guided_denoise_fn(cond_fn, null_condition=9)
    z = jax.random.normal(jax.random.PRNGKey(2), (batch, 4, 4, 1))
    labels = jnp.arange(batch)
    for name, outside in (
        ("interval:0.3,0.8", 2),
        ("interval:0,1", 0),
        ("ramp:0,1", 1),
        ("interval:0.05,0.2", 4),
    ):
        weights = parse_schedule(name).weights(2.0, steps=4)[:, None]
        calls.clear()
        x = samplers.ddim_sample(Partial(skipping), z, labels, weights, steps=4)
        jax.effects_barrier()
        assert sum(calls) // batch == guided_evaluations(weights) == 2 * 4 - outside, name
        np.testing.assert_allclose(
            x, samplers.ddim_sample(plain, z, labels, weights, steps=4), rtol=1e-6, atol=1e-6
        )


def test_a_teacher_at_w_zero_everywhere_is_its_conditional_half_alone():
    calls = []

    def cond_fn(z, t, labels):
        jax.debug.callback(lambda n: calls.append(int(n)), z.shape[0])
        return _toy_denoise(z, t, labels, jnp.zeros_like(t))

    z = jax.random.normal(jax.random.PRNGKey(3), (5, 4, 4, 1))
    labels = jnp.arange(5)
    plain = guidance.make_guided_denoise_fn(cond_fn, null_condition=9)
    conditional = guidance.make_guided_denoise_fn(cond_fn, null_condition=9, unguided_steps="all")
    x = samplers.ddim_sample(conditional, z, labels, 0.0, steps=4)
    jax.effects_barrier()
    assert calls == [5] * 4  # one call on the batch per step, no unconditional half
    np.testing.assert_allclose(x, samplers.ddim_sample(plain, z, labels, 0.0, steps=4), atol=1e-6)
    assert [sampling.unguided_steps(np.array(w)) for w in ([0, 0], [0, 1], [1, 2])] == [
        "all",
        "some",
        "none",
    ]


def test_schedule_names_round_trip_and_bad_ones_are_refused():
    for name in ("constant", "interval:0.2,0.8", "ramp:0,2"):
        assert parse_schedule(name).name == name
    for bad, words in (
        ("interval:0.5,1.5", "0 <= LO <= HI <= 1"),
        ("interval:0.8,0.2", "invalid"),
        ("interval:0.3", "invalid"),
        ("ramp:a,b", "invalid"),
        ("ramp:0,inf", "non-finite"),
        ("cosine", "accepted 'constant'"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_schedule(bad)
    with pytest.raises(ValueError, match="kind"):
        GuidanceSchedule("linear")


def test_sample_with_a_schedule_on_the_smoke_run(smoke_workdir):
    run = Run.open(smoke_workdir)
    labels = np.arange(8, dtype=np.int32) % 10
    interval = parse_schedule("interval:0.3,0.8")
    common = dict(steps=4, conditions=labels, seed=3, batch_size=8)
    x = sampling.sample(run, model="student", w=2.0, schedule=interval, **common)
    constant = sampling.sample(run, model="student", w=2.0, **common)
    unguided = sampling.sample(run, model="student", w=0.0, **common)
    # (The smoke student has barely learnt w: its samples differ, but not by much.)
    assert x.shape == constant.shape and not np.array_equal(x, constant)
    assert not np.array_equal(x, unguided)
    # A teacher step outside the interval is one evaluation instead of two.
    weights = interval.weights(2.0, steps=4)
    assert sampling.evaluations_per_sample("teacher", 4, weights) == 8 - 2
    teacher = sampling.sample(run, model="teacher", w=2.0, schedule=interval, **common)
    assert np.all(np.isfinite(teacher))
    with pytest.raises(ValueError, match=r"ramp:0,2 gives per-step weights 0..4.5"):
        sampling.sample(run, model="student", w=3.0, schedule=parse_schedule("ramp:0,2"), **common)


def test_evaluation_plans_schedule_rows_with_honest_evaluation_counts(smoke_workdir):
    from distill_jax.evaluation import evaluate

    run = Run.open(smoke_workdir)
    eval_config = run.config.eval.copy_and_resolve_references()
    eval_config.guidance_schedules = ("interval:0.3,0.8", "ramp:0,2")
    eval_config.guidance_weights = (0.0, 2.0, 3.0)
    entries = evaluate.plan(Run.open(smoke_workdir, eval_config=eval_config))
    rows = {(e.sampler, e.steps, e.w): e for e in entries}
    full = max(evaluate.teacher_step_counts(run.config))
    # The teacher's schedule rows only at its full step count, every w.
    teacher = {k for k in rows if k[0].startswith("teacher_ddim+")}
    assert teacher == {
        (f"teacher_ddim+{s}", full, w) for s in eval_config.guidance_schedules for w in (0, 2, 3)
    }
    # Students: ramp:0,2 at w = 3 reaches 6 > w_max = 4, so those rows are left out.
    assert ("student_ddim+ramp:0,2", 4, 2.0) in rows
    assert ("student_ddim+ramp:0,2", 4, 3.0) not in rows
    assert ("student_ddim+interval:0.3,0.8", 4, 3.0) in rows
    entry = rows[("teacher_ddim+interval:0.3,0.8", full, 2.0)]
    outside = int(np.sum(entry.weights == 0))
    assert 0 < outside < full
    assert sampling.evaluations_per_sample("teacher", full, entry.weights) == 2 * full - outside
    assert entry.grid_name == f"teacher_ddim+interval_0.3-0.8_N{full:04d}_w2.png"
    # The FD-to-teacher reference is the constant-w full-step teacher, not a schedule's row.
    ctx = evaluate._Context(Run.open(smoke_workdir), None, None, None, 1, None)
    references = [e for e in entries if ctx.is_reference(e)]
    assert {(e.sampler, e.steps) for e in references} == {("teacher_ddim", full)}
