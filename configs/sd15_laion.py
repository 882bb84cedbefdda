"""Distil Stable Diffusion 1.5 (or a fine-tune) at 512x512 on LAION image-caption pairs.

Usage (nothing here downloads weights or data: the pipeline folder, e.g.
stable-diffusion-v1-5/stable-diffusion-v1-5 saved with StableDiffusionPipeline.save_pretrained,
and the pairs, e.g. a LAION subset that img2dataset wrote as webdataset shards, are on disk):

  distill-jax run --config=configs/sd15_laion.py --workdir=/mnt/runs/sd15 \
      --teacher=diffusers:/mnt/models/stable-diffusion-v1-5 \
      --config.data.data_dir=/mnt/data/laion512_shards

The network (UNet2DConditionModel, its discrete schedule and epsilon prediction), the CLIP
text encoder and the VAE come from the folder: the VAE becomes the run's autoencoder stage and
encodes the pairs once into 64x64x4 latents at its scaling_factor 0.18215, and the CLIP encoder
encodes every caption (77 tokens). data.data_dir holds image-caption pairs
(distill_jax/data/image_captions.py: webdataset shards, a metadata.jsonl, or caption files).

Settings and their sources (Meng et al. 2022, Sec. 5, text-guided generation on LAION-5B):
- 512x512 images; guidance w in [2, 14];
- batch 512; stage one 3,000 updates; stage two 2,000 updates per halving round and 20,000
  for the last three (N = 4, 2, 1);
- n_start 256 (our choice: Meng et al. do not give their LAION teacher's step count; as
  configs/dit_xl2_imagenet256.py, a power of two far above diffusers' 50-step default);
- AdamW 1e-4, linearly annealed per round, no EMA (our choice, as for DiT-XL/2);
- bfloat16 compute, float32 weights and optimiser state.
Not evaluated: the pairs have no class labels, and the paper's FID and CLIP score on COCO
captions need Inception and CLIP weights that distill_jax does not bundle; `run` says so and
stops after distillation, and `sample --prompt` and `export` work on the workdir.

SD 1.5 predicts epsilon, so the run first fine-tunes it to v-prediction (config.finetune,
'auto' for an epsilon teacher; docs/teachers.md measures this route against the others) on the
run's own pairs, as Meng et al. do for their LAION teacher, and distils the fine-tuned model.
Its length is our choice: 10,000 updates at batch 512 and AdamW 1e-4 (Stability resumed SD 2's
768-v model from the epsilon 512 model with 150,000 v-objective updates, but that also moved it
to 768x768; Meng et al. do not give theirs). That is 14% of the distillation's 73,000 updates
(stage one 3,000, rounds 5 x 2,000 + 3 x 20,000); a fine-tune update is one forward and
backward pass and a distillation update adds two teacher forward passes, so about 8% of the
run's network compute.

':smoke' runs every stage in about a minute on 32x32 mock pairs (from
`image_captions.write_mock_pairs`) with any tiny SD-layout pipeline whose VAE takes RGB:
tests/test_sd_laion.py imports tests/data/diffusers/sd_tiny with it and samples, and runs
every stage of configs/sd21_768.py's smoke, whose stages are these.
"""

from distill_jax.config import base_config, optimizer_config


def get_config(variant: str = ""):
    """The SD 1.5 LAION distillation config; `variant` is '' or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/sd15_laion.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    c = base_config()
    c.data.name = "image_captions"
    c.data.image_size = 512
    c.data.eval_split = "validation"
    c.text.enabled = True
    c.model.kind = "sd_unet"  # replaced by the imported teacher's keys
    c.model.from_import = True  # commands without --teacher=diffusers:DIR are refused
    c.model.dtype = "bfloat16"  # compute dtype; weights and optimiser state stay float32
    c.guidance.w_min, c.guidance.w_max = 2.0, 14.0
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
    if variant == "smoke":
        c.data.image_size = 32
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
    return c
