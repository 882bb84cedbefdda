"""Write the golden files that check distill_jax's AutoencoderKL reader against diffusers itself.

Needs PyTorch and diffusers (`pip install -e .[diffusers]`); CI never runs it, the tests
(tests/test_kl_vae.py) read what it wrote into tests/data/diffusers/:
- sd_tiny/vae/: a seeded random `AutoencoderKL` as `save_pretrained` writes it (config.json and
  diffusion_pytorch_model.safetensors, float32): Stable Diffusion's layout in miniature, two
  levels of (16, 32) channels in 8 groups, one resnet per encoder level, the mid-block
  attention, latent_channels 4, sample_size 32, scaling_factor 0.18215. The issue asked for
  (32, 64) channels in 32 groups, but those weights are 2.6 MB against the 1 MB budget of the
  golden files; 8 groups also checks that norm_num_groups is read rather than assumed 32.
  Every parameter is random, the GroupNorm scales and shifts too (torch starts them at 1, 0);
- sd_tiny_vae_golden.npz, all NHWC float32: `image` [2, 32, 32, 3] in [-1, 1]; diffusers'
  posterior `mean` and `logvar` (latent_dist.mean, .logvar: clamped to [-30, 20]) of it,
  [2, 16, 16, 4]; a fixed `latent` [2, 16, 16, 4] and `decoded`, vae.decode(latent).sample
  (post_quant_conv and decoder, no scaling factor applied);
- sd15_vae_manifest.json, sd21_vae_manifest.json: the vae/config.json values of Stable
  Diffusion 1.5 and 2.1 (`source` cites where) and every tensor name and shape of the
  AutoencoderKL they build in this diffusers version, on the meta device: no weights.

Run (from the repository root, in an environment with torch and diffusers):
    python scripts/golden_vae.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKL

_DOWN = ["DownEncoderBlock2D"] * 4
_UP = ["UpDecoderBlock2D"] * 4
# Stable Diffusion's KL-f8 autoencoder, shared by 1.5 and 2.1 but for sample_size. The
# published files may omit scaling_factor (written before diffusers had the key), in which
# case diffusers' default 0.18215 applies: the same value is written here explicitly.
_SD_VAE = dict(
    _class_name="AutoencoderKL",
    act_fn="silu",
    block_out_channels=[128, 256, 512, 512],
    down_block_types=_DOWN,
    up_block_types=_UP,
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
SD_VAES = {
    "sd15": dict(
        source=(
            "https://huggingface.co/runwayml/stable-diffusion-v1-5/blob/main/vae/config.json; "
            "values as mirrored by open-mmlab/mmagic "
            "configs/stable_diffusion/stable-diffusion_ddim_denoisingunet.py"
        ),
        config=dict(_SD_VAE, sample_size=512),
    ),
    "sd21": dict(
        source=(
            "https://huggingface.co/stabilityai/stable-diffusion-2-1/blob/main/vae/config.json; "
            "values as cited by LaurentMazare/diffusers-rs src/pipelines/stable_diffusion.rs "
            "(v2_1: 768x768)"
        ),
        config=dict(_SD_VAE, sample_size=768),
    ),
}
TINY = dict(
    block_out_channels=(16, 32),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=32,
    scaling_factor=0.18215,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random GroupNorm scales and shifts and random biases on top of torch's initialisation."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name and name.endswith("weight"):
                param.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)


def _nhwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(0, 2, 3, 1).contiguous().numpy().astype(np.float32)


def write_tiny(out: str) -> None:
    """sd_tiny/vae/ and its encode and decode outputs on fixed inputs."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY).eval()
    _randomise(vae, 1)
    vae.save_pretrained(os.path.join(out, "sd_tiny", "vae"), safe_serialization=True)
    rng = np.random.default_rng(0)
    image = rng.uniform(-1.0, 1.0, (2, 32, 32, 3)).astype(np.float32)
    latent = rng.standard_normal((2, 16, 16, 4)).astype(np.float32)
    with torch.no_grad():
        posterior = vae.encode(torch.from_numpy(image).permute(0, 3, 1, 2)).latent_dist
        decoded = vae.decode(torch.from_numpy(latent).permute(0, 3, 1, 2)).sample
    np.savez(
        os.path.join(out, "sd_tiny_vae_golden.npz"),
        image=image,
        mean=_nhwc(posterior.mean),
        logvar=_nhwc(posterior.logvar),
        latent=latent,
        decoded=_nhwc(decoded),
    )


def write_manifests(out: str) -> None:
    """SD 1.5's and 2.1's VAE tensor names and shapes, built on the meta device."""
    for name, entry in SD_VAES.items():
        kwargs = {k: v for k, v in entry["config"].items() if not k.startswith("_")}
        with torch.device("meta"):
            vae = AutoencoderKL(**kwargs)
        manifest = dict(
            entry,
            tensors={key: list(tensor.shape) for key, tensor in vae.state_dict().items()},
        )
        with open(os.path.join(out, f"{name}_vae_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)


def main() -> None:
    """Write every golden file into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    write_tiny(out)
    write_manifests(out)
    print(f"wrote the VAE golden files to {out}")


if __name__ == "__main__":
    main()
