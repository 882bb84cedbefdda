"""Golden files for distill_jax's reader of diffusers' UNet2DConditionModel (SD 1.x / 2.x).

Needs PyTorch and diffusers (`pip install -e .[diffusers]`); CI never runs it, the tests read
what it writes into tests/data/diffusers/:
- sd_tiny/unet/: a tiny random U-Net in the SD 1.x layout (1x1-conv projections, one head
  count (4) for every level, CrossAttnDownBlock2D then DownBlock2D), 4 latent channels at 16x16,
  cross_attention_dim 32: the U-Net of the tiny SD pipeline (its text encoder and VAE are
  written by scripts/golden_text.py and scripts/golden_vae.py);
- sd_tiny_v2_unet/: the SD 2.x layout (use_linear_projection, per-level head counts
  (`attention_head_dim` [2, 4, 4]), upcast_attention, two transformer layers on one level),
  three levels, 1 channel at 8x8, cross_attention_dim 24;
- sd_unet_golden.npz: each U-Net's output on fixed latents, timesteps and text states;
- sd15_unet_manifest.json, sd21_unet_manifest.json: every tensor name and shape of the SD 1.5
  and SD 2.1 U-Nets, built on the meta device from their published unet/config.json
  (stable-diffusion-v1-5/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1, values
  copied below): no weights.

Weights are diffusers' random initialisation with every bias and norm parameter made random
too, so a tensor mapped to the wrong place changes the output.

Run: python scripts/golden_unet.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from diffusers import UNet2DConditionModel

# stable-diffusion-v1-5 unet/config.json (diffusers 0.6 era; defaults for keys not listed).
SD15_UNET = dict(
    act_fn="silu",
    attention_head_dim=8,
    block_out_channels=[320, 640, 1280, 1280],
    center_input_sample=False,
    cross_attention_dim=768,
    down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    in_channels=4,
    layers_per_block=2,
    mid_block_scale_factor=1,
    norm_eps=1e-05,
    norm_num_groups=32,
    out_channels=4,
    sample_size=64,
    up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
)
# stabilityai/stable-diffusion-2-1 unet/config.json (the 768 v-prediction model).
SD21_UNET = dict(
    SD15_UNET,
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    num_class_embeds=None,
    only_cross_attention=False,
    resnet_time_scale_shift="default",
    sample_size=96,
    upcast_attention=True,
    use_linear_projection=True,
)
TINY_V1 = dict(
    block_out_channels=[16, 32],
    layers_per_block=2,
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=8,
)
TINY_V2 = dict(
    block_out_channels=[16, 32, 32],
    layers_per_block=1,
    sample_size=8,
    in_channels=1,
    out_channels=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=24,
    attention_head_dim=[2, 4, 4],
    transformer_layers_per_block=[1, 2, 1],
    use_linear_projection=True,
    upcast_attention=True,
    norm_num_groups=8,
)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every bias and norm parameter random too (diffusers starts them at 0 and 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.copy_(
                    0.1 * torch.randn(p.shape, generator=g)
                    + (1.0 if "norm" in name and name.endswith("weight") else 0.0)
                )


def manifest(config: dict) -> dict:
    """Every tensor name and shape of a U-Net of `config`, built on the meta device."""
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    return {
        "config": config,
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def golden(model: UNet2DConditionModel, seed: int, tokens: int) -> dict:
    """Fixed inputs and the U-Net's output on them, channels last."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    z = torch.randn(3, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    context = torch.randn(3, tokens, cfg.cross_attention_dim, generator=g)
    timesteps = torch.tensor([0.0, 417.0, 999.0])
    with torch.no_grad():
        out = model(z, timesteps, encoder_hidden_states=context).sample
    return {
        "z": z.permute(0, 2, 3, 1).numpy(),
        "timesteps": timesteps.numpy(),
        "context": context.numpy(),
        "out": out.permute(0, 2, 3, 1).numpy(),
    }


def main() -> None:
    """Write the tiny U-Nets, their outputs and the real U-Nets' manifests."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    arrays = {}
    for name, config, folder, seed, tokens in (
        ("v1", TINY_V1, "sd_tiny/unet", 0, 77),
        ("v2", TINY_V2, "sd_tiny_v2_unet", 1, 5),
    ):
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**config).eval()
        randomise(model, seed)
        model.save_pretrained(os.path.join(out, folder))
        arrays.update({f"{name}_{k}": v for k, v in golden(model, seed, tokens).items()})
    np.savez_compressed(os.path.join(out, "sd_unet_golden.npz"), **arrays)
    for name, config in (("sd15", SD15_UNET), ("sd21", SD21_UNET)):
        with open(os.path.join(out, f"{name}_unet_manifest.json"), "w") as f:
            json.dump(manifest(config), f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
