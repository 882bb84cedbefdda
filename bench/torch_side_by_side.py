"""JAX vs PyTorch images/s of the teacher train step, side by side in one process.

Measures, for the default digits config (8x8x1, batch 128) and the same network on 32x32x3
images (batch 64, self-attention at 16x16, as bench/bench_teacher.py): images/s of the JAX
teacher step (the project's own loss, optimiser and jitted step) and of a PyTorch port of it
(same layers, channel counts and parameters, copied from the JAX initialisation; v-output ->
x-hat, truncated-SNR weighted x-MSE with label dropout; global-norm clipping, AdamW with the
config's hyper-parameters, EMA after each step), and the ratio. Also the float32 GFLOP/s of a
2048^3 matmul in each framework. Warm-up steps are excluded; each rate is the median over
--windows timed windows of --steps steps.

Usage: pip install -e .[bench]   (PyTorch is a benchmark-only extra)
       python bench/torch_side_by_side.py [--steps 10] [--shapes 8,32] [--torch_compile]
"""

import argparse
import math
import os
import statistics
import sys
import time

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError:
    sys.exit("torch_side_by_side: PyTorch is not installed: pip install -e .[bench]")

import jax
import numpy as np
from steps import matmul_flops_per_s, teacher_step

from distill_jax import xla_flags
from distill_jax.config import load_config
from distill_jax.data.sources import DatasetInfo
from distill_jax.models.denoiser import count_params
from distill_jax.models.unet import num_groups

# size: ((H, W, C), batch, attention resolutions); None keeps the digits config's (4,).
SHAPES = {8: ((8, 8, 1), 128, None), 32: ((32, 32, 3), 64, (16,))}


def shape_config(size: int):
    """The digits config, and for 32 the 32x32x3 override of bench_teacher.py."""
    (h, w, c), batch, attn = SHAPES[size]
    config = load_config("configs/digits.py")
    if attn is not None:
        config.model.attn_resolutions = attn
    return config, DatasetInfo(f"{h}x{w}x{c}", (h, w, c), 10, None, None), batch


