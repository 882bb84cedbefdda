"""Golden files for distill_jax's reader of diffusers' SD3Transformer2DModel (SD3 / SD3.5 MMDiT).

Needs PyTorch and diffusers (`pip install -e .[diffusers]`); CI never runs it, the tests
(tests/test_sd3_transformer.py) read what it writes into tests/data/diffusers/:
- sd3_tiny/transformer/: a tiny random SD3 transformer (qk_norm None, no dual attention):
  4 latent channels at 8x8, patch 2, 2 blocks of 2 heads x 16, text states 48 wide projected
  to 32, pooled 32, a 16x16 positional table;
- sd35_tiny_transformer/: the same sizes in the SD3.5 layout: qk_norm 'rms_norm', 3 blocks,
  block 0 with SD3.5's second attention (dual_attention_layers [0]);
- sd3_transformer_golden.npz: for each (prefix `sd3_`, `sd35_`), fixed inputs as diffusers takes
  them (latents NCHW, timesteps in diffusers' units, encoder_hidden_states, pooled) and its
  output (NCHW);
- sd3_medium_transformer_manifest.json, sd35_medium_transformer_manifest.json: every tensor
  name and shape of the published SD3-medium and SD3.5-medium transformers, built on the meta
  device from their transformer/config.json (values copied below): no weights.

Weights are diffusers' random initialisation with every bias and norm weight made random too
(diffusers starts them at 0 and 1), so a tensor mapped to the wrong place changes the output.

Run: python scripts/golden_sd3.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from diffusers import SD3Transformer2DModel

# stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json.
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=192,
)
# stabilityai/stable-diffusion-3.5-medium transformer/config.json: QK RMS norms, and the first
# 13 blocks with the second attention (MMDiT-X).
SD35_MEDIUM = dict(
    SD3_MEDIUM,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=list(range(13)),
)
TINY_SD3 = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=48,
    caption_projection_dim=32,
    pooled_projection_dim=32,
    out_channels=4,
    pos_embed_max_size=16,
)
TINY_SD35 = dict(TINY_SD3, num_layers=3, qk_norm="rms_norm", dual_attention_layers=[0])
TIMESTEPS = [999.0, 500.5, 3.0]
TEXT_TOKENS = 10


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every bias and every norm weight (the 1-D weights: RMSNorm's) random too."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))


def manifest(config: dict) -> dict:
    """Every tensor name and shape of a transformer of `config`, built on the meta device."""
    with torch.device("meta"):
        model = SD3Transformer2DModel(**config)
    return {
        "config": {"_class_name": SD3Transformer2DModel.__name__, **config},
        "tensors": {k: list(v.shape) for k, v in model.state_dict().items()},
    }


def golden(model: SD3Transformer2DModel, seed: int) -> dict:
    """Fixed inputs and the transformer's output on them, in diffusers' layout (NCHW)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    batch = len(TIMESTEPS)
    latents = torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    states = torch.randn(batch, TEXT_TOKENS, cfg.joint_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.pooled_projection_dim, generator=g)
    timesteps = torch.tensor(TIMESTEPS)
    with torch.no_grad():
        out = model(
            hidden_states=latents,
            encoder_hidden_states=states,
            pooled_projections=pooled,
            timestep=timesteps,
        ).sample
    return {
        "latents": latents.numpy(),
        "timesteps": timesteps.numpy(),
        "encoder_hidden_states": states.numpy(),
        "pooled": pooled.numpy(),
        "out": out.numpy(),
    }


def main() -> None:
    """Write the tiny transformers, their outputs and the published ones' manifests."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    arrays = {}
    for name, config, folder, seed in (
        ("sd3", TINY_SD3, "sd3_tiny/transformer", 0),
        ("sd35", TINY_SD35, "sd35_tiny_transformer", 1),
    ):
        torch.manual_seed(seed)
        model = SD3Transformer2DModel(**config).eval()
        randomise(model, seed)
        model.save_pretrained(os.path.join(out, folder))
        arrays.update({f"{name}_{k}": v for k, v in golden(model, seed).items()})
    np.savez_compressed(os.path.join(out, "sd3_transformer_golden.npz"), **arrays)
    for name, config in (("sd3_medium", SD3_MEDIUM), ("sd35_medium", SD35_MEDIUM)):
        with open(os.path.join(out, f"{name}_transformer_manifest.json"), "w") as f:
            json.dump(manifest(config), f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
