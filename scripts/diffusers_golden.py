"""Write the golden files that check distill_jax's diffusers reader against diffusers itself.

Needs PyTorch and diffusers (`pip install -e .[diffusers]`); CI never runs it, the tests read
what it wrote into tests/data/diffusers/:
- dit_tiny/: a tiny random DiT pipeline folder in the current layout (DiTTransformer2DModel,
  learned variance, linear betas, epsilon, DDIMScheduler), and dit_tiny_legacy/: the older
  Transformer2DModel layout (no learned variance, no attention biases, scaled_linear betas,
  v_prediction), and dit_tiny_imagenet/ (1000 classes, learned variance, on the 4x4x4
  latents of its vae/, a copy of sd_tiny's: the smoke teacher of
  configs/dit_xl2_imagenet256.py). Weights are diffusers' random initialisation
  (biases made random too), so every block's embedders differ, as in a model trained with
  diffusers;
- forward.npz: each folder's transformer output (all channels) on fixed inputs;
- ddim.npz: a guided DDIM trajectory of dit_tiny: diffusers' DDIMScheduler driven by
  DiTPipeline's own loop body (guidance on the prediction channels, variance channels passed
  through and dropped). DiTPipeline itself hard-codes the null class 1000 and decodes through a
  VAE, so its loop is reproduced here line for line;
- schedules.npz: alphas_cumprod of each beta schedule, and DDIMScheduler.set_timesteps of each
  timestep spacing for several step counts and offsets;
- dit_xl2_manifest.json: every tensor name and shape of DiT-XL/2 (facebook/DiT-XL-2-256's
  transformer config, the Transformer2DModel layout it ships with, and the same config in
  DiTTransformer2DModel), built on the meta device: no weights.

Then it runs, with the same --out, the scripts that write the Stable-Diffusion-family golden
files (`SD_SCRIPTS`): a tiny random SD pipeline (U-Net in both layouts, CLIP text encoder and
tokenizer, a tiny BERT, VAE, scheduler), each part's outputs, StableDiffusionPipeline's guided
samples, and the SD 1.5 / 2.1 manifests; each script's docstring says what it writes.

Run: python scripts/diffusers_golden.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil

import numpy as np
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, Transformer2DModel

SD_SCRIPTS = ("golden_unet.py", "golden_text.py", "golden_vae.py", "golden_pipeline.py")
# facebook/DiT-XL-2-256 transformer/config.json (diffusers-format release of DiT-XL/2).
DIT_XL2_CONFIG = dict(
    activation_fn="gelu-approximate",
    attention_bias=True,
    attention_head_dim=72,
    dropout=0.0,
    in_channels=4,
    norm_elementwise_affine=False,
    norm_num_groups=32,
    norm_type="ada_norm_zero",
    num_attention_heads=16,
    num_embeds_ada_norm=1000,
    num_layers=28,
    out_channels=8,
    patch_size=2,
    sample_size=32,
    upcast_attention=False,
)
TINY = dict(
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """diffusers' own random initialisation, with the biases random too (they start at 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def _save_pipeline(out, name, model, scheduler) -> str:
    folder = os.path.join(out, name)
    model.save_pretrained(os.path.join(folder, "transformer"), safe_serialization=True)
    scheduler.save_pretrained(os.path.join(folder, "scheduler"))
    return folder


def _forward(model, x, t, labels) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x), timestep=t, class_labels=labels).sample.numpy()


def write_imagenet_pipeline(out: str) -> None:
    """dit_tiny_imagenet/: DiT-XL/2's shape of things in miniature (configs/dit_xl2_imagenet256.py).

    ImageNet's 1000 classes, learned variance, a vae/ (sd_tiny's RGB AutoencoderKL, written by
    scripts/golden_vae.py: 8x8x3 images -> 4x4x4 latents) and a DiT on its latents.
    """
    torch.manual_seed(0)
    imagenet = DiTTransformer2DModel(
        in_channels=4,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=1,
        sample_size=4,
        patch_size=2,
        num_embeds_ada_norm=1000,
    ).eval()
    _randomise(imagenet, 3)
    folder = _save_pipeline(out, "dit_tiny_imagenet", imagenet, DDIMScheduler(clip_sample=False))
    shutil.copytree(os.path.join(out, "sd_tiny", "vae"), os.path.join(folder, "vae"),
                    dirs_exist_ok=True)  # fmt: skip


