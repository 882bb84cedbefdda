"""Teacher train-step throughput, achieved FLOP/s and memory, beside a matmul's FLOP/s.

Prints, for the digits config (8x8x1), the text-conditioned digits (8x8x1, 16-token prompts)
and the same network on 32x32x3 images: images/s, the
step's FLOPs from XLA's cost analysis, the FLOP/s this achieves, the FLOP/s of a large float32
matmul measured in the same process (what this device can do on dense work), the compiled
step's memory (arguments + temporaries, from XLA's memory analysis) and the process's peak
resident memory. The step is built and timed by `steps.TimedStep`, as in bench_distill.py.

Usage: python bench/bench_teacher.py [--steps 20] [--batch 128]
"""

import argparse
import resource

import jax
from steps import matmul_flops_per_s, teacher_step

from distill_jax.config import load_config
from distill_jax.data.sources import DatasetInfo


def bench_config(name: str, config, info: DatasetInfo, batch_size: int, steps: int) -> None:
    step = teacher_step(config, info, batch_size)
    per_step = step.run(steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    print(
        f"{name:10s} batch {batch_size:4d}  {batch_size / per_step:9.1f} images/s  "
        f"{per_step * 1e3:8.2f} ms/step  {step.flops / 1e9:8.3f} GFLOP/step  "
        f"{step.flops / per_step / 1e9:8.2f} GFLOP/s achieved  step memory "
        f"{step.memory_bytes / 2**20:8.1f} MiB  peak RSS {peak_rss:8.1f} MiB"
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
