"""diffusers' UNet2DConditionModel read into SDUNet: golden outputs, real manifests, refusals.

Golden files: scripts/golden_unet.py (PyTorch and diffusers; CI never installs them).
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.interop import core
from distill_jax.interop import unet as reader
from distill_jax.models import denoiser
from distill_jax.trees import named_leaves

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
FOLDERS = {"v1": "sd_tiny/unet", "v2": "sd_tiny_v2_unet"}


def _build(keys: dict, shape: tuple, *, use_guidance: bool = False):
    model = denoiser.build_model(
        core.model_config(keys),
        data_shape=shape,
        num_classes=0,
        use_guidance=use_guidance,
        text_dim=keys["sd_unet"]["cross_attention_dim"],
    )
    abstract = jax.eval_shape(
        lambda: denoiser.init_params(model, jax.random.PRNGKey(0), data_shape=shape)
    )
    return model, abstract


def _read(name: str, unet_dir: str | None = None):
    unet_dir = unet_dir or os.path.join(DATA, FOLDERS[name])
    keys, cfg = reader.read_unet_config(unet_dir)
    shape = (cfg["sample_size"], cfg["sample_size"], cfg["in_channels"])
    model, abstract = _build(keys, shape)
    return model, reader.load(abstract, unet_dir)


@pytest.mark.parametrize("name", ["v1", "v2"])
def test_forward_equals_diffusers(name):
    """SD 1.x layout (conv projections, one head count) and SD 2.x layout (linear projections,
    per-level heads, two transformer layers on a level), on diffusers' own timesteps."""
    golden = np.load(os.path.join(DATA, "sd_unet_golden.npz"))
    model, params = _read(name)
    apply = jax.jit(lambda p, z, k, c: model.apply({"params": p}, z, k, c, method="on_timesteps"))
    out = apply(params, golden[f"{name}_z"], golden[f"{name}_timesteps"], golden[f"{name}_context"])
    want = golden[f"{name}_out"]
    assert float(np.abs(np.asarray(out) - want).max()) <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("version,params", [("sd15", 859_520_964), ("sd21", 865_910_724)])
def test_real_unet_manifest_fully_mapped(version, params):
    """Every tensor of the real SD 1.5 / 2.1 U-Net maps by name and shape (no weights: the
    manifest's shapes stand in as zero-strided arrays)."""
    with open(os.path.join(DATA, f"{version}_unet_manifest.json")) as f:
        manifest = json.load(f)
    keys = reader.unet_model_config(dict(manifest["config"], _class_name=reader.UNET_CLASS))
    _, abstract = _build(keys, (64, 64, 4))
    tensors = {k: np.broadcast_to(np.float32(0), s) for k, s in manifest["tensors"].items()}
    converted = core.convert_params(
        tensors,
        abstract,
        version,
        name_of=reader.diffusers_unet_name,
        layout=reader.to_sd_layout,
        what="a U-Net",
    )
    assert len(named_leaves(converted)) == len(tensors) == 686
    assert sum(int(np.prod(s)) for s in manifest["tensors"].values()) == params
    assert sum(leaf.size for leaf in jax.tree.leaves(converted)) == params


def test_student_starts_as_teacher_and_its_branch_is_live():
    _, teacher_params = _read("v2")
    keys, cfg = reader.read_unet_config(os.path.join(DATA, FOLDERS["v2"]))
    teacher, _ = _build(keys, (8, 8, 1))
    student, abstract = _build(keys, (8, 8, 1), use_guidance=True)
    # The shared GuidanceEmbedding's real initialisation (last layer zero) is checked by
    # tests/test_models.py; zeros stand in for it here (no init compile of the U-Net).
    fresh = jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract)
    params = denoiser.student_params_from_teacher(teacher_params, fresh)
    z = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 1))
    context = jax.random.normal(jax.random.PRNGKey(1), (2, 5, cfg["cross_attention_dim"]))
    t = jnp.array([0.2, 0.9])
    call = jax.jit(lambda fn, w: fn(z, t, context, w))
    want = call(denoiser.make_denoise_fn(teacher, teacher_params), None)
    for w in (0.0, 3.0):
        got = call(denoiser.make_denoise_fn(student, params), jnp.full(2, w))
        np.testing.assert_array_equal(got, want)
    params["guidance_embed"] = jax.tree.map(lambda p: p + 0.1, params["guidance_embed"])
    moved = call(denoiser.make_denoise_fn(student, params), jnp.full(2, 2.0))
    assert float(jnp.max(jnp.abs(moved - want))) > 1e-3


def _edited_config(tmp_path, **changes) -> str:
    folder = tmp_path / "unet"
    shutil.copytree(os.path.join(DATA, FOLDERS["v2"]), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(class_embed_type="timestep"), "class_embed_type='timestep'.*accepted None"),
        (dict(addition_embed_type="text_time"), "addition_embed_type='text_time'"),
        (
            dict(
                down_block_types=[
                    "CrossAttnDownBlock2D",
                    "SimpleCrossAttnDownBlock2D",
                    "DownBlock2D",
                ]
            ),
            "block types .*accepted 3 of CrossAttnDownBlock2D, DownBlock2D",
        ),
        (dict(attention_head_dim=[3, 4, 4]), "16 channels do not split into 3 attention heads"),
        (
            dict(_class_name="UNet2DModel"),
            "_class_name='UNet2DModel': accepted 'UNet2DConditionModel'",
        ),
    ],
)
def test_unsupported_config_refused_in_one_line(tmp_path, changes, message):
    with pytest.raises(core.FolderError, match=message) as error:
        reader.read_unet_config(_edited_config(tmp_path, **changes))
    assert "\n" not in str(error.value)


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    """A config whose sizes differ from the tensors: missing, left over, misshapen tensors."""
    folder = _edited_config(tmp_path, layers_per_block=2)
    with pytest.raises(core.FolderError, match=r"does not hold a U-Net .*missing \d+ "):
        _read("v2", folder)
    folder = _edited_config(tmp_path / "b", cross_attention_dim=16)
    with pytest.raises(
        core.FolderError,
        match=r"attn2.to_k.weight has shape \(16, 24\), .*expected \(16, 2, 8\)",
    ):
        _read("v2", folder)
