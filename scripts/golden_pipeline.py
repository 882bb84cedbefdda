"""Golden samples of diffusers' own StableDiffusionPipeline on the tiny random SD pipeline.

Needs PyTorch, diffusers and transformers (`pip install -e .[diffusers]`); CI never runs it.
It completes tests/data/diffusers/sd_tiny/, whose unet/, text_encoder/ + tokenizer/ and vae/
scripts/golden_unet.py, scripts/golden_text.py and scripts/golden_vae.py write (run those
first), with
- scheduler/: a DDIMScheduler with Stable Diffusion 1.5's scheduler_config.json values
  (scaled_linear betas 0.00085 to 0.012, epsilon, steps_offset 1, leading spacing,
  set_alpha_to_one false, no clipping);
- model_index.json: what StableDiffusionPipeline.save_pretrained writes (no safety checker);
and writes
- sd_digits_tiny/: a tiny random pixel-space pipeline for 8x8x1 captioned digits (the smoke
  teacher of configs/sd_digits.py): a U-Net of 16 and 32 channels cross-attending to the tiny
  BERT of bert_tiny/ (scripts/golden_text.py; its text_encoder/ and tokenizer/ are copied),
  DDIMScheduler with scaled_linear betas and v-prediction, no vae/;
- sd_latent_tiny/: the same for a latent run on 8x8x1 captioned digits: a gray-scale
  AutoencoderKL (downsampling 2, 4 latent channels, scaling_factor 0.18215) in vae/, a U-Net
  on its 4x4x4 latents, epsilon prediction (SD 1.x's scheduler), the tiny BERT; and
  tests/data/diffusers/sd_latent_golden.npz: StableDiffusionPipeline.from_pretrained(that
  folder) called with fixed latents on three prompts (one empty) at guidance_scale 3 (the
  decoded images, output_type 'np');
- sd_tiny_v2/: unet/ in SD 2.x's layout (linear projections, a head count per level,
  upcast attention) and scheduler/ with v-prediction (SD 2.1 768's), for sd_tiny's latents and
  text encoder (the smoke teacher of configs/sd21_768.py; the tests link sd_tiny's other parts);
- tests/data/diffusers/sd_pipeline_golden.npz: StableDiffusionPipeline called with
fixed latents on three prompts (one empty), once with guidance_scale 3 and once with
guidance_scale 5 and negative prompts: every step's latents (callback_on_step_end), the final
latents and the decoded images (output_type 'np': in [0, 1], channels last).

Run: python scripts/golden_pipeline.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

# stable-diffusion-v1-5 scheduler/scheduler_config.json (a PNDMScheduler there; the same
# training schedule drives this DDIMScheduler).
SD15_SCHEDULE = dict(
    beta_end=0.012,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    clip_sample=False,
    num_train_timesteps=1000,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
PROMPTS = ["a photo of a cat", "a thick, right-leaning seven", ""]
NEGATIVE = ["blurry", "", "a dog"]
STEPS = 6
LATENT_PROMPTS = ["the digit three", "a thin, slanted seven", ""]


def load(folder: str) -> StableDiffusionPipeline:
    """The tiny pipeline from its parts, scheduler written first."""
    DDIMScheduler(**SD15_SCHEDULE).save_pretrained(os.path.join(folder, "scheduler"))
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(os.path.join(folder, "vae")),
        text_encoder=CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        unet=UNet2DConditionModel.from_pretrained(os.path.join(folder, "unet")),
        scheduler=DDIMScheduler.from_pretrained(os.path.join(folder, "scheduler")),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_config(folder)  # model_index.json
    pipe.set_progress_bar_config(disable=True)
    return pipe


def write_pixel_pipeline(out: str) -> None:
    """sd_digits_tiny/: unet/, scheduler/, text_encoder/ + tokenizer/ (bert_tiny's), index."""
    folder = os.path.join(out, "sd_digits_tiny")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(out, "bert_tiny", part), os.path.join(folder, part),
                        dirs_exist_ok=True)  # fmt: skip
    torch.manual_seed(3)
    UNet2DConditionModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).save_pretrained(os.path.join(folder, "unet"))
    DDIMScheduler(**dict(SD15_SCHEDULE, prediction_type="v_prediction")).save_pretrained(
        os.path.join(folder, "scheduler")
    )
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)