def parse_shapes(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """The sizes of --shapes (a comma-separated subset of SHAPES), or one clear error line."""
    sizes = [int(s) if s.strip().isdigit() else s for s in text.split(",") if s.strip()]
    if not sizes or not set(sizes) <= set(SHAPES):
        parser.error(f"--shapes={text!r}: accepted a comma-separated subset of 8,32")
    return sizes


def jax_step(config, info: DatasetInfo, batch_size: int):
    """(run n steps, params) for the project's teacher step (`steps.teacher_step`)."""
    step = teacher_step(config, info, batch_size)
    return step.run, jax.device_get(step.state.params)


class ResBlock(nn.Module):
    """unet.ResBlock: GroupNorm, swish, conv, FiLM, dropout, conv, 1x1 skip where C changes."""

    def __init__(self, cin: int, c: int, emb: int, dropout: float):
        super().__init__()
        self.norm_0 = nn.GroupNorm(num_groups(cin), cin, eps=1e-6)
        self.conv_0 = nn.Conv2d(cin, c, 3, padding=1)
        self.film = nn.Linear(emb, 2 * c)
        self.norm_1 = nn.GroupNorm(num_groups(c), c, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv_1 = nn.Conv2d(c, c, 3, padding=1)
        self.skip = nn.Conv2d(cin, c, 1) if cin != c else None

    def forward(self, x, emb):
        """x [B, C_in, H, W], emb [B, E] -> [B, out_channels, H, W]."""
        h = self.conv_0(F.silu(self.norm_0(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.conv_1(self.drop(F.silu(self.norm_1(h) * (1.0 + scale) + shift)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nn.Module):
    """unet.AttentionBlock: GroupNorm, multi-head self-attention over H*W, residual."""

    def __init__(self, c: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(num_groups(c), c, eps=1e-6)
        self.qkv = nn.Linear(c, 3 * c)
        self.proj_out = nn.Linear(c, c)

    def forward(self, x):
        """x [B, C, H, W] -> [B, C, H, W]."""
        b, c, height, width = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, N, C]
        qkv = self.qkv(h).view(b, height * width, 3, self.heads, c // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each [B, heads, N, head_dim]
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        return x + self.proj_out(h).transpose(1, 2).reshape(b, c, height, width)


class Conditioning(nn.Module):
    """embeddings.ConditioningEmbedding without the guidance branch (a teacher's)."""

    def __init__(self, features: int, emb: int, num_classes: int):
        super().__init__()
        self.time_dense_0 = nn.Linear(features, emb)
        self.time_dense_1 = nn.Linear(emb, emb)
        self.class_embed = nn.Embedding(num_classes + 1, emb)
        half = features // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half) / max(half - 1, 1))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, logsnr, labels):
        """logsnr [B] float, labels [B] int -> [B, emb_dim]."""
        unit = torch.atan(torch.exp(-0.5 * logsnr)) / (0.5 * math.pi)
        args = 1000.0 * unit[:, None] * self.freqs[None, :]
        h = self.time_dense_0(torch.cat([torch.sin(args), torch.cos(args)], dim=-1))
        return self.time_dense_1(F.silu(h)) + self.class_embed(labels)


class UNet(nn.Module):
    """unet.UNet (NCHW), its modules named as the Flax ones; `plan` is the forward program."""

    def __init__(self, m, size: int, data_channels: int, num_classes: int):
        super().__init__()
        ch, mult, emb = m.channels, tuple(m.channel_mult), m.emb_dim or 4 * m.channels
        attn, drop, nrb = tuple(m.attn_resolutions), float(m.dropout), m.num_res_blocks
        self.cond = Conditioning(ch, emb, num_classes)
        self.input_conv = nn.Conv2d(data_channels, ch, 3, padding=1)
        self.plan, skips, c, res = [], [ch], ch, size

        def add(op: str, name: str | None = None, module: nn.Module | None = None) -> None:
            if module is not None:
                self.add_module(name, module)
            self.plan.append((op, name))

        for level, mu in enumerate(mult):
            for i in range(nrb):
                add("res", f"down_{level}_res_{i}", ResBlock(c, ch * mu, emb, drop))
                c = ch * mu
                if res in attn:
                    add("attn", f"down_{level}_attn_{i}", AttentionBlock(c, m.num_heads))
                add("push"), skips.append(c)
            if level != len(mult) - 1:
                add("down", f"down_{level}_downsample", nn.Conv2d(c, c, 3, stride=2))
                add("push"), skips.append(c)
                res //= 2
        add("res", "mid_res_0", ResBlock(c, c, emb, drop))
        add("attn", "mid_attn", AttentionBlock(c, m.num_heads))
        add("res", "mid_res_1", ResBlock(c, c, emb, drop))
        for level, mu in reversed(list(enumerate(mult))):
            for i in range(nrb + 1):
                add("pop")
                add("res", f"up_{level}_res_{i}", ResBlock(c + skips.pop(), ch * mu, emb, drop))
                c = ch * mu
                if res in attn:
                    add("attn", f"up_{level}_attn_{i}", AttentionBlock(c, m.num_heads))
            if level != 0:
                add("up", f"up_{level}_upsample", nn.Conv2d(c, c, 3, padding=1))
                res *= 2
        self.out_norm = nn.GroupNorm(num_groups(c), c, eps=1e-6)
        self.out_conv = nn.Conv2d(c, data_channels, 3, padding=1)  # 'v': C output channels

    def forward(self, z, logsnr, labels):
        """Raw output (v) for z [B, C, H, W] at log-SNRs [B] with labels [B]."""
        emb, h = self.cond(logsnr, labels), self.input_conv(z)
        skips = [h]
        for op, name in self.plan:
            module = getattr(self, name) if name else None
            if op == "res":
                h = module(h, emb)
            elif op == "attn":
                h = module(h)
            elif op == "push":
                skips.append(h)
            elif op == "pop":
                h = torch.cat([h, skips.pop()], dim=1)
            elif op == "down":  # XLA 'SAME' at stride 2 pads (0, 1), not (1, 1)
                h = module(F.pad(h, (0, 1, 0, 1)))
            else:  # "up": nearest-neighbour x2, then conv
                h = module(F.interpolate(h, scale_factor=2, mode="nearest"))
        return self.out_conv(F.silu(self.out_norm(h)))


def load_jax_params(model: nn.Module, params) -> None:
    """Copy the Flax parameters into `model`; fails unless the two map one to one."""
    torch_params = dict(model.named_parameters())
    with_path = jax.tree_util.tree_flatten_with_path(params)[0]
    rename = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
    for path, leaf in with_path:
        keys = [p.key for p in path]
        name = ".".join(keys[:-1] + [rename[keys[-1]]])
        target, value = torch_params.pop(name), np.asarray(leaf)
        if keys[-1] == "kernel" and target.ndim == 4:
            value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        elif keys[-1] == "kernel":  # Dense / DenseGeneral: [in..., out...] -> [out, in]
            value = value.reshape(target.shape[1], target.shape[0]).T
        elif keys[-1] != "embedding":
            value = value.reshape(-1)
        assert value.shape == target.shape, (name, value.shape, target.shape)
        target.data.copy_(torch.from_numpy(np.array(value)))
    assert not torch_params, f"torch parameters without a JAX counterpart: {list(torch_params)}"


def torch_step(config, info: DatasetInfo, batch_size: int, params, compile_model: bool):
    """(run n steps, parameter count) for the PyTorch port of the teacher step."""
    (height, _, channels), d, opt = info.shape, config.diffusion, config.teacher.optimizer
    assert config.model.parameterisation == "v" and config.model.dtype == "float32"
    assert d.loss_weighting == "truncated_snr"
    model = UNet(config.model, height, channels, info.num_classes)
    load_jax_params(model, params)
    weights = list(model.parameters())
    ema = [p.detach().clone() for p in weights]
    adamw = torch.optim.AdamW(
        weights, opt.learning_rate, (opt.b1, opt.b2), opt.eps, opt.weight_decay
    )
    forward = torch.compile(model) if compile_model else model
    b = math.atan(math.exp(-0.5 * d.logsnr_max))
    a = math.atan(math.exp(-0.5 * d.logsnr_min)) - b
    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch_size, channels, height, height, generator=gen) * 2 - 1
    labels = torch.randint(0, info.num_classes, (batch_size,), generator=gen)

    def one_step():
        t = torch.rand(batch_size)
        logsnr = (-2.0 * torch.log(torch.tan(a * t + b))).clamp(d.logsnr_min, d.logsnr_max)
        alpha = torch.sigmoid(logsnr).sqrt()[:, None, None, None]
        sigma = torch.sigmoid(-logsnr).sqrt()[:, None, None, None]
        z = alpha * x + sigma * torch.randn_like(x)
        dropped = torch.rand(batch_size) < d.p_uncond
        xhat = alpha * z - sigma * forward(
            z, logsnr, torch.where(dropped, info.num_classes, labels)
        )
        mse = (xhat - x).square().mean(dim=(1, 2, 3))
        loss = (torch.exp(logsnr.clamp(min=0.0)) * mse).mean()  # truncated-SNR weighting
        adamw.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(weights, opt.grad_clip)
        adamw.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, weights, 1.0 - opt.ema_decay)
            param_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(weights)))
        return loss.detach(), grad_norm, param_norm, mse.detach().mean()

    def run_steps(n: int) -> None:
        model.train()
        for _ in range(n):
            one_step()

    return run_steps, sum(p.numel() for p in weights)


def images_per_s(run_steps, batch_size: int, steps: int, windows: int, warmup: int) -> float:
    """Median over `windows` windows of `steps` steps, after `warmup` untimed steps."""
    run_steps(warmup)
    rates = []
    for _ in range(windows):
        start = time.perf_counter()
        run_steps(steps)
        rates.append(batch_size * steps / (time.perf_counter() - start))
    return statistics.median(rates)


def torch_matmul_flops_per_s(n: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(n, n)
    a @ a
    start = time.perf_counter()
    for _ in range(repeats):
        a @ a
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="steps per timed window")
    parser.add_argument("--windows", type=int, default=5, help="timed windows (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--shapes", default="8,32", help="comma-separated: 8 and/or 32")
    parser.add_argument("--torch_compile", action="store_true", help="torch.compile the U-Net")
    args = parser.parse_args()
    xla_flags.apply()  # the CLI's CPU XLA flags (importing distill_jax applied them already)
    torch.set_num_threads(len(os.sched_getaffinity(0)))
    sizes = parse_shapes(parser, args.shapes)
    print(
        f"jax {jax.__version__} on {jax.devices()[0].device_kind} x{len(jax.devices())}; "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"{'torch.compile' if args.torch_compile else 'eager'}; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
    )
    timing = (args.steps, args.windows, args.warmup)
    rows = []
    for size in sizes:
        config, info, batch = shape_config(size)
        run_jax, params = jax_step(config, info, batch)
        jax_rate = images_per_s(run_jax, batch, *timing)
        run_torch, torch_count = torch_step(config, info, batch, params, args.torch_compile)
        jax_count = count_params(params)
        assert jax_count == torch_count, f"parameter counts differ: {jax_count} vs {torch_count}"
        torch_rate = images_per_s(run_torch, batch, *timing)
        rows.append((f"{info.name} b{batch}", jax_count, torch_count, jax_rate, torch_rate))
    print(
        f"{'shape':13s} {'jax params':>10s} {'torch params':>12s} "
        f"{'jax img/s':>10s} {'torch img/s':>11s} {'jax/torch':>9s}"
    )
    for name, jax_count, torch_count, jax_rate, torch_rate in rows:
        print(
            f"{name:13s} {jax_count:10d} {torch_count:12d} "
            f"{jax_rate:10.1f} {torch_rate:11.1f} {jax_rate / torch_rate:9.2f}"
        )
    jax_mm, torch_mm = matmul_flops_per_s() / 1e9, torch_matmul_flops_per_s() / 1e9
    print(f"matmul 2048^3 float32 GFLOP/s: jax {jax_mm:.1f}  torch {torch_mm:.1f}")


if __name__ == "__main__":
    main()
