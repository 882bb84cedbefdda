"""Distil Stable Diffusion 3.5 Medium (or SD3-medium, or a fine-tune) on image-caption pairs.

Usage (nothing here downloads weights or data: the pipeline folder, e.g.
stabilityai/stable-diffusion-3.5-medium saved with StableDiffusion3Pipeline.save_pretrained,
and the pairs, e.g. a LAION subset that img2dataset wrote as webdataset shards, are on disk):

  distill-jax plan --config=configs/sd35_medium.py --teacher=diffusers:/mnt/models/sd35m \
      --topology=v5p-64
  distill-jax run --config=configs/sd35_medium.py --workdir=/mnt/runs/sd35m \
      --teacher=diffusers:/mnt/models/stable-diffusion-3.5-medium \
      --config.data.data_dir=/mnt/data/laion1024_shards

The published folder's layout (stabilityai/stable-diffusion-3.5-medium; SD3-medium's is the
same without SD3.5's qk RMSNorm and dual-attention blocks):
- transformer/: SD3Transformer2DModel, 24 blocks of width 1536 (24 heads of 64), patch 2,
  joint_attention_dim 4096, pooled_projection_dim 2048, qk_norm 'rms_norm', dual attention in
  blocks 0-12, sample_size 128 (1024x1024 images), pos_embed_max_size 384;
- text_encoder/, text_encoder_2/: CLIP-L/14 and OpenCLIP bigG/14 with projection (pooled 768 +
  1280), 77 tokens; text_encoder_3/: T5-v1.1-XXL (d_model 4096), its weights sharded;
- vae/: AutoencoderKL with 16 latent channels, shift_factor 0.0609, scaling_factor 1.5305,
  no quant convs: 128x128x16 latents at 1024x1024;
- scheduler/: FlowMatchEulerDiscreteScheduler, 1,000 training steps, shift 3.0.
The import reads every part (docs/teachers.md); the VAE becomes the run's autoencoder stage
and encodes the pairs once, the three text encoders encode every caption as encode_prompt does
(77 CLIP tokens, then text.max_sequence_length = 256 T5 tokens, then the pooled row).

Settings and their sources (Meng et al. 2022, Sec. 5, text-guided latent generation on
LAION-5B, the settings this config keeps):
- guidance w in [2, 14] (StableDiffusion3Pipeline's default guidance_scale 7 is w = 6);
- batch 512; stage one 3,000 updates; stage two 2,000 updates per halving round and 20,000
  for the last three (N = 4, 2, 1);
- AdamW 1e-4, linearly annealed per round, no EMA (our choice, as for SD 1.5);
- bfloat16 compute, float32 weights and optimiser state.
Our choices where the paper has no flow teacher:
- 1024x1024 images, SD3.5 Medium's native size (the paper's LAION model was 512x512);
- n_start 32: SD3.5 Medium's model card samples at 40 steps (SD3-medium's at 28) of its shifted
  Euler sampler, which is DDIM here (diffusion/flow.py); 32 is the power of two nearest;
- no fine-tune: a velocity teacher's x-hat error is the velocity's times s <= 1, nothing is
  amplified near noise (docs/teachers.md), so the students keep the 'flow' parameterisation;
- diffusion.logsnr_min -33: the flow's noise end (s = 1) is in the trained range, and this
  reaches it (the cosine schedule's -20 stops at s = 0.99995).
Not evaluated: the pairs have no class labels, as configs/sd15_laion.py says.

':smoke' runs every stage in about a minute on 16x16 mock pairs with any tiny SD3 pipeline
whose VAE takes RGB and halves the side (tests/test_sd3_cli.py: tests/data/diffusers/sd3_tiny).
"""

import pathlib
import runpy


def get_config(variant: str = ""):
    """The SD3.5-medium distillation config; `variant` is '' or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/sd35_medium.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    # Meng et al.'s LAION settings (guidance range, batches, updates, optimiser, dtype) and
    # their smoke sizes are configs/sd15_laion.py's; what differs for SD3.5 Medium follows.
    sd15 = runpy.run_path(str(pathlib.Path(__file__).with_name("sd15_laion.py")))
    c = sd15["get_config"](variant)
    c.data.image_size = 16 if variant else 1024
    c.text.max_sequence_length = 16 if variant else 256
    c.model.kind = "mmdit"  # replaced by the imported teacher's keys
    c.diffusion.logsnr_min = -33.0
    c.finetune.to = ""  # a velocity teacher is not fine-tuned (see above)
    c.stage2.n_start = 2 if variant else 32
    return c
