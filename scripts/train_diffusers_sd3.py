"""Train a small SD3Transformer2DModel on the captioned digits with diffusers' flow matching.

A Stable-Diffusion-3-layout text teacher that distill_jax did not train: a pixel-space (8x8x1)
StableDiffusion3Pipeline folder (`interop.sd3_pipeline` reads it; without a vae/ it is taken as
pixel-space), trained by diffusers' flow-matching recipe (examples/dreambooth/
train_dreambooth_sd3.py, rebuilt here from the library pieces it calls).

Needs the `diffusers` extra (`pip install -e .[diffusers]`: PyTorch, diffusers, transformers).
Writes a pipeline folder as StableDiffusion3Pipeline lays one out, without a vae/:
- transformer/: the EMA weights of an SD3Transformer2DModel on 8x8x1: patch_size 2 (16 image
  tokens), 4 joint blocks of width 128 (4 heads of 32), caption_projection_dim 128,
  pos_embed_max_size 8, joint_attention_dim 48 and pooled_projection_dim 32 (the text parts'),
  2.3M parameters;
- scheduler/: FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), SD3's;
- text_encoder/, text_encoder_2/ (CLIPTextModelWithProjection, widths 16 and 24, projections
  16 + 16 = 32), text_encoder_3/ (T5EncoderModel, d_model 48) and tokenizer/, tokenizer_2/
  (CLIPTokenizer, 77 tokens), tokenizer_3/ (T5Tokenizer): copied unchanged from
  tests/data/diffusers/sd3_tiny (tiny random encoders in SD3's real classes), frozen as SD3
  trains with frozen encoders;
- model_index.json: what StableDiffusion3Pipeline.save_config writes for a pipeline built with
  vae=None (its "vae" entry is [null, null]); diffusers loads the folder with
  `StableDiffusion3Pipeline.from_pretrained(folder, vae=None)` (without vae=None it refuses the
  missing component).

The prompt's encoding is StableDiffusion3Pipeline.encode_prompt's (called on a pipeline built
from these parts) with max_sequence_length MAX_SEQUENCE_LENGTH = 16: prompt_embeds [B, 77 + 16,
48] (the two CLIPs' penultimate states concatenated, zero-padded to T5's 48, then T5's 16
states) and pooled_prompt_embeds [B, 32]. The tiny T5 tokenizer (175 pieces) cuts about half of
the captions at 16 tokens, as encode_prompt does (its one-line warning is held back and the
count printed instead); the CLIPs see them whole.
A distill_jax run importing this folder needs config.text.max_tokens = 77 + 16 + 1 = 94. All
distinct captions are encoded once before training; the empty prompt's encoding (embeds and
pooled) is the unconditional input and replaces a caption's with probability 0.1.

Training, as train_dreambooth_sd3.py: `compute_density_for_timestep_sampling` (weighting_scheme
'logit_normal', logit_mean 0, logit_std 1) gives u, indices = (u * 1000).long() pick
timesteps = scheduler.timesteps[indices] and sigmas = scheduler.sigmas[indices] (what the
example's get_sigmas looks up: the training timesteps are distinct), noisy = (1 - sigma) x +
sigma noise, the transformer predicts at `timesteps`, target = noise - x (the velocity; the
example's default --precondition_outputs=1 instead trains x-hat = noisy - sigma v against x,
available here as `--precondition_outputs 1`), loss weighted by
`compute_loss_weighting_for_sd3` (ones for 'logit_normal', the example's default), AdamW
(weight decay 1e-4 and gradient clipping 1.0, the example's defaults; lr 1e-3 with 200
warm-up steps, as scripts/train_diffusers_sd.py, not the example's fine-tuning 1e-4), batch
128, EMA 0.995 of the weights.

patch_size 2, not 1: in 300-step trials of this script (lr 1e-3, batch 128, 1 thread each, run
side by side on the shared 2-core machine) patch 1 took 830 s and patch 2 621 s (1.9 s and 1.2 s
a step alone: the 77 CLIP and 16 T5 tokens dominate the joint sequence, patch 1 adds 64 image
tokens, patch 2 16), and patch 2's loss was no worse at equal steps (mean of steps 201-300:
patch 1 0.579, patch 2 0.554; steps 101-200: 0.648, 0.621), so patch 2 is the better use of
the same time.

With --samples, diffusers' own guided flow samples: StableDiffusion3Pipeline's denoising loop
line for line (the pipeline can be built with vae=None, but its __call__ decodes with the VAE
unless output_type='latent'): latents = the noise, scheduler.set_timesteps(N) (retrieve_timesteps
with the pipeline's defaults: no sigmas, no mu, this scheduler has no dynamic shifting), for
guidance_scale s = 1 + w > 1 the [uncond, cond] batch and v_u + s (v_c - v_u), at s = 1 (w = 0)
the conditional batch alone (the pipeline's do_classifier_free_guidance is s > 1), then
scheduler.step. The loop is checked against StableDiffusion3Pipeline(vae=None)(...,
output_type='latent') on 4 prompts at each w and the largest difference printed: 0 (bit for
bit, the negative prompt encoded at the pipeline's batch size). Written:
`ddim_samples.npz` (keys as scripts/train_diffusers_sd.py's: prompts, the evaluation's held-out
prompts from distill_jax.run.prompts.evaluation_prompts(--num); steps, --steps_sample; and
"w=0", "w=1", "w=4": [num, 8, 8, 1] samples) and `ddim_golden.npz` (12 samples with their
noise [12, 8, 8, 1], prompts, steps = 16, "w=..." for w in 0, 1, 4). The name says DDIM as the
other teachers' files do; the sampler is the flow-matching Euler one.

Command that made runs/sd3_digits_teacher (1,600 steps at about 1.28 s a step: 2,045 s of
training and 206 s of sampling on 2 CPU cores shared with other jobs):
python scripts/train_diffusers_sd3.py --out runs/sd3_digits_teacher --samples --steps 1600
tests/data/diffusers/sd3_digits holds that folder's transformer/, scheduler/,
model_index.json and the two .npz files (9 MB); its text parts are sd3_tiny's.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import shutil
import time

import numpy as np
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
)
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from distill_jax.data import captions, digits

MAX_SEQUENCE_LENGTH = 16  # encode_prompt's max_sequence_length: T5's tokens
PATCH_SIZE = 2
TEXT_PARTS = {
    "text_encoder": CLIPTextModelWithProjection,
    "text_encoder_2": CLIPTextModelWithProjection,
    "text_encoder_3": T5EncoderModel,
    "tokenizer": CLIPTokenizer,
    "tokenizer_2": CLIPTokenizer,
    "tokenizer_3": T5Tokenizer,
}
SOURCE = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "diffusers", "sd3_tiny")


def train_data() -> tuple[np.ndarray, list[str]]:
    """The captioned digits' train split: images NCHW float32 in [-1, 1] and their captions."""
    images, _ = digits.digits_arrays()
    index, _, texts = captions.split_captions("train")
    x = images[index].astype(np.float32) / 127.5 - 1.0
    return x.transpose(0, 3, 1, 2), texts


