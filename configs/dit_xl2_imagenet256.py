"""Distil DiT-XL/2 at 256x256 (Peebles and Xie 2023), the diffusers release facebook/DiT-XL-2-256.

The published pipeline folder (give it as --teacher=diffusers:DIR, after downloading it
yourself: nothing here downloads weights):
  model_index.json      DiTPipeline
  transformer/          Transformer2DModel (the older layout): config.json (16 heads of 72,
                        28 layers, patch 2, sample_size 32, in 4 / out 8 channels: learned
                        variance, num_embeds_ada_norm 1000) and its safetensors
                        (tests/data/diffusers/dit_xl2_manifest.json lists every tensor)
  vae/                  AutoencoderKL (sd-vae-ft-ema; latents 32x32x4, scaling factor 0.18215)
  scheduler/            discrete DDPM betas, linear 1e-4 .. 0.02, 1000 steps, epsilon

The VAE becomes the run's autoencoder stage on import (distill_jax/interop/vae.py, checked
against diffusers): the train split is encoded once into its latents, cached in
WORKDIR/autoencoder, at its scaling_factor 0.18215; samples are decoded by it. A pixel-space
DiT (a folder without vae/) is distilled by this config at its own image size.

Settings and their sources:
- data: TFDS imagenet2012 (1000 classes; the null class is label 1000, DiTPipeline's);
  256x256 images into the VAE's 32x32x4 latents (DiT paper Sec. 3);
- guidance w in [0, 14]: Meng et al. 2022 Sec. 5, latent class-conditional ImageNet;
- teacher: imported (DiT paper: 7M steps at batch 256, AdamW 1e-4, EMA 0.9999);
- stage one 3,000 updates, halving rounds 2,000 updates and 20,000 for N = 4, 2, 1, batch
  512: Meng et al.'s latent settings (as configs/imagenet256_latent.py);
- n_start 256: the DiT paper samples with 250 DDPM steps; 256 is the nearest power of two;
- stage one and the rounds use the DiT paper's AdamW learning rate 1e-4 (our choice for
  distillation), linearly annealed per round (diffusion_distillation), no EMA.
- DiT-XL/2 predicts epsilon (with learned variance), so the run first fine-tunes it to
  v-prediction on the run's ImageNet (config.finetune, 'auto' for an epsilon teacher;
  docs/teachers.md measures this route against the others): 10,000 updates at batch 512 and
  the DiT paper's AdamW 1e-4 (our choice of length; Meng et al. fine-tune their LDM teacher to
  v without giving the count). That is 14% of the distillation's 73,000 updates and about 8%
  of its network compute (a fine-tune update has no teacher calls); DiT-XL/2 itself trained
  for 7M updates at batch 256.
Pod launch: docs/multihost.md.

':smoke' runs on mock data (tfds.testing.mock_data) at 8x8 pixels with a tiny random latent
DiT in diffusers layout with 1000 classes, learned variance and a vae/ giving 4x4x4 latents
(tests/data/diffusers/dit_tiny_imagenet).
"""

from distill_jax.config import base_config, optimizer_config


def get_config(variant: str = ""):
    """The DiT-XL/2 ImageNet-256 distillation config; `variant` is '' or 'smoke'."""
    c = base_config()
    c.data.name = "imagenet2012"
    c.data.image_size = 256
    c.data.eval_split = "validation"
    c.model.kind = "dit"  # replaced by the imported teacher's keys
    c.model.from_import = True  # commands without --teacher=diffusers:DIR are refused
    c.model.dtype = "bfloat16"  # compute dtype; weights and optimiser state stay float32
    c.guidance.w_min, c.guidance.w_max = 0.0, 14.0
    c.finetune.batch_size = 512
    c.finetune.num_steps = 10_000
    c.finetune.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=500, decay="constant", ema_decay=0.999
    )
    c.stage1.batch_size = 512
    c.stage1.num_steps = 3000
    c.stage1.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", ema_decay=0.0
    )
    c.stage2.batch_size = 512
    c.stage2.n_start = 256
    c.stage2.n_end = 1
    c.stage2.steps_per_round = 2000
    c.stage2.final_rounds = 3  # N = 4, 2, 1
    c.stage2.final_steps_per_round = 20_000
    c.stage2.optimizer = optimizer_config(
        learning_rate=1e-4, warmup_steps=0, decay="linear", ema_decay=0.0
    )
    c.train.log_every = 100
    c.train.checkpoint_every = 1000
    c.eval.num_samples = 50_000  # FID-50k
    c.eval.guidance_weights = (0.0, 0.5, 1.0, 2.0, 4.0, 14.0)  # 0.5: DiT's cfg scale 1.5
    if variant == "smoke":
        c.data.image_size = 8
        c.model.dtype = "float32"
        for stage in (c.finetune, c.stage1, c.stage2):
            stage.batch_size = 8
        c.finetune.num_steps = 2
        c.stage1.num_steps = 2
        c.stage2.n_start = 2
        c.stage2.steps_per_round = 2
        c.stage2.final_rounds = 1
        c.stage2.final_steps_per_round = 2
        c.train.log_every = 2
        c.train.checkpoint_every = 2
        c.eval.num_samples = 16
    elif variant:
        raise ValueError(
            f"configs/dit_xl2_imagenet256.py variant {variant!r} is unknown: accepted '', 'smoke'."
        )
    return c
