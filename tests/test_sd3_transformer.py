"""diffusers' SD3Transformer2DModel read into MMDiT: golden outputs, real manifests, refusals.

Golden files: scripts/golden_sd3.py (PyTorch and diffusers; CI never installs them).
"""

from __future__ import annotations

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.interop import core, sd3
from distill_jax.models import denoiser
from distill_jax.models.embeddings import GUIDANCE_BRANCH
from distill_jax.models.mmdit import MMDiT, init_params

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
FOLDERS = {"sd3": "sd3_tiny/transformer", "sd35": "sd35_tiny_transformer"}
WEIGHTS = "diffusion_pytorch_model.safetensors"
# Measured: max abs error 9.1e-7 (sd3) and 6.6e-7 (sd35) against outputs of magnitude 2.1 and
# 1.6 (CPU, float32).
TOLERANCE = 1e-5


@functools.cache
def _golden() -> dict:
    return dict(np.load(os.path.join(DATA, "sd3_transformer_golden.npz")))


@functools.cache
def _apply(module: MMDiT):
    """One jitted forward per module (params are an argument: new params, no new trace)."""
    return jax.jit(
        lambda params, z, t, states, pooled, w: module.apply(
            {"params": params}, z, t, states, pooled, w, method=MMDiT.on_timesteps
        )
    )


def _inputs(name: str) -> tuple:
    g = _golden()
    return (
        g[f"{name}_latents"].transpose(0, 2, 3, 1),  # NCHW -> NHWC
        g[f"{name}_timesteps"],
        g[f"{name}_encoder_hidden_states"],
        g[f"{name}_pooled"],
    )


@functools.cache
def _teacher(name: str):
    module, params = sd3.read_transformer_folder(os.path.join(DATA, FOLDERS[name]))
    out = np.asarray(_apply(module)(params, *_inputs(name), None))
    return module, params, out


@pytest.mark.parametrize("name", sorted(FOLDERS))
def test_tiny_transformer_matches_diffusers(name):
    module, _, out = _teacher(name)
    assert module.qk_norm == (None if name == "sd3" else "rms_norm")
    assert module.dual_attention_layers == (() if name == "sd3" else (0,))
    want = _golden()[f"{name}_out"].transpose(0, 2, 3, 1)
    assert out.shape == want.shape
    assert float(np.max(np.abs(out - want))) < TOLERANCE


@pytest.mark.parametrize("version", ["sd3_medium", "sd35_medium"])
def test_published_transformer_manifests_map_onto_mmdit(version):
    """Every tensor of SD3-medium / SD3.5-medium has a parameter of our MMDiT and back."""
    with open(os.path.join(DATA, f"{version}_transformer_manifest.json")) as f:
        manifest = json.load(f)
    module = sd3.mmdit_module(sd3.transformer_config(manifest["config"], version))
    mapping = sd3.match_transformer(manifest["tensors"], module, version)
    assert set(mapping) == set(manifest["tensors"]) - {sd3.POS_EMBED}
    assert module.hidden == 1536 and module.num_layers == 24
    if version == "sd35_medium":
        assert module.dual_attention_layers == tuple(range(13))
        assert mapping["transformer_blocks.12.attn2.norm_q.weight"].endswith("attn2/norm_q/scale")


def test_tensor_names():
    assert sd3.tensor_name("transformer_blocks_0/attn/to_q/kernel") == (
        "transformer_blocks.0.attn.to_q.weight"
    )
    assert sd3.tensor_name("transformer_blocks_11/ff_context/net_0_proj/bias") == (
        "transformer_blocks.11.ff_context.net.0.proj.bias"
    )
    assert sd3.tensor_name("transformer_blocks_2/attn/to_out_0/kernel") == (
        "transformer_blocks.2.attn.to_out.0.weight"
    )
    assert sd3.tensor_name("time_text_embed/timestep_embedder/linear_1/kernel") == (
        "time_text_embed.timestep_embedder.linear_1.weight"
    )
    with pytest.raises(KeyError):
        sd3.tensor_name(f"{GUIDANCE_BRANCH}/dense_0/kernel")


