"""bfloat16 model FLOP utilisation (MFU) of a train step, and a 4-step student's sampling rate.

For the U-Nets of the papers' CIFAR-10 (configs/cifar10.py: 32x32x3, 256 channels) and
ImageNet 64 (configs/imagenet64.py: 64x64x3, 192 channels x (1, 2, 3, 4)), both at
model.dtype=bfloat16 (float32 parameters and optimiser state, as in training), prints:

- the teacher train step (`steps.TimedStep`: the project's loss, AdamW, clipping, EMA):
  images/s, FLOPs per step from XLA's cost analysis of the compiled step, achieved FLOP/s and
  MFU = achieved / the device's peak dense bfloat16 FLOP/s;
- the stage-one student (teacher weights plus the w branch) sampling with 4 DDIM steps:
  images/s, network FLOPs per image (4 calls; XLA counts a loop's body once, so one call is
  measured and multiplied) and MFU.

One device: everything is placed on jax.devices()[0], so the figures are one chip's. The
peak comes from --peak_tflops, else from PEAK_TFLOPS by device kind, else (a CPU) from a
bfloat16 matmul measured in this process, labelled as such.

Usage, on a GPU or TPU machine with the project installed:
    python bench/bench_mfu.py                      # batch 128, sampling batch 256
    python bench/bench_mfu.py --batch 256 --configs imagenet64 --peak_tflops 989
A quick check that it runs (any machine): --batch 2 --sample_batch 2 --steps 1
"""

import argparse
import time

import jax
import jax.numpy as jnp
from steps import TimedStep, bench_run, matmul_flops_per_s, random_batch

from distill_jax.config import load_config
from distill_jax.data.sources import DatasetInfo
from distill_jax.diffusion import samplers
from distill_jax.training import drivers

# Dense bfloat16 peak TFLOP/s per chip (vendor data sheets), matched against device_kind.
PEAK_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("TPU v6", 918.0),
    ("TPU v5 lite", 197.0),
    ("TPU v5e", 197.0),
    ("TPU v5", 459.0),  # v5p
    ("TPU v4", 275.0),
)
CONFIGS = {
    "cifar10": ("configs/cifar10.py", DatasetInfo("cifar10", (32, 32, 3), 10, None, None)),
    "imagenet64": (
        "configs/imagenet64.py",
        DatasetInfo("imagenet64", (64, 64, 3), 1000, None, None),
    ),
}


def peak_flops(device, override_tflops: float | None) -> tuple[float, str]:
    """(peak FLOP/s, where the number comes from) for `device`."""
    if override_tflops:
        return override_tflops * 1e12, "--peak_tflops"
    for name, tflops in PEAK_TFLOPS:
        if name.lower() in device.device_kind.lower():
            return tflops * 1e12, f"data sheet ({name})"
    n = 2048 if device.platform == "cpu" else 8192
    measured = matmul_flops_per_s(n, repeats=3, dtype=jnp.bfloat16, device=device)
    return measured, "measured bf16 matmul"


def on_device(tree, device):
    return jax.device_put(jax.device_get(tree), device)


def sampling_rate(run, teacher_params, batch_size: int, device, repeats: int):
    """(images/s, FLOPs per image) of the stage-one student sampling with 4 DDIM steps."""
    stage_one = drivers.BUILDERS["stage1"](run, run.stage("stage1"), teacher_params)
    params = on_device(stage_one.init_params(teacher_params), device)
    fn = run.denoise_fn(run.stage("stage1"), params)
    key = jax.random.PRNGKey(0)
    z = jax.device_put(jax.random.normal(key, (batch_size, *run.info.shape)), device)
    labels = jax.device_put(jnp.zeros((batch_size,), jnp.int32), device)
    w = jax.device_put(jnp.full((batch_size,), 2.0), device)

    def sample(fn, z, labels, w):
        return samplers.run_sampler("ddim", fn, z, labels, w, steps=4)

    compiled = jax.jit(sample).lower(fn, z, labels, w).compile()
    # XLA's cost analysis counts a loop's body once, so the FLOPs are one network call's x 4.
    t = jax.device_put(jnp.full((batch_size,), 0.5), device)
    call = jax.jit(lambda fn, z, t, labels, w: fn(z, t, labels, w)).lower(fn, z, t, labels, w)
    cost = call.compile().cost_analysis()
    flops = 4 * float((cost[0] if isinstance(cost, list) else cost).get("flops", float("nan")))
    compiled(fn, z, labels, w).block_until_ready()
    start = time.perf_counter()
    for _ in range(repeats):
        out = compiled(fn, z, labels, w)
    out.block_until_ready()
    seconds = (time.perf_counter() - start) / repeats
    return batch_size / seconds, flops / batch_size


def bench(name: str, args, device, peak: float) -> None:
    path, info = CONFIGS[name]
    config = load_config(path)
    config.model.dtype = "bfloat16"
    run = bench_run(config, info, args.batch)
    stage = drivers.BUILDERS["teacher"](run, run.stage("teacher"), None)
    batch = on_device(random_batch(config, info, args.batch), device)
    with jax.default_device(device):
        step = TimedStep(stage, batch)
    per_step = step.run(args.steps)
    achieved = step.flops / per_step
    print(
        f"{name:10s} train step   batch {args.batch:4d}  {args.batch / per_step:10.1f} images/s  "
        f"{step.flops / 1e12:8.3f} TFLOP/step  {achieved / 1e12:8.2f} TFLOP/s  "
        f"MFU {achieved / peak:6.1%}"
    )
    teacher_params = stage.init_params(None)
    rate, flops_per_image = sampling_rate(
        run, teacher_params, args.sample_batch, device, args.steps
    )
    print(
        f"{name:10s} 4-step DDIM  batch {args.sample_batch:4d}  {rate:10.1f} images/s  "
        f"{flops_per_image / 1e9:8.2f} GFLOP/image  {rate * flops_per_image / 1e12:8.2f} "
        f"TFLOP/s  MFU {rate * flops_per_image / peak:6.1%}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="train-step batch")
    parser.add_argument("--sample_batch", type=int, default=256, help="sampling batch")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (and sampler calls)")
    parser.add_argument("--configs", default="cifar10,imagenet64", help="comma-separated")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's peak")
    args = parser.parse_args()
    names = [n for n in args.configs.split(",") if n]
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"--configs: unknown {unknown}; accepted {sorted(CONFIGS)}")
    device = jax.devices()[0]
    peak, source = peak_flops(device, args.peak_tflops)
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), one of {len(jax.devices())}; "
        f"peak bf16 {peak / 1e12:.1f} TFLOP/s ({source})"
    )
    for name in names:
        bench(name, args, device, peak)


if __name__ == "__main__":
    main()