def write_models(out: str) -> dict:
    """The two tiny folders and their forward outputs on fixed inputs."""
    torch.manual_seed(0)
    current = DiTTransformer2DModel(in_channels=4, out_channels=8, **TINY).eval()
    _randomise(current, 1)
    _save_pipeline(
        out, "dit_tiny", current, DDIMScheduler(beta_schedule="linear", clip_sample=False)
    )
    legacy = Transformer2DModel(
        in_channels=1,
        norm_type="ada_norm_zero",
        activation_fn="gelu-approximate",
        norm_elementwise_affine=False,
        **TINY,
    ).eval()
    _randomise(legacy, 2)
    legacy_scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type="v_prediction",
        clip_sample=False,
    )
    _save_pipeline(out, "dit_tiny_legacy", legacy, legacy_scheduler)
    rng = np.random.default_rng(0)
    arrays = {}
    for name, model, channels in (("dit_tiny", current, 4), ("dit_tiny_legacy", legacy, 1)):
        x = rng.standard_normal((3, channels, 8, 8)).astype(np.float32)
        t = torch.tensor([0.0, 417.25, 999.0])
        labels = torch.tensor([3, 0, 10])  # 10: the null class
        arrays[f"{name}/x"] = x
        arrays[f"{name}/t"] = t.numpy()
        arrays[f"{name}/labels"] = labels.numpy()
        arrays[f"{name}/out"] = _forward(model, x, t, labels)
    np.savez(os.path.join(out, "forward.npz"), **arrays)
    return {"dit_tiny": current}


def write_ddim(out: str, model, *, steps: int = 10, guidance_scale: float = 3.0) -> None:
    """A guided DDIM trajectory: DiTPipeline's loop body with diffusers' DDIMScheduler."""
    scheduler = DDIMScheduler.from_pretrained(os.path.join(out, "dit_tiny", "scheduler"))
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn((4, 4, 8, 8), generator=generator)
    class_labels = torch.tensor([0, 3, 7, 9])
    class_null = torch.tensor([10] * 4)  # the pipeline's [1000] * batch_size, for 10 classes
    latent_channels = model.config.in_channels
    latent_model_input = torch.cat([latents] * 2)
    class_labels_input = torch.cat([class_labels, class_null], 0)
    scheduler.set_timesteps(steps)
    trajectory = [latents.numpy()]
    with torch.no_grad():
        for t in scheduler.timesteps:
            half = latent_model_input[: len(latent_model_input) // 2]
            latent_model_input = torch.cat([half, half], dim=0)
            latent_model_input = scheduler.scale_model_input(latent_model_input, t)
            timesteps = t[None].expand(latent_model_input.shape[0])
            noise_pred = model(
                latent_model_input, timestep=timesteps, class_labels=class_labels_input
            ).sample
            eps, rest = noise_pred[:, :latent_channels], noise_pred[:, latent_channels:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            eps = torch.cat([half_eps, half_eps], dim=0)
            noise_pred = torch.cat([eps, rest], dim=1)
            model_output, _ = torch.split(noise_pred, latent_channels, dim=1)
            latent_model_input = scheduler.step(model_output, t, latent_model_input).prev_sample
            trajectory.append(latent_model_input[:4].numpy())
    np.savez(
        os.path.join(out, "ddim.npz"),
        trajectory=np.stack(trajectory),
        timesteps=scheduler.timesteps.numpy(),
        labels=class_labels.numpy(),
        guidance_scale=np.float32(guidance_scale),
    )


def write_schedules(out: str) -> None:
    """alphas_cumprod of each beta schedule and DDIM timesteps of each spacing."""
    arrays = {}
    for name, kwargs in (
        ("linear", dict(beta_schedule="linear")),
        ("scaled_linear", dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        ("squaredcos_cap_v2", dict(beta_schedule="squaredcos_cap_v2")),
    ):
        arrays[f"alphas_cumprod/{name}"] = DDIMScheduler(**kwargs).alphas_cumprod.numpy()
    for spacing in ("leading", "trailing", "linspace"):
        for offset in (0, 1):
            for steps in (1, 3, 4, 10, 50, 999):
                scheduler = DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
                scheduler.set_timesteps(steps)
                arrays[f"timesteps/{spacing}/{offset}/{steps}"] = scheduler.timesteps.numpy()
    np.savez(os.path.join(out, "schedules.npz"), **arrays)


def write_manifest(out: str) -> None:
    """DiT-XL/2's tensor names and shapes in both layouts, on the meta device."""
    manifest = {"config": DIT_XL2_CONFIG, "layouts": {}}
    with torch.device("meta"):
        for cls in (Transformer2DModel, DiTTransformer2DModel):
            kwargs = dict(DIT_XL2_CONFIG)
            if cls is DiTTransformer2DModel:
                kwargs.pop("norm_num_groups")
            model = cls(**kwargs)
            manifest["layouts"][cls.__name__] = {
                name: list(tensor.shape) for name, tensor in model.state_dict().items()
            }
    with open(os.path.join(out, "dit_xl2_manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def main() -> None:
    """Write every golden file into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    models = write_models(out)
    write_ddim(out, models["dit_tiny"])
    write_schedules(out)
    write_manifest(out)
    # The Stable-Diffusion-family pipeline's parts, then the pipeline (which needs them all).
    here = os.path.dirname(os.path.abspath(__file__))
    for script in SD_SCRIPTS:
        runpy.run_path(os.path.join(here, script), run_name="__main__")
    write_imagenet_pipeline(out)  # its vae/ is sd_tiny's
    print(f"wrote golden files to {out}")


if __name__ == "__main__":
    main()
