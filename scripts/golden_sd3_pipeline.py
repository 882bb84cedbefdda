"""Golden samples of diffusers' own StableDiffusion3Pipeline on the tiny random SD3 pipeline.

Needs PyTorch, diffusers and transformers (`pip install -e .[diffusers]`); CI never runs it.
It completes tests/data/diffusers/sd3_tiny/, whose transformer/ (scripts/golden_sd3.py) and
text parts (scripts/golden_sd3_text.py) exist, with
- scheduler/: FlowMatchEulerDiscreteScheduler with SD3-medium's scheduler_config.json values
  (1,000 training steps, shift 3.0);
- vae/: sd_tiny's AutoencoderKL (scripts/golden_vae.py) with SD3's latent convention
  (shift_factor 0.0609, scaling_factor 1.5305);
- model_index.json: what StableDiffusion3Pipeline.save_pretrained writes;
and writes
- tests/data/diffusers/sd35_medium_configs/: the JSON files alone (no weights, no vocabularies)
  of stabilityai/stable-diffusion-3.5-medium's pipeline folder, values copied below: what
  `distill-jax plan --teacher=diffusers:DIR` reads to plan the real model;
- tests/data/diffusers/sd3_pipeline_golden.npz: StableDiffusion3Pipeline called with
fixed latents on three prompts (one empty), max_sequence_length 16, once with guidance_scale 3
and once with guidance_scale 5 and negative prompts: every step's latents
(callback_on_step_end), and the decoded images (output_type 'np': in [0, 1], channels last).

Run: python scripts/golden_sd3_pipeline.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

PROMPTS = ["a photo of a cat", "a thick, right-leaning seven", ""]
NEGATIVE = ["blurry", "", "a dog"]
STEPS = 6
T5_TOKENS = 16
# stabilityai/stable-diffusion-3-medium-diffusers scheduler/scheduler_config.json and the
# latent convention of its vae/config.json.
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)
SD3_LATENTS = dict(shift_factor=0.0609, scaling_factor=1.5305)


# stabilityai/stable-diffusion-3.5-medium: each part's config.json (the keys distill_jax reads;
# transformers and diffusers defaults for the rest).
CLIP_L = dict(
    architectures=["CLIPTextModelWithProjection"],
    model_type="clip_text_model",
    hidden_size=768,
    intermediate_size=3072,
    num_attention_heads=12,
    num_hidden_layers=12,
    projection_dim=768,
    hidden_act="quick_gelu",
    max_position_embeddings=77,
    vocab_size=49408,
    layer_norm_eps=1e-5,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_G = dict(
    CLIP_L,
    hidden_size=1280,
    intermediate_size=5120,
    num_attention_heads=20,
    num_hidden_layers=32,
    projection_dim=1280,
    hidden_act="gelu",
)
T5_XXL = dict(
    architectures=["T5EncoderModel"],
    model_type="t5",
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_heads=64,
    num_layers=24,
    feed_forward_proj="gated-gelu",
    vocab_size=32128,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    layer_norm_epsilon=1e-6,
    is_encoder_decoder=True,
)
SD3_VAE = dict(
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    in_channels=3,
    out_channels=3,
    latent_channels=16,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=1024,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    **SD3_LATENTS,
)


def write_sd35_medium_configs(out: str) -> None:
    """sd35_medium_configs/: the published folder's JSON files, no weights."""
    folder = os.path.join(out, "sd35_medium_configs")
    with open(os.path.join(out, "sd35_medium_transformer_manifest.json")) as f:
        transformer = dict(json.load(f)["config"], _class_name="SD3Transformer2DModel")
    files = {
        "transformer/config.json": transformer,
        "scheduler/scheduler_config.json": dict(
            _class_name="FlowMatchEulerDiscreteScheduler", **SD3_SCHEDULER
        ),
        "vae/config.json": SD3_VAE,
        "text_encoder/config.json": CLIP_L,
        "text_encoder_2/config.json": CLIP_G,
        "text_encoder_3/config.json": T5_XXL,
        "tokenizer/tokenizer_config.json": dict(model_max_length=77),
        "tokenizer_2/tokenizer_config.json": dict(model_max_length=77, pad_token="!"),
        "tokenizer_3/tokenizer_config.json": dict(model_max_length=512),
    }
    for name, content in files.items():
        os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=2, sort_keys=True)


def write_parts(out: str) -> str:
    """scheduler/, vae/ and model_index.json of sd3_tiny/; its folder."""
    folder = os.path.join(out, "sd3_tiny")
    FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).save_pretrained(
        os.path.join(folder, "scheduler")
    )
    vae = os.path.join(folder, "vae")
    shutil.rmtree(vae, ignore_errors=True)
    shutil.copytree(os.path.join(out, "sd_tiny", "vae"), vae)
    with open(os.path.join(vae, "config.json")) as f:
        config = json.load(f)
    config.update(SD3_LATENTS)
    with open(os.path.join(vae, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    parts = dict(
        transformer=SD3Transformer2DModel.from_pretrained(os.path.join(folder, "transformer")),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(
            os.path.join(folder, "scheduler")
        ),
        vae=AutoencoderKL.from_pretrained(vae),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(
            os.path.join(folder, "text_encoder")
        ),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(
            os.path.join(folder, "text_encoder_2")
        ),
        text_encoder_3=T5EncoderModel.from_pretrained(os.path.join(folder, "text_encoder_3")),
        tokenizer=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer")),
        tokenizer_2=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_2")),
        tokenizer_3=AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer_3")),
    )
    StableDiffusion3Pipeline(**parts).save_config(folder)  # model_index.json
    return folder


def sample(pipe, latents, guidance_scale: float, negative) -> dict:
    """Every step's latents and the decoded images of one pipeline call."""
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
            max_sequence_length=T5_TOKENS,
            output_type="np",
            callback_on_step_end=keep,
        ).images
    return {
        "states": torch.stack(states).permute(0, 1, 3, 4, 2).numpy(),
        "images": np.asarray(images, np.float32),
    }


def main() -> None:
    """Write the scheduler, the VAE, model_index.json and the golden samples."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    write_sd35_medium_configs(out)
    folder = write_parts(out)
    pipe = StableDiffusion3Pipeline.from_pretrained(folder)
    size = pipe.transformer.config.sample_size
    latents = torch.randn(len(PROMPTS), 4, size, size, generator=torch.Generator().manual_seed(7))
    arrays = {
        "latents": latents.permute(0, 2, 3, 1).numpy(),
        "steps": np.int32(STEPS),
        "t5_tokens": np.int32(T5_TOKENS),
    }
    pipe.scheduler.set_timesteps(STEPS)
    arrays["sigmas"] = pipe.scheduler.sigmas.numpy()
    for name, scale, negative in (("plain", 3.0, None), ("negative", 5.0, NEGATIVE)):
        arrays.update({f"{name}_{k}": v for k, v in sample(pipe, latents, scale, negative).items()})
        arrays[f"{name}_guidance_scale"] = np.float32(scale)
    np.savez_compressed(os.path.join(out, "sd3_pipeline_golden.npz"), **arrays)
    print("wrote", out)


if __name__ == "__main__":
    main()