def make_transformer(patch_size: int = PATCH_SIZE) -> SD3Transformer2DModel:
    """4 joint blocks of width 128 on 8x8x1; the text widths of the sd3_tiny encoders."""
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=patch_size,
        in_channels=1,
        out_channels=1,
        num_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=48,
        caption_projection_dim=128,
        pooled_projection_dim=32,
        pos_embed_max_size=16 // patch_size,
    )


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """SD3's flow-matching schedule: 1,000 training timesteps, shift 3."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)


def copy_text_parts(source: str, out: str) -> None:
    """The six text parts of `source` (an SD3 pipeline folder), copied unchanged into `out`."""
    for part in TEXT_PARTS:
        shutil.copytree(os.path.join(source, part), os.path.join(out, part), dirs_exist_ok=True)


def make_pipeline(folder: str, transformer, scheduler) -> StableDiffusion3Pipeline:
    """StableDiffusion3Pipeline from `folder`'s text parts, without a VAE, encoders frozen."""
    parts = {
        name: cls.from_pretrained(os.path.join(folder, name)) for name, cls in TEXT_PARTS.items()
    }
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        parts[name].eval().requires_grad_(False)
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, **parts)


class PromptEncoder:
    """StableDiffusion3Pipeline.encode_prompt with max_sequence_length MAX_SEQUENCE_LENGTH."""

    def __init__(self, pipe: StableDiffusion3Pipeline):
        self.pipe = pipe

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompt_embeds [B, 77 + 16, 48] and pooled_prompt_embeds [B, 32] of `prompts`.

        encode_prompt's warning on T5's truncation (one line listing every prompt) is held back;
        `table` prints how many prompts T5 cuts.
        """
        pipeline_logger = logging.getLogger(StableDiffusion3Pipeline.__module__)
        level = pipeline_logger.level
        pipeline_logger.setLevel(logging.ERROR)
        try:
            embeds, _, pooled, _ = self.pipe.encode_prompt(
                prompt=prompts,
                prompt_2=None,
                prompt_3=None,
                do_classifier_free_guidance=False,
                max_sequence_length=MAX_SEQUENCE_LENGTH,
            )
        finally:
            pipeline_logger.setLevel(level)
        return embeds, pooled

    def table(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The encodings of many prompts, 512 at a time."""
        cut = sum(
            len(ids) > MAX_SEQUENCE_LENGTH for ids in self.pipe.tokenizer_3(prompts).input_ids
        )
        print(f"{len(prompts)} prompts, {cut} cut to T5's {MAX_SEQUENCE_LENGTH} tokens", flush=True)
        parts = [self(prompts[i : i + 512]) for i in range(0, len(prompts), 512)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def train(args, encode: PromptEncoder) -> tuple[SD3Transformer2DModel, SD3Transformer2DModel]:
    """diffusers' SD3 flow-matching recipe; returns (the trained transformer, its EMA)."""
    torch.manual_seed(args.seed)
    x_np, texts = train_data()
    distinct = sorted(set(texts))
    table, pooled_table = encode.table(distinct)
    row = {c: i for i, c in enumerate(distinct)}
    caption_rows = torch.tensor([row[c] for c in texts])
    null, null_pooled = (e[0] for e in encode([""]))
    x_all = torch.from_numpy(x_np)
    scheduler = make_scheduler()  # never set_timesteps: its timesteps/sigmas are training's
    model = make_transformer(args.patch_size).train()
    print(f"transformer: {sum(p.numel() for p in model.parameters()):,} parameters", flush=True)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    generator = torch.Generator().manual_seed(args.seed)
    start, losses = time.time(), []
    for step in range(1, args.steps + 1):
        index = torch.randint(0, len(x_all), (args.batch,), generator=generator)
        x = x_all[index]
        embeds = table[caption_rows[index]].clone()
        pooled = pooled_table[caption_rows[index]].clone()
        drop = torch.rand(args.batch, generator=generator) < args.p_uncond
        embeds[drop], pooled[drop] = null, null_pooled
        noise = torch.randn(x.shape, generator=generator)
        u = compute_density_for_timestep_sampling(
            weighting_scheme=args.weighting_scheme,
            batch_size=args.batch,
            logit_mean=0.0,
            logit_std=1.0,
            mode_scale=1.29,
            generator=generator,
        )
        indices = (u * scheduler.config.num_train_timesteps).long()
        timesteps = scheduler.timesteps[indices]
        sigmas = scheduler.sigmas[indices].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * x + sigmas * noise
        pred = model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if args.precondition_outputs:
            pred = pred * (-sigmas) + noisy
            target = x
        else:
            target = noise - x
        weighting = compute_loss_weighting_for_sd3(args.weighting_scheme, sigmas=sigmas)
        loss = torch.mean((weighting * (pred - target) ** 2).reshape(args.batch, -1), 1).mean()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / 200)
        optimizer.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), model.parameters(), strict=True):
                p_ema.mul_(args.ema).add_(p, alpha=1 - args.ema)
        losses.append(loss.item())
        if step % args.log_every == 0 or step == args.steps:
            mean = np.mean(losses[-args.log_every :])
            elapsed = time.time() - start
            print(
                f"step {step} loss {loss.item():.4f} mean of last {args.log_every} {mean:.4f} "
                f"({elapsed:.0f}s, {elapsed / step:.2f} s/step)",
                flush=True,
            )
    print(f"training took {time.time() - start:.0f}s", flush=True)
    return model, ema


