"""The generic training loop shared by the teacher, stage one and every stage-two round.

A stage is described by a `Stage`: the run's `StageSpec`, its batch size, optimiser config, loss
function, how its initial parameters derive from its teacher, and the frozen teacher itself.
`run_stage` resumes from the stage's latest checkpoint (state and data position) or initialises
the state directly sharded on the mesh (`jit` with `out_shardings`, so no process materialises a
whole FSDP-sharded parameter), runs the jitted, sharded step with the state donated, writes
metrics, saves periodically and at the end, and marks the stage finished. A finished stage is
skipped. A non-finite metric stops the run with an error naming the step; since every save is
preceded by that check, the last checkpoint stays good.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
from absl import logging

from distill_jax import parallel, trees
from distill_jax.data import loader as data_loader
from distill_jax.run import Run, StageSpec
from distill_jax.run import workdir as workdir_lib
from distill_jax.training import state as state_lib
from distill_jax.training import writer as writer_lib

PyTree = Any


@dataclasses.dataclass
class Stage:
    """What differs between stages; everything else is the shared loop.

    Attributes:
      spec: the run's description of the stage (name, directory, steps, seed).
      batch_size: global batch size.
      optimizer: an optimizer config (see distill_jax.config.optimizer_config).
      loss_fn: (params, batch, rng, teacher) -> (loss, metrics).
      init_params: teacher -> initial params; pure, so it runs under jit straight into the
        parameters' shardings. Called only when the stage starts fresh.
      abstract_params: the shapes/dtypes of the params (jax.ShapeDtypeStruct pytree).
      teacher: the frozen teacher pytree passed to every step (None for the teacher stage):
        an argument of the step, never in the optimiser, never re-saved.
      frozen_dtype: the dtype of the teacher's floating leaves in the steps (config.train.
        frozen_dtype): 'bfloat16' halves its memory; the student starts from the float32 copy.
      microbatches: the batch's slices whose gradients each step sums (config.train.
        microbatches): the activations of batch_size / microbatches examples at a time.
      finish: final state -> more entries for FINISHED.json, run after the last save and
        before the stage is marked finished (so an interruption in it reruns it on resume).
    """

    spec: StageSpec
    batch_size: int
    optimizer: ml_collections.ConfigDict
    loss_fn: state_lib.LossFn
    init_params: Callable[[PyTree], PyTree]
    abstract_params: PyTree
    teacher: PyTree = None
    finish: Callable[[state_lib.TrainState], dict] | None = None
    frozen_dtype: str = "float32"
    microbatches: int = 1


def frozen(teacher: PyTree, dtype: str) -> PyTree:
    """`teacher` with its floating leaves in `dtype` (arrays, or ShapeDtypeStructs to plan)."""
    return trees.cast_floating(teacher, dtype)


class NonFiniteError(FloatingPointError):
    """Raised when a training metric becomes NaN or infinite."""


def _check_finite(stage: Stage, records: list[tuple[int, dict]], last_saved, directory) -> None:
    for step, values in records:
        bad = {k: float(v) for k, v in values.items() if not math.isfinite(float(v))}
        if bad:
            kept = (
                f"the last good checkpoint (step {last_saved}) is kept in {directory}"
                if last_saved is not None
                else "no checkpoint of this stage had been saved yet"
            )
            shown = {k: float(v) for k, v in values.items()}
            raise NonFiniteError(
                f"[{stage.spec.name}] non-finite metrics at step {step}: {shown}; {kept}. "
                "Lower the learning rate or check the data."
            )


@dataclasses.dataclass
class CompiledStage:
    """The stage's shardings, abstract state and jitted functions on one mesh.

    `step` is jitted, not yet compiled: training calls it, `distill_jax.planning` lowers it
    with abstract arguments and compiles it for a TPU slice.
    """

    abstract_state: PyTree
    state_sharding: PyTree
    teacher_sharding: PyTree
    batch_sharding: jax.sharding.NamedSharding
    init: Callable[[PyTree], state_lib.TrainState]
    step: Callable


def compile_stage(stage: Stage, mesh: jax.sharding.Mesh) -> CompiledStage:
    """Shardings (FSDP-style for params, EMA and moments), the sharded init and the step."""
    optimizer = state_lib.make_optimizer(stage.optimizer, stage.spec.num_steps)
    schedule = state_lib.learning_rate_schedule(stage.optimizer, stage.spec.num_steps)
    repl = parallel.replicated(mesh)

    def fresh_state(params):
        return state_lib.create_state(params, optimizer, seed=stage.spec.seed)

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
    teacher_sharding = parallel.param_shardings(stage.teacher, mesh)
    batch_sharding = parallel.batch_sharded(mesh)
    init = jax.jit(
        lambda teacher: fresh_state(stage.init_params(teacher)), out_shardings=state_sharding
    )
    train_step = state_lib.make_train_step(
        stage.loss_fn,
        optimizer,
        ema_decay=float(stage.optimizer.ema_decay),
        schedule=schedule,
        microbatches=stage.microbatches,
    )
    step = jax.jit(
        parallel.traced_in_mesh(train_step, mesh),
        in_shardings=(state_sharding, batch_sharding, teacher_sharding),
        out_shardings=(state_sharding, repl),
        donate_argnums=(0,),
    )
    return CompiledStage(
        abstract_state, state_sharding, teacher_sharding, batch_sharding, init, step
    )


def initial_state(
    stage: Stage, mesh: jax.sharding.Mesh, *, checkpointer=None, data_iter=None
) -> tuple[state_lib.TrainState, PyTree, CompiledStage]:
    """(state, global teacher, compiled): restored from the latest checkpoint, else fresh.

    A restore also moves `data_iter` to the saved position. The fresh state is created by one
    jitted call whose outputs are already in the parameters' shardings.
    """
    compiled = compile_stage(stage, mesh)
    teacher = parallel.host_to_global(stage.teacher, compiled.teacher_sharding)
    latest = checkpointer.latest_step() if checkpointer is not None else None
    if latest is not None:
        step, state = checkpointer.restore(compiled.abstract_state, data_iter)
        logging.info("[%s] resumed from step %d.", stage.spec.name, step)
    else:
        state = compiled.init(teacher)
    if stage.frozen_dtype != "float32":  # after the init: the student copies float32 weights
        to_frozen = functools.partial(frozen, dtype=stage.frozen_dtype)
        teacher = jax.jit(to_frozen, out_shardings=compiled.teacher_sharding)(teacher)
    return state, teacher, compiled


def run_stage(
    stage: Stage, run: Run, mesh: jax.sharding.Mesh, *, stop_after: int | None = None
) -> state_lib.TrainState | None:
    """Train one stage to its last step, resuming where it stopped; None if already finished.

    Args:
      stage: the stage description.
      run: the run (config, workdir layout, the stage's checkpoint manager).
      mesh: the device mesh ('data', 'fsdp').
      stop_after: stop (after saving) once this global step is reached, without marking the
        stage finished; used to simulate an interrupted run.
    """
    name = stage.spec.name
    if run.finished(stage.spec) is not None:
        logging.info("[%s] finished earlier; skipped.", name)
        return None
    data_loader.check_batch_size(
        stage.batch_size, devices=mesh.size, processes=jax.process_count(), key=f"{name} batch_size"
    )
    data_loader.check_batch_size(  # every microbatch is spread over every device
        stage.batch_size // stage.microbatches,
        devices=mesh.size,
        key=f"{name} batch_size / train.microbatches",
    )
    data_iter = data_loader.make_train_loader(
        run.config.data,
        batch_size=stage.batch_size,
        seed=stage.spec.seed,
        source=run.train_source(stage.spec),
    )
    ckpt = run.checkpointer(stage.spec)
    try:
        state, teacher, compiled = initial_state(
            stage, mesh, checkpointer=ckpt, data_iter=data_iter
        )
        # The config is recorded only once the resume it allows has worked.
        run.record_config()
        end = stage.spec.num_steps if stop_after is None else min(stage.spec.num_steps, stop_after)
        state = _train(stage, run, compiled, state, teacher, data_iter, ckpt, end)
        ckpt.wait(end)
        if end == stage.spec.num_steps:
            record = run.finish_record(stage.spec)
            if stage.finish is not None:
                record.update(stage.finish(state))
            ckpt.mark_finished(end, record)
    finally:
        ckpt.close()
    return state


class Preempted(Exception):  # noqa: N818 - a stop, not an error
    """The run stopped on SIGTERM after saving its current step; rerun to resume."""

    exit_code = 143  # 128 + SIGTERM, what schedulers read as "terminated, may be requeued"


@contextlib.contextmanager
def _sigterm_notice() -> Iterator[list[bool]]:
    """[flag] set by SIGTERM while the body runs (single process, main thread only).

    With several processes JAX's preemption service owns SIGTERM and agrees on one step for
    all of them (`StageCheckpointer.reached_preemption`); a Python handler here would replace
    it, so none is installed.
    """
    flag = [False]
    if jax.process_count() > 1 or threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        del signum, frame
        flag[0] = True

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGTERM, previous)


def _train(stage, run, compiled, state, teacher, data_iter, ckpt, end):
    """Steps from state.step to `end`: metrics every log interval, saves by the policy.

    On SIGTERM the current step is finished, saved and committed, then Preempted is raised.
    """
    start, log_every = int(jax.device_get(state.step)), int(run.config.train.log_every)
    last_saved = ckpt.latest_step()
    metrics_file = run.path(workdir_lib.METRICS_FILE)
    writer_lib.drop_rows_after(metrics_file, stage.spec.name, start)
    writer = writer_lib.MetricsWriter(
        metrics_file,
        run.path(workdir_lib.LOGS_DIR),
        stage.spec.name,
        total_steps=stage.spec.num_steps,
        start_step=start,
    )
    pending: list[tuple[int, dict]] = []
    with _sigterm_notice() as sigterm, contextlib.closing(writer):
        for step in range(start, end):
            batch = data_loader.to_global_batch(next(data_iter), compiled.batch_sharding)
            state, step_metrics = compiled.step(state, batch, teacher)
            done = step + 1
            pending.append((done, step_metrics))
            preempted = sigterm[0] or ckpt.reached_preemption(done)
            is_log = done % log_every == 0 or done == end
            is_save = ckpt.should_save(done) or done == end or preempted
            if not (is_log or is_save):
                continue
            records, pending = [(s, jax.device_get(m)) for s, m in pending], []
            _check_finite(stage, records, last_saved, ckpt.directory)
            ckpt.check_for_errors(done)  # a failed background save stops the run here
            if is_log:
                values = dict(records[-1][1])
                values.update(writer.rates(done, stage.batch_size))
                writer.write(done, values)
            if is_save:
                ckpt.save(done, state, data_iter, force=True)
                last_saved = done
            if preempted:
                ckpt.wait(done)
                raise Preempted(
                    f"[{stage.spec.name}] stopped by SIGTERM after step {done}, which is saved "
                    f"in {ckpt.directory}; rerun the same command to resume."
                )
    return state
