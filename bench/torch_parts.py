"""Where the JAX / PyTorch gap of bench/torch_side_by_side.py is: the U-Net's blocks one by one.

For each shape of torch_side_by_side.py (8x8x1 at batch 128, 32x32x3 at batch 64), runs the
PyTorch port's U-Net once with forward hooks to list every ResBlock and AttentionBlock with the
input shape it gets in the real network, then times each distinct (block, shape) forward and
backward (gradients of the parameters and the input) in both frameworks: the project's Flax
module (`unet.ResBlock`, `unet.AttentionBlock`, jitted) and the port's PyTorch module, with the
same random weights (copied from the Flax ones; the outputs are checked to agree). Dropout is
off in both: the frameworks draw its random bits differently, and a ResBlock jitted alone gets
JAX's rolled threefry loop on CPU, which XLA unrolls inside the whole train step, so timing it
alone would charge JAX for a cost the step does not have. Each row is milliseconds per call,
the frameworks' timed windows interleaved; 'x' is how often the network calls that block per
forward pass, and the totals weight each row by it. Attention rows also time PyTorch with its
unfused 'math' attention (the score matrix written out, as XLA does) beside its default
scaled_dot_product_attention kernel. Last, a 2048^3 float32 matmul in each (GFLOP/s).

Usage: pip install -e .[bench]   (PyTorch is a benchmark-only extra)
       python bench/torch_parts.py [--shapes 8,32] [--calls 10]
"""

import argparse
import os
import statistics
import time

import jax
import numpy as np
import torch
from steps import matmul_flops_per_s
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch_side_by_side import (
    AttentionBlock,
    ResBlock,
    UNet,
    load_jax_params,
    parse_shapes,
    shape_config,
    torch_matmul_flops_per_s,
)

from distill_jax import xla_flags
from distill_jax.models import unet


def block_calls(config, info, batch: int) -> list[tuple[str, tuple, int, torch.nn.Module]]:
    """(kind, input shape NHWC, calls per forward, a module) for each distinct block called."""
    (height, _, channels), m = info.shape, config.model
    model = UNet(m, height, channels, info.num_classes)
    found: dict[tuple, list] = {}

    def hook(module, inputs, _output):
        n, c, h, w = inputs[0].shape
        if isinstance(module, ResBlock):
            key = ("res", (n, h, w, c), module.conv_1.out_channels)
        else:
            key = ("attn", (n, h, w, c), c)
        found.setdefault(key, [0, module])[0] += 1

    for module in model.modules():
        if isinstance(module, (ResBlock, AttentionBlock)):
            module.register_forward_hook(hook)
    with torch.no_grad():
        z = torch.zeros(batch, channels, height, height)
        model(z, torch.zeros(batch), torch.zeros(batch, dtype=torch.long))
    return [(kind, shape, count, module) for (kind, shape, _), (count, module) in found.items()]


def timed(fns: dict, calls: int, windows: int = 5) -> dict[str, float]:
    """Median ms per call of each fn() over `windows` windows, after one warm-up call each.

    The fns' windows are interleaved, so a slow spell of the machine falls on all of them.
    """
    times: dict[str, list] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(windows):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - start) / calls)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def flax_block(kind: str, torch_module, config, shape):
    """The Flax block of `kind` as a function of (params, x, emb), random params and inputs."""
    m, key = config.model, jax.random.PRNGKey(0)
    x = jax.random.normal(key, shape)
    emb = jax.random.normal(key, (shape[0], m.emb_dim or 4 * m.channels))
    if kind == "res":
        module = unet.ResBlock(torch_module.conv_1.out_channels)
        params = module.init(key, x, emb, train=False)["params"]

        def apply(params, x, emb):
            return module.apply({"params": params}, x, emb, train=False)
    else:
        module = unet.AttentionBlock(m.num_heads)
        params = module.init(key, x)["params"]

        def apply(params, x, emb):
            return module.apply({"params": params}, x)

    leaves, tree = jax.tree.flatten(params)  # random weights: no zero-initialised layers
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    params = tree.unflatten(
        [0.2 * jax.random.normal(k, v.shape) for k, v in zip(keys, leaves, strict=True)]
    )
    return apply, params, x, emb


