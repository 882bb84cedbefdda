"""What encoding inside the train step would cost a latent run, in XLA's own FLOP counts.

Compiles (does not run) the autoencoder's encoder forward and the teacher's loss-and-gradient on
one batch of the config's teacher batch size, with randomly initialised weights of the config's
architecture, and prints both FLOP counts and their ratio: the share a train step would grow by
if every step encoded its batch instead of reading the cached latents.
Usage: python bench/latent_cost.py configs/digits_latent.py[:variant]
"""

import sys
import tempfile

import jax
import jax.numpy as jnp

from distill_jax.config import load_config
from distill_jax.run import Run
from distill_jax.training import teacher


def _flops(function, *args) -> float:
    return float(jax.jit(function).lower(*args).compile().cost_analysis()["flops"])


def main(spec: str) -> None:
    config = load_config(spec)
    if not config.autoencoder.enabled:
        raise SystemExit(f"{spec} is not a latent config (autoencoder.enabled is False).")
    run = Run.create(config, tempfile.mkdtemp())
    batch = int(config.teacher.batch_size)
    ae_spec, teacher_spec = run.stage("autoencoder"), run.stage("teacher")
    ae_model = run.model(ae_spec)
    ae_params = run.init_params(ae_spec, jax.random.PRNGKey(0))
    images = jnp.zeros((batch, *run.image_info.shape))
    encode = _flops(
        lambda p, x: ae_model.apply({"params": p}, x, method=ae_model.encode)[0], ae_params, images
    )
    loss = teacher.make_teacher_loss(
        run.model(teacher_spec), null_condition=run.null_condition, diffusion=config.diffusion
    )
    data = {"x": jnp.zeros((batch, *run.info.shape)), "condition": jnp.zeros((batch,), jnp.int32)}
    params = run.init_params(teacher_spec, jax.random.PRNGKey(0))
    step = _flops(jax.grad(lambda p: loss(p, data, jax.random.PRNGKey(0), None)[0]), params)
    print(f"{spec}: batch {batch}, images {run.image_info.shape} -> latents {run.info.shape}")
    print(f"encoder forward:            {encode / 1e9:8.3f} GFLOP")
    print(f"teacher loss and gradient:  {step / 1e9:8.3f} GFLOP")
    print(f"encoding in the step adds:  {100 * encode / step:8.1f}% to a teacher step")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "configs/digits_latent.py")