def write_latent_pipeline(out: str) -> None:
    """sd_latent_tiny/: vae/ (1 channel in and out), unet/ on its latents, scheduler/, text."""
    folder = os.path.join(out, "sd_latent_tiny")
    for part in ("text_encoder", "tokenizer"):
        shutil.copytree(os.path.join(out, "bert_tiny", part), os.path.join(folder, part),
                        dirs_exist_ok=True)  # fmt: skip
    torch.manual_seed(5)
    AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(os.path.join(folder, "vae"))
    UNet2DConditionModel(
        sample_size=4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=2,
        cross_attention_dim=32,
        norm_num_groups=8,
    ).save_pretrained(os.path.join(folder, "unet"))
    DDIMScheduler(**SD15_SCHEDULE).save_pretrained(os.path.join(folder, "scheduler"))
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "BertModel"],
        "tokenizer": ["transformers", "BertTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    pipe = StableDiffusionPipeline.from_pretrained(
        folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(len(LATENT_PROMPTS), 4, 4, 4, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        images = pipe(
            LATENT_PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=3.0,
            latents=latents.clone(),
            output_type="np",
        ).images
    np.savez_compressed(
        os.path.join(out, "sd_latent_golden.npz"),
        latents=latents.permute(0, 2, 3, 1).numpy(),
        prompts=np.array(LATENT_PROMPTS),
        images=np.asarray(images, np.float32),
        guidance_scale=np.float32(3.0),
        steps=np.int32(STEPS),
    )


def write_v2_pipeline(out: str) -> None:
    """sd_tiny_v2/: an SD 2.x-layout unet/ and a v-prediction scheduler/ for sd_tiny's parts.

    The tests link sd_tiny's vae/, text_encoder/ and tokenizer/ beside them.
    """
    folder = os.path.join(out, "sd_tiny_v2")
    torch.manual_seed(11)
    UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=32,
        norm_num_groups=8,
        use_linear_projection=True,
        upcast_attention=True,
    ).save_pretrained(os.path.join(folder, "unet"))
    DDIMScheduler(**dict(SD15_SCHEDULE, prediction_type="v_prediction")).save_pretrained(
        os.path.join(folder, "scheduler")
    )
    shutil.copy(os.path.join(out, "sd_tiny", "model_index.json"), folder)


def sample(pipe, latents, guidance_scale: float, negative) -> dict:
    """Every step's latents, the final latents and the decoded images of one pipeline call."""
    states = []

    def keep(pipeline, step, timestep, kwargs):
        states.append(kwargs["latents"].clone())
        return kwargs

    with torch.no_grad():
        images = pipe(
            PROMPTS,
            negative_prompt=negative,
            num_inference_steps=STEPS,
            guidance_scale=guidance_scale,
            latents=latents.clone(),
            output_type="np",
            callback_on_step_end=keep,
        ).images
    return {
        "states": torch.stack(states).permute(0, 1, 3, 4, 2).numpy(),
        "images": np.asarray(images, np.float32),
    }


def main() -> None:
    """Write the scheduler, model_index.json and the golden samples."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    write_pixel_pipeline(out)
    write_latent_pipeline(out)
    pipe = load(os.path.join(out, "sd_tiny"))
    write_v2_pipeline(out)
    size = pipe.unet.config.sample_size
    latents = torch.randn(len(PROMPTS), 4, size, size, generator=torch.Generator().manual_seed(7))
    arrays = {"latents": latents.permute(0, 2, 3, 1).numpy(), "steps": np.int32(STEPS)}
    pipe.scheduler.set_timesteps(STEPS)
    arrays["timesteps"] = pipe.scheduler.timesteps.numpy()
    for name, scale, negative in (("plain", 3.0, None), ("negative", 5.0, NEGATIVE)):
        arrays.update({f"{name}_{k}": v for k, v in sample(pipe, latents, scale, negative).items()})
        arrays[f"{name}_guidance_scale"] = np.float32(scale)
    np.savez_compressed(os.path.join(out, "sd_pipeline_golden.npz"), **arrays)
    print("wrote", out)


if __name__ == "__main__":
    main()
