"""The diffusers AutoencoderKL reader against diffusers itself (scripts/golden_vae.py files)."""

import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from distill_jax.interop import vae as reader
from distill_jax.interop.core import FolderError, read_safetensors
from distill_jax.models import autoencoder, kl_vae
from distill_jax.trees import named_leaves

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
TINY = os.path.join(DATA, "sd_tiny", "vae")
ATOL = 2e-5  # float32 rounding: the golden values are of order 1 (max |x| about 1.5)


@pytest.fixture(scope="module")
def tiny():
    model, params, record = reader.read_vae_folder(TINY)
    return model, params, record


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(os.path.join(DATA, "sd_tiny_vae_golden.npz")))


@pytest.fixture(scope="module")
def tiny_tensors():
    return read_safetensors(TINY)


def _apply(model, method):
    return jax.jit(lambda params, x: model.apply({"params": params}, x, method=method))


def test_encode_decode_equal_diffusers(tiny, golden):
    model, params, record = tiny
    mean, logvar = _apply(model, kl_vae.AutoencoderKL.encode)(params, golden["image"])
    np.testing.assert_allclose(mean, golden["mean"], atol=ATOL, rtol=0)
    np.testing.assert_allclose(logvar, golden["logvar"], atol=ATOL, rtol=0)
    decoded = _apply(model, kl_vae.AutoencoderKL.decode)(params, golden["latent"])
    np.testing.assert_allclose(decoded, golden["decoded"], atol=ATOL, rtol=0)
    assert record["scaling_factor"] == 0.18215 and record["shift_factor"] is None
    assert record["latent_channels"] == 4 and record["downsampling_factor"] == 2
    assert record["sample_size"] == 32 and len(record["weights_sha256"]) == 64


def test_codec_applies_scaling_and_shift(tiny, golden):
    model, params, record = tiny
    scale, shift = record["scaling_factor"], 0.1159  # a shift as SD3's VAE has one
    encode, decode = autoencoder.make_codec(model, params, scale, shift)
    codec = jax.jit(lambda f, x: f(x))
    want = (golden["mean"] - shift) * scale
    np.testing.assert_allclose(codec(encode, golden["image"]), want, atol=ATOL * scale, rtol=0)
    z = (golden["latent"] - shift) * scale  # decodes to diffusers' decode(latent)
    np.testing.assert_allclose(codec(decode, z), golden["decoded"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("name, size", [("sd15", 512), ("sd21", 768)])
def test_stable_diffusion_manifest_maps(name, size):
    with open(os.path.join(DATA, f"{name}_vae_manifest.json")) as f:
        manifest = json.load(f)
    config, shapes = manifest["config"], manifest["tensors"]
    abstract = reader.abstract_vae_params(reader.vae_model(config))
    assert len(reader.match_tensors(shapes, abstract, name)) == len(shapes)
    # The same tensors under the pre-0.14 attention names, 1x1-conv shaped, map too.
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for key, shape in shapes.items():
        for new, former in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{former}.")
                shape = shape + [1, 1] if len(shape) == 2 else shape
        legacy[key] = shape
    assert any(".query.weight" in key for key in legacy)
    assert len(reader.match_tensors(reader.current_names(legacy), abstract, name)) == len(shapes)
    record = reader.vae_record(config, name)
    assert record["sample_size"] == size
    assert reader.vae_latent_shape(record, (size, size, 3)) == (size // 8, size // 8, 4)
    assert reader.vae_latent_shape(config, (size, size // 2)) == (size // 8, size // 16, 4)


def test_old_attention_names_read_alike(tiny, tiny_tensors, tmp_path):
    renamed = {}
    for key, tensor in tiny_tensors.items():
        for new, former in (("to_q", "query"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{former}.")
                tensor = tensor[..., None, None] if tensor.ndim == 2 else tensor
        renamed[key] = np.ascontiguousarray(tensor)
    shutil.copy(os.path.join(TINY, "config.json"), tmp_path)
    save_file(renamed, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    _, params, _ = reader.read_vae_folder(tmp_path)
    got, want = named_leaves(params), named_leaves(tiny[1])
    assert got.keys() == want.keys()
    assert all(np.array_equal(got[k], want[k]) for k in want)


def _tiny_config() -> dict:
    with open(os.path.join(TINY, "config.json")) as f:
        return json.load(f)


def _convert(tensors):
    model = reader.vae_model(_tiny_config())
    return reader.convert_vae_params(tensors, reader.abstract_vae_params(model), "vae/")


def test_refuses_missing_leftover_and_misshapen_tensors(tiny_tensors):
    name = "decoder.mid_block.attentions.0.to_k.weight"
    missing = {k: v for k, v in tiny_tensors.items() if k != name}
    with pytest.raises(ValueError, match=rf"missing 1 \({name}\)"):
        _convert(missing)
    with pytest.raises(ValueError, match=r"1 not mapped \(encoder.extra.weight\)"):
        _convert({**tiny_tensors, "encoder.extra.weight": np.zeros(3, np.float32)})
    misshapen = {**tiny_tensors, name: np.zeros((32, 16), np.float32)}
    with pytest.raises(ValueError, match=rf"tensor {name} has shape \(32, 16\).*expected"):
        _convert(misshapen)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
            r"down_block_types=.*AttnDownEncoderBlock2D.*accepted only 'DownEncoderBlock2D'",
        ),
        (dict(up_block_types=["UpDecoderBlock2D"]), "1 up_block_types for 2 block_out_channels"),
        (dict(act_fn="gelu"), "act_fn='gelu': accepted 'silu'"),
        (dict(_class_name="AutoencoderTiny"), "accepted 'AutoencoderKL'"),
        (dict(latents_mean=[0.0] * 4), "latents_mean set: accepted null"),
        (dict(norm_num_groups=12), "norm_num_groups=12, which does not divide"),
    ],
)
def test_refuses_unsupported_config(tmp_path, change, message):
    config = _tiny_config()
    (tmp_path / "config.json").write_text(json.dumps({**config, **change}))
    shutil.copy(os.path.join(TINY, "diffusion_pytorch_model.safetensors"), tmp_path)
    with pytest.raises(FolderError, match=message):
        reader.read_vae_folder(tmp_path)


def test_refuses_image_size_not_divisible():
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 8"):
        reader.vae_latent_shape({"block_out_channels": [128, 256, 512, 512]}, (36, 32, 3))
