"""The train steps the benchmarks time, built and timed one way for all of them.

`TimedStep` jits a stage's real step (`state.make_train_step` over the stage's loss from
`drivers.BUILDERS`) with the state donated, compiles it for one batch, and times `run(n)`:
n steps back to back, then `block_until_ready`. bench_teacher.py, bench_distill.py and
torch_side_by_side.py all time their steps with it, so a teacher step means the same thing in
each of them (bench_distill.py interleaves it with the stage-one and stage-two steps).
"""

import time

import jax
import jax.numpy as jnp
from etils import epath

from distill_jax import parallel, text_encoder
from distill_jax.data import loader
from distill_jax.data.sources import DatasetInfo
from distill_jax.run import Run, plan_stages
from distill_jax.training import drivers
from distill_jax.training import state as state_lib

NOWHERE = epath.Path("/nonexistent")  # the stages are only built: no workdir is touched


def matmul_flops_per_s(
    n: int = 2048, repeats: int = 5, dtype=jnp.float32, device: jax.Device | None = None
) -> float:
    """FLOP/s of an n^3 matmul in `dtype` (on `device`): what it does on dense work."""
    a = jax.device_put(jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype), device)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def random_batch(config, info: DatasetInfo, batch_size: int) -> dict[str, jax.Array]:
    """Random images and conditions, placed on the devices as the training loop places a batch.

    The conditions are class labels, or on a text config 16-token text conditions whose last 6
    positions are padding.
    """
    key = jax.random.PRNGKey(1)
    labels = jax.random.randint(key, (batch_size,), 0, info.num_classes)
    if config.text.enabled:
        tokens = int(config.text.max_tokens)
        labels = jax.random.normal(key, (batch_size, tokens, text_encoder.WIDTH))
        labels = labels * (jnp.arange(tokens) < tokens - 6)[None, :, None]
    batch = {
        "x": jax.random.uniform(key, (batch_size, *info.shape), minval=-1, maxval=1),
        "condition": labels,
    }
    mesh = parallel.make_mesh(-1)
    return loader.to_global_batch(jax.device_get(batch), parallel.batch_sharded(mesh))


def bench_run(config, info: DatasetInfo, batch_size: int) -> Run:
    """A Run of `config` on data shaped as `info`, every stage at `batch_size`; never written."""
    for stage_config in (config.teacher, config.stage1, config.stage2):
        stage_config.batch_size = batch_size
    return Run(NOWHERE, config, info, plan_stages(config))


class TimedStep:
    """One stage's jitted step with its state, batch and frozen teacher, ready to time."""

    def __init__(self, stage, batch):
        optimizer = state_lib.make_optimizer(stage.optimizer, 1000)
        # A copy: a student's initial weights may be the frozen teacher's own buffers, and the
        # donated state must not alias the frozen argument (run_stage copies via its jit).
        params = jax.tree.map(jnp.copy, stage.init_params(stage.teacher))
        self.state = state_lib.create_state(params, optimizer, seed=0)
        self.batch, self.frozen = batch, stage.teacher
        step = jax.jit(
            state_lib.make_train_step(
                stage.loss_fn, optimizer, ema_decay=float(stage.optimizer.ema_decay)
            ),
            donate_argnums=(0,),
        )
        self.compiled = step.lower(self.state, batch, self.frozen).compile()
        cost = self.compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        self.flops = float(cost.get("flops", float("nan")))
        memory = self.compiled.memory_analysis()
        self.memory_bytes = memory.argument_size_in_bytes + memory.temp_size_in_bytes
        self.run(2)  # warm-up

    def run(self, steps: int) -> float:
        """Run `steps` steps; seconds per step."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.compiled(self.state, self.batch, self.frozen)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps


def teacher_step(config, info: DatasetInfo, batch_size: int) -> TimedStep:
    """The project's teacher train step on a random batch, ready to time."""
    run = bench_run(config, info, batch_size)
    stage = drivers.BUILDERS["teacher"](run, run.stage("teacher"), None)
    return TimedStep(stage, random_batch(config, info, batch_size))