@torch.no_grad()
def flow_sample(transformer, scheduler, noise, context, negative, w: float, steps: int):
    """StableDiffusion3Pipeline's denoising loop, guidance_scale s = 1 + w; returns NCHW latents.

    context = (prompt_embeds, pooled_prompt_embeds) of the prompts, negative = the same of the
    empty prompt (the pipeline's default negative prompt), one row per sample.
    """
    guidance_scale = 1.0 + w
    do_classifier_free_guidance = guidance_scale > 1
    prompt_embeds, pooled_prompt_embeds = context
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([negative[0], prompt_embeds], dim=0)
        pooled_prompt_embeds = torch.cat([negative[1], pooled_prompt_embeds], dim=0)
    latents = noise
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        timestep = t.expand(latent_model_input.shape[0])
        noise_pred = transformer(
            hidden_states=latent_model_input,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled_prompt_embeds,
            return_dict=False,
        )[0]
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


def eval_prompts(num: int) -> list[str]:
    """The evaluation's held-out prompts (distill_jax.run.prompts.evaluation_prompts)."""
    from distill_jax.run import prompts

    return list(prompts.evaluation_prompts(num)[0])


def check_pipeline(pipe, encode, noise, texts, steps: int, weights) -> float:
    """Largest |our loop - StableDiffusion3Pipeline(output_type='latent')| over `weights`."""
    worst = 0.0
    context, negative = encode(texts), encode([""] * len(texts))
    for w in weights:
        ours = flow_sample(pipe.transformer, pipe.scheduler, noise, context, negative, w, steps)
        theirs = pipe(
            prompt=texts,
            latents=noise.clone(),
            guidance_scale=1.0 + w,
            num_inference_steps=steps,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
            output_type="latent",
        ).images
        worst = max(worst, float((ours - theirs).abs().max()))
    return worst


