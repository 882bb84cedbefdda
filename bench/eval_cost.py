"""Project the wall time of `distill-jax evaluate` for a config on this machine.

Measures guided-teacher and student DDIM steps (randomly initialised networks of the config's
architecture, batch config.eval.batch_size, after compilation) and multiplies by the steps the
config's evaluation samples. Usage: python bench/eval_cost.py configs/digits.py[:variant]
"""

import pathlib
import sys
import time

import jax
import jax.numpy as jnp

from distill_jax.config import load_config
from distill_jax.config_checks import round_schedule
from distill_jax.diffusion import guidance, samplers
from distill_jax.evaluation.evaluate import teacher_step_counts
from distill_jax.run import Run


def seconds_per_step(fn, shape, batch, w, steps=8):
    z = jax.random.normal(jax.random.PRNGKey(0), (batch, *shape))
    labels = jnp.arange(batch) % 10
    samplers.ddim_sample(fn, z, labels, w, steps=steps).block_until_ready()
    start = time.perf_counter()
    samplers.ddim_sample(fn, z, labels, w, steps=steps).block_until_ready()
    return (time.perf_counter() - start) / steps


def main(spec):
    config = load_config(spec)
    run = Run.create(config, "/nonexistent")  # only models are built: nothing is written
    batch = min(int(config.eval.batch_size), int(config.eval.num_samples))
    key = jax.random.PRNGKey(0)
    shape = tuple(run.info.shape)
    teacher, student = run.stage("teacher"), run.stage("stage1")
    teacher_fn = guidance.make_guided_denoise_fn(
        run.denoise_fn(teacher, run.init_params(teacher, key)), null_condition=run.info.num_classes
    )
    student_fn = run.denoise_fn(student, run.init_params(student, key))
    t_step = seconds_per_step(teacher_fn, shape, batch, 1.0) / batch
    s_step = seconds_per_step(student_fn, shape, batch, 1.0) / batch
    teacher_steps = sum(teacher_step_counts(config))
    student_steps = int(config.stage2.n_start) + sum(n for n, _, _ in round_schedule(config.stage2))
    runs = int(config.eval.num_samples) * int(config.eval.seeds) * len(config.eval.guidance_weights)
    print(
        f"guided teacher step: {1e3 * t_step:.3f} ms/sample; "
        f"student step: {1e3 * s_step:.3f} ms/sample"
    )
    print(
        f"projected sampling time of evaluate: teacher {runs * teacher_steps * t_step:.0f}s "
        f"({teacher_steps} steps per sample), students {runs * student_steps * s_step:.0f}s "
        f"({student_steps} steps per sample), for {runs} samples per row set"
    )


if __name__ == "__main__":
    spec = sys.argv[1] if len(sys.argv) > 1 else "configs/digits.py"
    if len(sys.argv) > 2 or not pathlib.Path(spec.partition(":")[0]).is_file():
        sys.exit(
            f"eval_cost: {' '.join(sys.argv[1:])!r} is not a config: accepted one argument, "
            "a config file with an optional variant, e.g. configs/digits.py:smoke."
        )
    main(spec)