def time_block(kind: str, torch_module, config, shape, calls: int) -> dict[str, float]:
    """ms per forward + backward of one block in JAX and PyTorch (and PyTorch's math attention)."""
    apply, params, x, emb = flax_block(kind, torch_module, config, shape)
    load_jax_params(torch_module, params)
    torch_module.eval()  # dropout off in both (see the module docstring)
    cotangent = jax.random.normal(
        jax.random.PRNGKey(2), jax.eval_shape(apply, params, x, emb).shape
    )

    @jax.jit
    def jax_step(params, x, emb, cotangent):  # all arguments: nothing is constant-folded
        _, vjp = jax.vjp(lambda p, x: apply(p, x, emb), params, x)
        return vjp(cotangent)

    def nchw(a):
        return torch.from_numpy(np.asarray(a).transpose(0, 3, 1, 2).copy())

    xt, gt, embt = nchw(x).requires_grad_(), nchw(cotangent), torch.from_numpy(np.array(emb))

    def torch_forward():
        return torch_module(xt, embt) if kind == "res" else torch_module(xt)

    def torch_step():
        torch_module.zero_grad(set_to_none=True)
        xt.grad = None
        torch_forward().backward(gt)

    def torch_math_step():
        with sdpa_kernel(SDPBackend.MATH):
            torch_step()

    with torch.no_grad():
        theirs = torch_forward().numpy().transpose(0, 2, 3, 1)
    error = float(np.abs(np.asarray(apply(params, x, emb)) - theirs).max())
    assert error <= 1e-4 * max(float(np.abs(theirs).max()), 1.0), f"{kind}: outputs differ {error}"
    fns = {
        "jax": lambda: jax.block_until_ready(jax_step(params, x, emb, cotangent)),
        "torch": torch_step,
    }
    if kind == "attn":
        fns["torch_math"] = torch_math_step
    return timed(fns, calls)


def report(size: int, calls: int) -> None:
    """Print the per-block table of one shape and its totals."""
    config, info, batch = shape_config(size)
    print(f"\n{info.name}, batch {batch}: ms per forward + backward")
    print(
        f"{'block':5s} {'input NHWC':>18s} {'x':>2s} {'jax':>8s} {'torch':>8s} "
        f"{'jax/torch':>9s} {'torch math attn':>15s}"
    )
    totals = {"res": [0.0, 0.0], "attn": [0.0, 0.0]}
    for kind, shape, count, module in block_calls(config, info, batch):
        row = time_block(kind, module, config, shape, calls)
        totals[kind][0] += count * row["jax"]
        totals[kind][1] += count * row["torch"]
        math = f"{row['torch_math']:15.2f}" if "torch_math" in row else ""
        print(
            f"{kind:5s} {str(shape):>18s} {count:2d} {row['jax']:8.2f} {row['torch']:8.2f} "
            f"{row['jax'] / row['torch']:9.2f} {math}"
        )
    for kind, (jax_total, torch_total) in totals.items():
        if torch_total:
            print(
                f"total {kind:4s} blocks {'':14s} {jax_total:8.1f} {torch_total:8.1f} "
                f"{jax_total / torch_total:9.2f}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8,32", help="comma-separated: 8 and/or 32")
    parser.add_argument("--calls", type=int, default=10, help="calls per timed window")
    args = parser.parse_args()
    xla_flags.apply()
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sizes = parse_shapes(parser, args.shapes)
    print(
        f"jax {jax.__version__}, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    for size in sizes:
        report(size, args.calls)
    jax_mm, torch_mm = matmul_flops_per_s() / 1e9, torch_matmul_flops_per_s() / 1e9
    print(f"\nmatmul 2048^3 float32 GFLOP/s: jax {jax_mm:.1f}  torch {torch_mm:.1f}")


if __name__ == "__main__":
    main()
