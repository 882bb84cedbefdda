"""Every network part of a diffusers folder loads through one signature: load(abstract, folder).

For each part a tiny folder holds (DiT, U-Net, VAE, SD3 transformer, CLIP, BERT, CLIP with
projection, T5): the loaded weights are float32 numpy arrays with the names and shapes of the
module built from the part's config.json, and the same folder loaded for another part's module
is refused in one line.
"""

from __future__ import annotations

import inspect
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import trees
from distill_jax.interop import core, dit, pipeline, sd3, sd3_text, text_encoder, unet, vae
from distill_jax.models.clip_text import ClipText, ClipTextWithProjection
from distill_jax.models.t5_encoder import T5Encoder
from distill_jax.text_encoder import MiniLM

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
IDS = jnp.zeros((1, 2), jnp.int32)


def _config(folder: str) -> tuple[dict, str]:
    where = os.path.join(DATA, folder, "config.json")
    with open(where) as f:
        return json.load(f), where


def _dit():
    imported = dit.read_dit_folder(os.path.join(DATA, "dit_tiny"), weights=False)
    return dit.abstract_dit_params(imported.model, imported.data_shape, imported.num_classes)


def _unet():
    return pipeline.abstract_sd_params(
        pipeline.read_sd_folder(os.path.join(DATA, "sd_tiny"), weights=False)
    )


def _vae():
    return vae.abstract_vae_params(vae.vae_model(*_config("sd_tiny/vae")))


def _sd3():
    return sd3.teacher_params_shape(
        sd3.mmdit_module(sd3.transformer_config(*_config("sd3_tiny/transformer")))
    )


def _text(folder: str, module_type):
    _, sizes = text_encoder.encoder_sizes(*_config(folder))
    return core.abstract_params(module_type(sizes), IDS, IDS)


def _clip_with_projection():
    part = sd3_text.clip_part(*_config("sd3_tiny/text_encoder_2"))
    module = ClipTextWithProjection(part.sizes, part.projection, part.eos_token_id)
    return core.abstract_params(module, IDS, IDS)


def _t5():
    return core.abstract_params(
        T5Encoder(sd3_text.t5_sizes(*_config("sd3_tiny/text_encoder_3"))), IDS
    )


# (part, its load, its folder, the abstract parameters of the module its config describes)
PARTS = [
    ("dit", dit.load, "dit_tiny/transformer", _dit),
    ("unet", unet.load, "sd_tiny/unet", _unet),
    ("vae", vae.load, "sd_tiny/vae", _vae),
    ("sd3_transformer", sd3.load, "sd3_tiny/transformer", _sd3),
    (
        "clip",
        text_encoder.load,
        "sd_tiny/text_encoder",
        lambda: _text("sd_tiny/text_encoder", ClipText),
    ),
    (
        "bert",
        text_encoder.load,
        "bert_tiny/text_encoder",
        lambda: _text("bert_tiny/text_encoder", MiniLM),
    ),
    ("clip_with_projection", sd3_text.load_clip, "sd3_tiny/text_encoder_2", _clip_with_projection),
    ("t5", sd3_text.load_t5, "sd3_tiny/text_encoder_3", _t5),
]


@pytest.mark.parametrize("name, load, folder, abstract", PARTS, ids=[p[0] for p in PARTS])
def test_a_part_loads_into_the_shapes_of_its_module(name, load, folder, abstract):
    assert list(inspect.signature(load).parameters) == ["abstract", "folder"], name
    want = abstract()
    params = load(want, os.path.join(DATA, folder))
    assert trees.shape_mismatch(params, want) is None
    leaves = list(trees.named_leaves(params).values())
    assert leaves and all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in leaves)
    assert all(np.all(np.isfinite(x)) for x in leaves)


@pytest.mark.parametrize("index", range(len(PARTS)), ids=[p[0] for p in PARTS])
def test_a_part_loaded_for_another_module_is_refused_in_one_line(index):
    name, load, folder, _ = PARTS[index]
    other = PARTS[(index + 1) % len(PARTS)][3]()  # the next part's module
    with pytest.raises(core.FolderError) as error:
        load(other, os.path.join(DATA, folder))
    message = str(error.value)
    assert "\n" not in message and os.path.join(DATA, folder) in message, (name, message)
