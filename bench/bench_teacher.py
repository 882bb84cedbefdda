"""Teacher train-step throughput, achieved FLOP/s and memory, beside a matmul's FLOP/s.

Prints, for the digits config (8x8x1), the text-conditioned digits (8x8x1, 16-token prompts)
and the same network on 32x32x3 images: images/s, the
step's FLOPs from XLA's cost analysis, the FLOP/s this achieves, the FLOP/s of a large float32
matmul measured in the same process (what this device can do on dense work), the compiled
step's memory (arguments + temporaries, from XLA's memory analysis) and the process's peak
resident memory.

Usage: python bench/bench_teacher.py [--steps 20] [--batch 128]
"""

import argparse
import resource
import time

import jax
import jax.numpy as jnp
from etils import epath

from distill_jax import parallel, text_encoder
from distill_jax.config import load_config
from distill_jax.data import loader
from distill_jax.data.sources import DatasetInfo
from distill_jax.run import Run, plan_stages
from distill_jax.training import pipeline
from distill_jax.training import state as state_lib


def matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = f(a)
    out.block_until_ready()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def teacher_step(config, info: DatasetInfo, batch_size: int):
    """(compiled step, train state, batch) of the project's teacher train step on random data.

    The step is `state.make_train_step` over the teacher stage's loss (`pipeline.BUILDERS`),
    jitted with the state donated; bench/torch_side_by_side.py times the same one.
    """
    mesh = parallel.make_mesh(-1)
    run = Run(epath.Path("/nonexistent"), config, info, plan_stages(config))  # never written
    stage = pipeline.BUILDERS["teacher"](run, run.stage("teacher"), None)
    optimizer = state_lib.make_optimizer(stage.optimizer, int(config.teacher.num_steps))
    state = state_lib.create_state(stage.init_params(None), optimizer, seed=0)
    ema_decay = float(stage.optimizer.ema_decay)
    step = jax.jit(
        state_lib.make_train_step(stage.loss_fn, optimizer, ema_decay=ema_decay),
        donate_argnums=(0,),
    )
    key = jax.random.PRNGKey(1)
    labels = jax.random.randint(key, (batch_size,), 0, info.num_classes)
    if config.text.enabled:  # text conditions: random token states, the last 6 positions padding
        tokens = int(config.text.max_tokens)
        labels = jax.random.normal(key, (batch_size, tokens, text_encoder.WIDTH))
        labels = labels * (jnp.arange(tokens) < tokens - 6)[None, :, None]
    batch = {
        "x": jax.random.uniform(key, (batch_size, *info.shape), minval=-1, maxval=1),
        "label": labels,
    }
    batch = loader.to_global_batch(jax.device_get(batch), parallel.batch_sharded(mesh))
    return step.lower(state, batch, None).compile(), state, batch


def bench_config(name: str, config, info: DatasetInfo, batch_size: int, steps: int) -> None:
    compiled, state, batch = teacher_step(config, info, batch_size)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    flops = float(cost.get("flops", float("nan")))
    memory = compiled.memory_analysis()
    state, metrics = compiled(state, batch, None)  # warm-up
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)
    per_step = (time.perf_counter() - start) / steps
    step_mem = (memory.argument_size_in_bytes + memory.temp_size_in_bytes) / 2**20
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"{name:10s} batch {batch_size:4d}  {batch_size / per_step:9.1f} images/s  "
        f"{per_step * 1e3:8.2f} ms/step  {flops / 1e9:8.3f} GFLOP/step  "
        f"{flops / per_step / 1e9:8.2f} GFLOP/s achieved  step memory {step_mem:8.1f} MiB  "
        f"peak RSS {peak_rss:8.1f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    print(f"device: {jax.devices()[0].device_kind} x{len(jax.devices())} ({jax.default_backend()})")
    print(f"matmul 2048^3 float32: {matmul_flops_per_s() / 1e9:.2f} GFLOP/s")
    digits = load_config("configs/digits.py")
    bench_config(
        "digits", digits, DatasetInfo("digits", (8, 8, 1), 10, None, None), args.batch, args.steps
    )
    text = load_config("configs/digits_text.py")
    bench_config(
        "text", text, DatasetInfo("digits_text", (8, 8, 1), 10, None, None), args.batch, args.steps
    )
    rgb32 = load_config("configs/digits.py")
    rgb32.model.attn_resolutions = (16,)
    bench_config(
        "32x32x3", rgb32, DatasetInfo("rgb32", (32, 32, 3), 10, None, None), args.batch, args.steps
    )


if __name__ == "__main__":
    main()
