"""The text-to-image U-Nets that diffusers trained on the captioned digits
(scripts/train_diffusers_sd.py: v-prediction, and epsilon as SD 1.x): after import, our guided
DDIM on diffusers' own timesteps gives the images StableDiffusionPipeline's loop gave from that
noise, for prompts the pipeline's MiniLM text encoder (run through our reader) encodes.

The committed folders (tests/data/diffusers/sd_digits, sd_digits_eps) hold unet/, scheduler/
and the tokenizer's config; their text_encoder/ and tokenizer.json are the pinned MiniLM
package's files, which the script copied, so the test assembles the folder from them.
"""

import os
import shutil

import numpy as np
import pytest
from conftest import assert_same_guided_images

from distill_jax import text_encoder
from distill_jax.diffusion import discrete
from distill_jax.interop import core
from distill_jax.interop import pipeline as reader
from distill_jax.models import kinds

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")


def assemble(tmp_path, name: str = "sd_digits") -> str:
    """The pipeline folder: the committed parts plus MiniLM's files from the pinned package."""
    folder = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), folder)
    minilm = text_encoder.default_encoder_dir()
    (folder / "text_encoder").mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(minilm, name), folder / "text_encoder" / name)
    os.symlink(os.path.join(minilm, "tokenizer.json"), folder / "tokenizer" / "tokenizer.json")
    return str(folder)


@pytest.mark.parametrize("name", ["sd_digits", "sd_digits_eps"])
def test_same_images_as_diffusers_pipeline_loop(tmp_path, name):
    folder = assemble(tmp_path, name)
    golden = np.load(os.path.join(DATA, name, "ddim_golden.npz"))
    imported = reader.read_sd_folder(folder)
    lo, hi = imported.logsnr_range
    model = reader.sd_model(imported)
    encoder = reader.text_encoder(folder)
    table = np.asarray(kinds.discrete_logsnrs(core.model_config(imported.model)))
    timesteps = discrete.scheduler_timesteps(int(golden["steps"]), num_timesteps=1000)
    times = discrete.times_of_timesteps(timesteps, table, logsnr_min=lo, logsnr_max=hi)
    assert_same_guided_images(imported, model, encoder, golden, times, rtol=1e-4)
