"""How far a distilled student is from the guided teacher, per noise level t and guidance w.

Prints the x-MSE between the `steps`-step student's x-hat and the guided teacher's,
(1 + w) xhat(z, c) - w xhat(z, null), on z_t made from the first 256 eval-split images of the
run's dataset (4 noise draws per cell). For stage one's student (steps = 32 on digits) this is
exactly what stage one regresses, without its loss weight; for a round's student it shows how
far the halving moved it. Usage:

    python bench/guidance_error.py --workdir runs/digits [--steps 32] [--w 0,1,2,4]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import sampling
from distill_jax.data import sources
from distill_jax.diffusion import schedule
from distill_jax.run import Run

TIMES = (0.05, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95)


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
    x, labels = jnp.asarray(data["x"]), jnp.asarray(data["label"])
    teacher = sampling.denoise_fn(run, "teacher", args.steps)
    student = sampling.denoise_fn(run, "student", args.steps)

    @jax.jit
    def mse(t, w, key):
        t, w = jnp.full((x.shape[0],), t), jnp.full((x.shape[0],), w)
        z = schedule.q_sample(x, t, jax.random.normal(key, x.shape), **run.bounds)
        return jnp.mean((student(z, t, labels, w) - teacher(z, t, labels, w)) ** 2)

    print(f"x-MSE, {args.steps}-step student vs guided teacher, {args.images} eval images x 4")
    print("t      " + " ".join(f"{t:9.2f}" for t in TIMES))
    for w in (float(v) for v in args.w.split(",")):
        row = [np.mean([float(mse(t, w, jax.random.key(k))) for k in range(4)]) for t in TIMES]
        print(f"w={w:<4g} " + " ".join(f"{r:9.5f}" for r in row))


if __name__ == "__main__":
    main()
