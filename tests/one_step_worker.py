"""Run one teacher train step of a config on all local devices and save loss and params.

Used by tests/test_training.py in a subprocess, so that XLA_FLAGS can fake N CPU devices
before JAX starts. Usage: python tests/one_step_worker.py CONFIG OUT.npz
"""

import sys

import jax
import numpy as np

from distill_jax import parallel
from distill_jax.config import load_config
from distill_jax.data import loader
from distill_jax.run import Run
from distill_jax.training import drivers
from distill_jax.training import state as state_lib


def main(config_path: str, out: str) -> None:
    config = load_config(config_path)
    run = Run.create(config, "/nonexistent")
    spec = run.stage("teacher")
    stage = drivers.BUILDERS["teacher"](run, spec, None)
    mesh = parallel.make_mesh(-1)
    loader.check_batch_size(stage.batch_size, devices=mesh.size)
    optimizer = state_lib.make_optimizer(stage.optimizer, spec.num_steps)
    state = state_lib.create_state(stage.init_params(None), optimizer, seed=spec.seed)
    repl = parallel.replicated(mesh)
    state = jax.device_put(state, repl)
    batch = loader.to_global_batch(
        next(loader.make_train_loader(config.data, batch_size=stage.batch_size, seed=0)),
        parallel.batch_sharded(mesh),
    )
    step = jax.jit(
        state_lib.make_train_step(stage.loss_fn, optimizer, ema_decay=0.99),
        out_shardings=(repl, repl),
    )
    new_state, metrics = step(state, batch, None)
    leaves = jax.tree.leaves(jax.device_get(new_state.params))
    np.savez(
        out,
        loss=np.asarray(metrics["loss"]),
        devices=len(jax.devices()),
        **{f"p{i}": leaf for i, leaf in enumerate(leaves)},
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
