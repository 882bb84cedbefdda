"""How wrong a teacher's x-hat is at each noise level: the cause of noisy epsilon students.

For each workdir and each t of a grid, noises the evaluation split's images to z_t and prints
the root-mean-square error of x-hat against the clean image, for the guided teacher at each w
and, where the run fine-tunes it (config.finetune), for the fine-tuned teacher. An epsilon
teacher's x-hat = (z - sigma eps-hat) / alpha multiplies its network's error by 1/alpha
(column '1/alpha'), so its error grows without bound as t -> 1 while a v or x teacher's stays
near the data's spread; stage one regresses that x-hat, so a student learns the amplified
error wherever it is weighted.

Usage (workdirs of `distill-jax run --teacher=diffusers:DIR`, docs/teachers.md):

    python bench/xhat_error.py runs/dit_eps_ft runs/dit
"""

import argparse

import jax
import jax.numpy as jnp

from distill_jax.data import loader
from distill_jax.diffusion import guidance, schedule
from distill_jax.run import Run

TIMES = (0.1, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


def xhat_rms(denoise_fn, x, labels, t: float, w: float, bounds: dict, seed: int) -> float:
    """RMS of x-hat(z_t) - x over the examples (one draw of noise, `seed`)."""
    eps = jax.random.normal(jax.random.PRNGKey(seed), x.shape)
    tt = jnp.full((x.shape[0],), t, jnp.float32)
    z = schedule.q_sample(x, tt, eps, **bounds)
    xhat = denoise_fn(z, tt, labels, jnp.full((x.shape[0],), w, jnp.float32))
    return float(jnp.sqrt(jnp.mean((xhat - x) ** 2)))


def main() -> None:
    """Print one table per workdir."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 4.0])
    parser.add_argument("--examples", type=int, default=256)
    args = parser.parse_args()
    for workdir in args.workdirs:
        run = Run.open(workdir)
        x, labels = loader.make_eval_arrays(
            run.config.data, split=run.config.data.eval_split, max_examples=args.examples
        )
        x, labels = jnp.asarray(x), jnp.asarray(labels)
        names = [spec.name for spec in run.stages if spec.kind in ("teacher", "finetune")]
        for name in names:
            print_table(run, name, x, labels, args.weights)


def print_table(run: Run, name: str, x, labels, weights) -> None:
    """The table of the guided stage `name` (the teacher or its fine-tune)."""
    spec = run.stage(name)
    teacher = guidance.make_guided_denoise_fn(
        run.denoise_fn(spec), null_condition=run.null_condition
    )
    prediction = run.model(spec).parameterisation
    print(f"\n{run.workdir}, {name}: predicts {prediction}")
    columns = " | ".join(f"RMS x-hat error, w = {w:g}" for w in weights)
    print(f"| t | 1/alpha | {columns} |")
    print("|---|---|" + "---|" * len(weights))
    for i, t in enumerate(TIMES):
        logsnr = schedule.logsnr_schedule_cosine(jnp.float32(t), **run.bounds)
        inv_alpha = float(1.0 / jnp.sqrt(jax.nn.sigmoid(logsnr)))
        cells = [xhat_rms(teacher, x, labels, t, w, run.bounds, i) for w in weights]
        print(f"| {t:g} | {inv_alpha:.1f} | {' | '.join(f'{c:.3f}' for c in cells)} |")


if __name__ == "__main__":
    main()
