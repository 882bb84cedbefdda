"""The generic training loop shared by the teacher, stage one and every stage-two round.

A stage is described by a `Stage`: its directory, step count, batch size, optimiser config, loss
function, how to make its initial parameters, and an optional frozen teacher. `run_stage`
resumes from the stage's latest checkpoint (state and data position), runs the jitted, sharded
step with the state donated, writes metrics, saves periodically and at the end, and marks the
stage finished. A finished stage is skipped. A non-finite metric stops the run with an error
naming the step; since every save is preceded by that check, the last checkpoint stays good.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from distill_jax import checkpoints, parallel
from distill_jax.data import loader as data_loader
from distill_jax.training import metrics as metrics_lib
from distill_jax.training import state as state_lib

PyTree = Any


@dataclasses.dataclass
class Stage:
    """What differs between stages; everything else is the shared loop.

    Attributes:
      name: label for logs and metrics, e.g. 'teacher', 'stage1', 'stage2/steps_0064'.
      directory: the stage's Orbax directory.
      num_steps: optimisation steps of the stage.
      batch_size: global batch size.
      optimizer: an optimizer config (see distill_jax.config.optimizer_config).
      loss_fn: (params, batch, rng, frozen) -> (loss, metrics).
      init_params: () -> params, called only when the stage starts fresh.
      abstract_params: the shapes/dtypes of the params (jax.ShapeDtypeStruct pytree).
      frozen: a frozen teacher's params passed to every step, or None.
      seed: seeds the state's rng and the data order of this stage.
    """

    name: str
    directory: pathlib.Path
    num_steps: int
    batch_size: int
    optimizer: ml_collections.ConfigDict
    loss_fn: state_lib.LossFn
    init_params: Callable[[], PyTree]
    abstract_params: PyTree
    frozen: PyTree = None
    seed: int = 0


class NonFiniteError(FloatingPointError):
    """Raised when a training metric becomes NaN or infinite."""


def _check_finite(stage: Stage, records: list[tuple[int, dict]], last_saved: int | None) -> None:
    for step, values in records:
        bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        if bad:
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {stage.directory}"
                if last_saved is not None
                else "no checkpoint of this stage had been saved yet"
            )
            shown = {k: float(v) for k, v in values.items()}
            raise NonFiniteError(
                f"[{stage.name}] non-finite metrics at step {step}: {shown}; {kept}. "
                "Lower the learning rate or check the data."
            )


def run_stage(
    stage: Stage,
    *,
    config: ml_collections.ConfigDict,
    workdir: pathlib.Path,
    mesh: jax.sharding.Mesh,
    stop_after: int | None = None,
) -> state_lib.TrainState | None:
    """Train one stage to its last step, resuming where it stopped; None if already finished.

    Args:
      stage: the stage description.
      config: the run config (data, train logging/checkpoint settings).
      workdir: the run's workdir (metrics go to workdir/metrics.jsonl and workdir/logs/).
      mesh: the device mesh with a 'data' axis.
      stop_after: stop (after saving) once this global step is reached, without marking the
        stage finished; used to simulate an interrupted run.

    Returns:
      The final TrainState, or None when the stage had already finished.
    """
    if checkpoints.stage_finished(stage.directory) is not None:
        if jax.process_index() == 0:
            print(f"[{stage.name}] finished earlier; skipped.", flush=True)
        return None
    parallel.check_batch_size(stage.batch_size, mesh, key=f"{stage.name} batch_size")
    optimizer = state_lib.make_optimizer(stage.optimizer, stage.num_steps)
    schedule = state_lib.learning_rate_schedule(stage.optimizer, stage.num_steps)
    repl = parallel.replicated(mesh)
    batch_sharding = parallel.batch_sharded(mesh)

    def fresh_state(params):
        return state_lib.create_state(params, optimizer, seed=stage.seed)

    abstract_state = jax.eval_shape(fresh_state, stage.abstract_params)
    params_sharding = parallel.param_shardings(stage.abstract_params, mesh)
    state_sharding = abstract_state.replace(
        step=repl,
        params=params_sharding,
        ema_params=params_sharding,
        opt_state=parallel.param_shardings(abstract_state.opt_state, mesh),
        rng=repl,
    )
    abstract_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        abstract_state,
        state_sharding,
    )

    data_iter = data_loader.make_train_loader(
        config.data, batch_size=stage.batch_size, seed=stage.seed
    )
    ckpt = checkpoints.StageCheckpointer(
        stage.directory,
        keep=config.train.keep_checkpoints,
        save_every=config.train.checkpoint_every,
    )
    last_saved = ckpt.latest_step()
    if last_saved is not None:
        state = ckpt.restore(abstract_state, data_iter)
        if jax.process_index() == 0:
            print(f"[{stage.name}] resumed from step {last_saved}.", flush=True)
    else:
        # Every process computes the same initial params; host_to_global makes them one
        # global array (a process-local array cannot enter a jit spanning other processes).
        params = parallel.host_to_global(stage.init_params(), params_sharding)
        state = jax.jit(fresh_state, out_shardings=state_sharding)(params)

    frozen_sharding = parallel.param_shardings(stage.frozen, mesh)
    frozen = parallel.host_to_global(stage.frozen, frozen_sharding)
    step_fn = jax.jit(
        state_lib.make_train_step(
            stage.loss_fn,
            optimizer,
            ema_decay=float(stage.optimizer.ema_decay),
            schedule=schedule,
        ),
        in_shardings=(state_sharding, batch_sharding, frozen_sharding),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )

    start = int(jax.device_get(state.step))
    end = stage.num_steps if stop_after is None else min(stage.num_steps, stop_after)
    writer = metrics_lib.MetricsWriter(
        workdir, stage.name, total_steps=stage.num_steps, start_step=start
    )
    pending: list[tuple[int, dict]] = []
    try:
        for step in range(start, end):
            batch = data_loader.to_global_batch(next(data_iter), batch_sharding)
            state, step_metrics = step_fn(state, batch, frozen)
            done = step + 1
            pending.append((done, step_metrics))
            is_log = done % config.train.log_every == 0 or done == end
            is_save = ckpt.should_save(done) or done == end
            if not (is_log or is_save):
                continue
            records = [(s, jax.device_get(m)) for s, m in pending]
            pending = []
            _check_finite(stage, records, last_saved)
            if is_log:
                values = dict(records[-1][1])
                values.update(writer.rates(done, stage.batch_size))
                writer.write(done, values)
            if is_save:
                ckpt.save(done, state, data_iter)
                last_saved = done
        if end == stage.num_steps:
            ckpt.mark_finished(end, {"stage": stage.name})
    finally:
        writer.close()
        ckpt.close()
    return state
