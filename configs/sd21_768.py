"""Distil Stable Diffusion 2.1 at 768x768 (the v-prediction model) on image-caption pairs.

Usage (the pipeline folder, e.g. stabilityai/stable-diffusion-2-1 saved with
StableDiffusionPipeline.save_pretrained, and the pairs are on disk; nothing is downloaded):

  distill-jax run --config=configs/sd21_768.py --workdir=/mnt/runs/sd21 \
      --teacher=diffusers:/mnt/models/stable-diffusion-2-1 \
      --config.data.data_dir=/mnt/data/laion768_shards

configs/sd15_laion.py's settings (Meng et al. 2022, Sec. 5: guidance w in [2, 14], batch 512,
stage one 3,000 updates, rounds of 2,000 and 20,000 for N = 4, 2, 1; n_start 256, AdamW 1e-4
annealed per round: our choices), at 768x768: the folder's VAE encodes the pairs into
96x96x4 latents, its OpenCLIP-H text encoder (a CLIPTextModel, 23 layers as diffusers ships it)
encodes the captions, and its U-Net (SD 2.x layout: linear projections, a head count per
level, upcast attention) predicts v, which the students keep (Meng et al. distil a
v-prediction teacher too). Not evaluated, as configs/sd15_laion.py says why.

':smoke' runs every stage on 32x32 mock pairs with a tiny SD 2.x-layout pipeline whose VAE
takes RGB (the tests assemble tests/data/diffusers/sd_tiny_v2 with sd_tiny's other parts).
"""

import pathlib
import runpy


def get_config(variant: str = ""):
    """The SD 2.1 768 distillation config; `variant` is '' or 'smoke'."""
    if variant not in ("", "smoke"):
        raise ValueError(
            f"configs/sd21_768.py variant {variant!r} is unknown: accepted '' or 'smoke'."
        )
    sd15 = runpy.run_path(str(pathlib.Path(__file__).with_name("sd15_laion.py")))
    c = sd15["get_config"](variant)
    if not variant:
        c.data.image_size = 768
    return c
