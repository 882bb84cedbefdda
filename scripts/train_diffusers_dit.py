"""Train a small pixel-space DiT on the bundled digits with diffusers and PyTorch.

A teacher that distill_jax did not train, for `configs/digits_dit.py`.

Needs the `diffusers` extra (`pip install -e .[diffusers]`: PyTorch, diffusers). Writes a
diffusers pipeline folder (transformer/ with the EMA weights, scheduler/) and, with
--samples, diffusers' own guided DDIM samples of it (DiTPipeline's loop body with diffusers'
DDIMScheduler; DiTPipeline itself hard-codes the null class 1000 and decodes through a VAE):
- `ddim_samples.npz`: for each w in --weights, --num samples of --steps DDIM steps from fixed
  noise (for FD against distill_jax's sampler; bench/dit_import.py);
- `ddim_golden.npz`: 20 of them with their initial noise (tests/test_dit_digits.py checks that
  the imported teacher gives the same images).

Training follows the paper's teacher recipe where diffusers leaves a choice open:
- labels are dropped to the null class (row 10) with probability 0.1 once per example in the
  training loop. diffusers' own LabelEmbedding dropout is switched off: every block has its own
  label embedder and each would draw its own dropout, so one example could be conditional in
  one block and null in the next;
- DDPMScheduler: 1,000 linear betas (DiT's), v-prediction by default (as Stable Diffusion 2.x
  trains), uniform integer timesteps, plain MSE on the prediction; AdamW and an EMA.
- `--prediction epsilon --learned_sigma` makes a teacher laid out as DiT-XL/2: epsilon
  prediction and twice the output channels (the prediction, then the variance channels, which
  DiTPipeline splits off). Only the prediction is trained (plain epsilon MSE); DiT's variational
  loss on the variance channels is left out, since no DDIM-family sampler reads them.

Command that made the committed folder (tests/data/diffusers/dit_digits: 949 s of training and
114 s of sampling here, on 2 CPU cores shared with other jobs):
python scripts/train_diffusers_dit.py --out tests/data/diffusers/dit_digits --samples
and the epsilon teacher with learned variance (tests/data/diffusers/dit_digits_eps: 576 s of
training, 18 s of sampling per w):
python scripts/train_diffusers_dit.py --out tests/data/diffusers/dit_digits_eps --samples \
    --prediction epsilon --learned_sigma --steps 2000
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiTTransformer2DModel

from distill_jax.data import digits

NULL = digits.NUM_CLASSES  # the extra label row: the null class of guidance


def train_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The digits train split: images NCHW float32 in [-1, 1] and int64 labels."""
    images, labels = digits.digits_arrays()
    index = digits.split_indices(labels)["train"]
    x = images[index].astype(np.float32) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2), labels[index]


def make_model(learned_sigma: bool) -> DiTTransformer2DModel:
    """A DiT of 4 blocks, width 64 (2 heads of 32), patches of 2 on 8x8x1: 16 tokens."""
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=1,
        out_channels=2 if learned_sigma else 1,
        num_layers=4,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=NULL,
    )
    for block in model.transformer_blocks:  # dropout is drawn once per example, below
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def train(args) -> tuple[DiTTransformer2DModel, DDPMScheduler]:
    """Train with --prediction; returns the EMA model and the training scheduler."""
    torch.manual_seed(args.seed)
    x_all, y_all = (torch.from_numpy(a) for a in train_arrays())
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="linear", prediction_type=args.prediction
    )
    model = make_model(args.learned_sigma).train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_all), (args.batch,), generator=generator)
        x, labels = x_all[index], y_all[index].clone()
        drop = torch.rand(args.batch, generator=generator) < args.p_uncond
        labels[drop] = NULL
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch,), generator=generator)
        z = scheduler.add_noise(x, noise, t)
        target = noise if args.prediction == "epsilon" else scheduler.get_velocity(x, noise, t)
        prediction = model(z, timestep=t, class_labels=labels).sample[:, : x.shape[1]]
        loss = torch.mean((prediction - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = args.lr * min(1.0, step / 200)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.mul_(args.ema).add_(p, alpha=1 - args.ema)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return ema, scheduler


@torch.no_grad()
def ddim_sample(model, scheduler, noise, labels, w: float, steps: int) -> np.ndarray:
    """DiTPipeline's guided loop (guidance_scale = 1 + w) with diffusers' DDIMScheduler."""
    scheduler.set_timesteps(steps)
    batch = len(labels)
    latents = torch.cat([noise] * 2)
    class_input = torch.cat([labels, torch.full_like(labels, NULL)])
    scale = 1.0 + w
    for t in scheduler.timesteps:
        half = latents[:batch]
        latents = scheduler.scale_model_input(torch.cat([half, half]), t)
        out = model(latents, timestep=t[None].expand(2 * batch), class_labels=class_input).sample
        out = out[:, : noise.shape[1]]  # DiTPipeline splits off learned-variance channels
        cond, uncond = torch.split(out, batch)
        guided = uncond + scale * (cond - uncond)
        latents = scheduler.step(torch.cat([guided, guided]), t, latents).prev_sample
    return latents[:batch].numpy().transpose(0, 2, 3, 1)


def write_samples(model, out: str, args) -> None:
    """diffusers' DDIM samples at each w, and a small golden set with its noise."""
    scheduler = DDIMScheduler.from_pretrained(os.path.join(out, "scheduler"))
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn((args.num, 1, 8, 8), generator=generator)
    labels = torch.arange(args.num) % NULL
    arrays = {"labels": labels.numpy(), "steps": np.int32(args.steps_sample)}
    for w in args.weights:
        start = time.time()
        arrays[f"w={w:g}"] = np.concatenate(
            [
                ddim_sample(
                    model, scheduler, noise[i : i + 500], labels[i : i + 500], w, args.steps_sample
                )
                for i in range(0, args.num, 500)
            ]
        )
        print(f"diffusers DDIM w={w:g}: {args.num} samples in {time.time() - start:.1f}s")
    np.savez_compressed(os.path.join(out, "ddim_samples.npz"), **arrays)
    golden = dict(noise=noise[:20].numpy().transpose(0, 2, 3, 1), labels=labels[:20].numpy())
    for w in (0.0, 1.0, 4.0):
        golden[f"w={w:g}"] = ddim_sample(model, scheduler, noise[:20], labels[:20], w, 16)
    np.savez(os.path.join(out, "ddim_golden.npz"), steps=np.int32(16), **golden)


def main() -> None:
    """Train, save the pipeline folder, optionally sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers/dit_digits")
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--p_uncond", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", action="store_true")
    parser.add_argument("--num", type=int, default=600)
    parser.add_argument("--steps_sample", type=int, default=32)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction")
    parser.add_argument("--learned_sigma", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    model, scheduler = train(args)
    model.save_pretrained(os.path.join(args.out, "transformer"), safe_serialization=True)
    DDIMScheduler.from_config(scheduler.config, clip_sample=False).save_pretrained(
        os.path.join(args.out, "scheduler")
    )
    if args.samples:
        write_samples(model, args.out, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