def test_student_equals_teacher_at_any_w():
    teacher, teacher_params, want = _teacher("sd35")
    student = teacher.clone(use_guidance=True)
    fresh = init_params(student, jax.random.PRNGKey(1))
    params = denoiser.student_params_from_teacher(teacher_params, fresh)
    inputs = _inputs("sd35")
    apply = _apply(student)
    for w in ([0.0, 3.5, 14.0], [-1.0, 1.0, 7.0]):
        got = np.asarray(apply(params, *inputs, jnp.asarray(w)))
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    params[GUIDANCE_BRANCH] = jax.tree.map(lambda p: p + 0.1, params[GUIDANCE_BRANCH])
    moved = np.asarray(apply(params, *inputs, jnp.full(3, 2.0)))
    assert float(np.max(np.abs(moved - want))) > 1e-3


def test_remat_keeps_the_output():
    teacher, params, want = _teacher("sd3")
    got = np.asarray(_apply(teacher.clone(remat="full"))(params, *_inputs("sd3"), None))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _copy(tmp_path, name="sd3", **changes) -> str:
    folder = tmp_path / "transformer"
    shutil.copytree(os.path.join(DATA, FOLDERS[name]), folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def _refused(folder: str, match: str, where: str) -> None:
    with pytest.raises(core.FolderError, match=match) as error:
        sd3.read_transformer_folder(folder)
    message = str(error.value)
    assert "\n" not in message and where in message, message


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(num_layers=0), r"config.json has num_layers=0: accepted an integer >= 1"),
        (dict(attention_head_dim=16.0), r"attention_head_dim=16.0: accepted an integer"),
        (dict(qk_norm="layer_norm"), r"qk_norm='layer_norm': accepted None, 'rms_norm'"),
        (dict(dual_attention_layers=[2]), r"dual_attention_layers=\[2\]: .* in 0..1"),
        (dict(caption_projection_dim=48), r"caption_projection_dim=48: accepted .* = 32"),
        (dict(_class_name="FluxTransformer2DModel"), r"accepted 'SD3Transformer2DModel'"),
        (dict(use_ip_adapter=True), r"use_ip_adapter=True: accepted the keys of"),
        (dict(pos_embed_max_size=2), r"1 <= sample_size // patch_size <= pos_embed_max_size"),
        (dict(num_layers=3), r"num_layers=3 but the weights hold 2 \(transformer_blocks.N\)"),
        (
            dict(joint_attention_dim=40),
            r"tensor context_embedder.weight has shape \(32, 48\), .*expected \(40, 32\)",
        ),
    ],
)
def test_bad_config_refused_in_one_line(tmp_path, changes, message):
    folder = _copy(tmp_path, **changes)
    _refused(folder, message, folder)


def _rewrite_weights(folder: str, edit) -> None:
    from safetensors.numpy import save_file

    path = os.path.join(folder, WEIGHTS)
    tensors = core.read_safetensors(folder)
    edit(tensors)
    save_file(tensors, path)


def test_damaged_weights_refused_in_one_line(tmp_path):
    folder = _copy(tmp_path / "missing")
    _rewrite_weights(folder, lambda t: t.pop("transformer_blocks.1.attn.add_q_proj.weight"))
    _refused(folder, r"missing 1 \(transformer_blocks.1.attn.add_q_proj.weight\)", folder)

    folder = _copy(tmp_path / "extra")
    _rewrite_weights(folder, lambda t: t.update(extra=np.zeros(3, np.float32)))
    _refused(folder, r"1 not mapped \(extra\)", folder)

    folder = _copy(tmp_path / "shape")
    _rewrite_weights(folder, lambda t: t.update({"proj_out.weight": np.zeros((16, 33), "f4")}))
    _refused(folder, r"tensor proj_out.weight has shape \(16, 33\)", folder)

    folder = _copy(tmp_path / "table")
    _rewrite_weights(
        folder, lambda t: t.update({sd3.POS_EMBED: np.ascontiguousarray(t[sd3.POS_EMBED][:, ::-1])})
    )
    _refused(folder, r"pos_embed.pos_embed differs from the 2-D sine-cosine table", folder)

    folder = _copy(tmp_path / "table_shape")
    _rewrite_weights(folder, lambda t: t.update({sd3.POS_EMBED: np.zeros((1, 64, 32), "f4")}))
    _refused(folder, r"pos_embed.pos_embed has shape \(1, 64, 32\)", folder)