def write_samples(transformer, encode: PromptEncoder, out: str, args) -> None:
    """diffusers' guided flow samples at each w, and a small golden set with its noise."""
    start_all = time.time()
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(out, "scheduler"))
    pipe = make_pipeline(out, transformer, scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(1234)
    noise = torch.randn((args.num, 1, 8, 8), generator=generator)
    texts = eval_prompts(args.num)
    worst = check_pipeline(pipe, encode, noise[:4], texts[:4], args.steps_sample, args.weights)
    print(f"loop vs StableDiffusion3Pipeline(output_type='latent'): max |diff| {worst:.3g}")
    context, null = encode.table(texts), encode([""])
    arrays = {"prompts": np.array(texts), "steps": np.int32(args.steps_sample)}

    def run(lo: int, hi: int, w: float, steps: int) -> np.ndarray:
        part = (context[0][lo:hi], context[1][lo:hi])
        negative = (null[0].expand(len(part[0]), -1, -1), null[1].expand(len(part[0]), -1))
        x = flow_sample(transformer, scheduler, noise[lo:hi], part, negative, w, steps)
        return x.numpy().transpose(0, 2, 3, 1)

    for w in args.weights:
        start = time.time()
        arrays[f"w={w:g}"] = np.concatenate(
            [run(i, i + 300, w, args.steps_sample) for i in range(0, args.num, 300)]
        )
        print(f"diffusers flow Euler w={w:g}: {args.num} samples in {time.time() - start:.1f}s")
    np.savez_compressed(os.path.join(out, "ddim_samples.npz"), **arrays)
    golden = dict(noise=noise[:12].numpy().transpose(0, 2, 3, 1), prompts=np.array(texts[:12]))
    for w in (0.0, 1.0, 4.0):
        golden[f"w={w:g}"] = run(0, 12, w, 16)
    np.savez(os.path.join(out, "ddim_golden.npz"), steps=np.int32(16), **golden)
    print(f"sampling took {time.time() - start_all:.0f}s", flush=True)


def main() -> None:
    """Train, save the pipeline folder, optionally sample."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/sd3_digits_teacher")
    parser.add_argument("--text_parts", default=SOURCE, help="SD3 folder with the text parts")
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--p_uncond", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--patch_size", type=int, choices=(1, 2), default=PATCH_SIZE)
    parser.add_argument(
        "--weighting_scheme",
        choices=("logit_normal", "sigma_sqrt", "mode", "cosmap"),
        default="logit_normal",
    )
    parser.add_argument("--precondition_outputs", type=int, choices=(0, 1), default=0)
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--samples", action="store_true")
    parser.add_argument("--num", type=int, default=300)
    parser.add_argument("--steps_sample", type=int, default=32)
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 4.0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    copy_text_parts(args.text_parts, args.out)
    scheduler = make_scheduler()
    pipe = make_pipeline(args.out, None, scheduler)
    encode = PromptEncoder(pipe)
    _, ema = train(args, encode)
    ema.save_pretrained(os.path.join(args.out, "transformer"), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(args.out, "scheduler"))
    pipe.register_modules(transformer=ema)
    pipe.save_config(args.out)  # model_index.json, "vae": [null, null]
    if args.samples:
        write_samples(ema, encode, args.out, args)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
