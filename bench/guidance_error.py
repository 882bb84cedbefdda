"""How far a distilled student is from the guided teacher, per noise level t and guidance w.

Prints the x-MSE between the `steps`-step student's x-hat and the guided teacher's,
(1 + w) xhat(z, c) - w xhat(z, null), at each sampling time t = i / steps, on two kinds of z_t
(256 examples x 2 noise draws per cell):

- data: z_t made from the first eval-split images of the run's dataset, with their labels.
  For stage one's student (steps = 32 on digits) this is exactly what stage one regresses,
  without its loss weight; for a round's student it shows how far the halving moved it.
- trajectory: the states the guided teacher's own `steps`-step DDIM sampler visits from noise
  (same labels), i.e. the z_t that sampling at this w actually meets.

Usage:

    python bench/guidance_error.py --workdir runs/digits [--steps 32] [--w 0,1,2,4]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import sampling
from distill_jax.data import sources
from distill_jax.diffusion import samplers, schedule
from distill_jax.run import Run

TIMES = (0.95, 0.8, 0.65, 0.5, 0.35, 0.2, 0.05)  # the nearest grid times are shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, default=32, help="the student's step count")
    parser.add_argument("--w", default="0,1,2,4", help="comma-separated guidance weights")
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    run = Run.open(args.workdir)
    if run.latent:
        raise SystemExit(
            "guidance_error.py compares x-hat on images: a latent run is not supported."
        )
    source, _ = sources.load_source(run.config.data, split=run.config.data.eval_split)
    data = sources.read_examples(source, np.arange(args.images))
    x, labels = jnp.asarray(data["x"]), jnp.asarray(data["condition"])
    teacher = sampling.denoise_fn(run, "teacher", args.steps)
    student = sampling.denoise_fn(run, "student", args.steps)
    n, batch = args.steps, x.shape[0]

    def error(z, t, w):
        return jnp.mean((student(z, t, labels, w) - teacher(z, t, labels, w)) ** 2)

    @jax.jit
    def on_data(w, key):
        """[n] errors at t = n/n ... 1/n on noised eval images."""
        keys = jax.random.split(key, n)
        times = jnp.arange(n, 0, -1) / n

        def at(t, k):
            t = jnp.full((batch,), t)
            return error(schedule.q_sample(x, t, jax.random.normal(k, x.shape), **run.bounds), t, w)

        return jax.lax.map(lambda a: at(*a), (times, keys))

    @jax.jit
    def on_trajectory(w, key):
        """[n] errors at t = n/n ... 1/n along the guided teacher's DDIM path from noise."""

        def body(z, i):
            t, t_next = jnp.full((batch,), i / n), jnp.full((batch,), (i - 1) / n)
            x_teacher = teacher(z, t, labels, w)
            err = jnp.mean((student(z, t, labels, w) - x_teacher) ** 2)
            return samplers.ddim_step(x_teacher, z, t, t_next, **run.bounds), err

        return jax.lax.scan(body, jax.random.normal(key, x.shape), jnp.arange(n, 0, -1))[1]

    grid = np.arange(n, 0, -1) / n
    shown = [int(np.argmin(np.abs(grid - t))) for t in TIMES]
    print(f"x-MSE, {n}-step student vs guided teacher, {batch} examples x 2 noise draws")
    print("t                " + " ".join(f"{grid[k]:9.3f}" for k in shown))
    for w in (float(v) for v in args.w.split(",")):
        wv = jnp.full((batch,), w)
        for name, fn in (("data", on_data), ("trajectory", on_trajectory)):
            row = np.mean([np.asarray(fn(wv, jax.random.key(s))) for s in range(2)], axis=0)
            print(f"w={w:<4g} {name:<10} " + " ".join(f"{row[k]:9.5f}" for k in shown))


if __name__ == "__main__":
    main()
