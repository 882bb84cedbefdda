"""The diffusers DiT reader against diffusers itself (scripts/diffusers_golden.py golden files)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import imported_dit

from distill_jax.config import base_config
from distill_jax.diffusion import discrete, guidance, samplers, schedule
from distill_jax.interop import core, pipeline
from distill_jax.interop import dit as reader
from distill_jax.models import denoiser, student_head
from distill_jax.models.dit import DiT
from distill_jax.trees import named_leaves

DATA = os.path.join(os.path.dirname(__file__), "data", "diffusers")
FOLDERS = ("dit_tiny", "dit_tiny_legacy")


def _imported(name: str):
    return imported_dit(os.path.join(DATA, name))


@pytest.mark.parametrize("name", FOLDERS)
def test_forward_equals_diffusers(name):
    golden = np.load(os.path.join(DATA, "forward.npz"))
    imported, model = _imported(name)
    x = jnp.asarray(golden[f"{name}/x"]).transpose(0, 2, 3, 1)
    out = model.apply(
        {"params": imported.params},
        x,
        jnp.asarray(golden[f"{name}/t"]),
        jnp.asarray(golden[f"{name}/labels"]),
        with_variance=True,
        method=DiT.on_timesteps,
    )
    want = golden[f"{name}/out"].transpose(0, 2, 3, 1)
    assert out.shape == want.shape
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=0)
    # __call__ returns the prediction channels only (the variance is carried, not used).
    assert (
        model.apply({"params": imported.params}, x, jnp.zeros(3), jnp.zeros(3, int)).shape[-1]
        == x.shape[-1]
    )


def test_conventions_recorded():
    imported, _ = _imported("dit_tiny")
    record = imported.record
    assert record["schedule"]["beta_schedule"] == "linear"
    assert record["schedule"]["prediction_type"] == "epsilon"
    assert record["conventions"]["null_class"] == 10
    assert record["conventions"]["learned_variance"] is True
    assert len(record["weights_sha256"]) == 64
    legacy, _ = _imported("dit_tiny_legacy")
    assert legacy.model["parameterisation"] == "v"
    assert legacy.model["dit_attention_bias"] is False
    assert legacy.record["transformer_class"] == "Transformer2DModel"
    np.testing.assert_allclose(legacy.logsnr_range, (-5.36405, 7.06940), atol=1e-4)


def test_guided_ddim_equals_diffusers_on_its_grid():
    """diffusers' DDIMScheduler in DiTPipeline's loop, against our guided teacher stepping on
    the same timesteps: every state within float32 rounding of the trajectory's scale."""
    golden = np.load(os.path.join(DATA, "ddim.npz"))
    imported, model = _imported("dit_tiny")
    lo, hi = imported.logsnr_range
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_condition=imported.num_classes
    )
    table = np.asarray(model.timestep_logsnrs)
    steps = discrete.scheduler_timesteps(10, num_timesteps=1000)
    np.testing.assert_array_equal(steps, golden["timesteps"])
    times = discrete.times_of_timesteps(steps, table, logsnr_min=lo, logsnr_max=hi)
    trajectory = golden["trajectory"].transpose(0, 1, 3, 4, 2)
    labels, w = jnp.asarray(golden["labels"]), float(golden["guidance_scale"]) - 1.0
    kw = dict(logsnr_min=lo, logsnr_max=hi)
    z = jnp.asarray(trajectory[0])
    falling = times[::-1]
    for j in range(10):
        t, s = jnp.full(4, falling[j]), jnp.full(4, falling[j + 1])
        xhat = guided(z, t, labels, jnp.full(4, w))
        z = samplers.ddim_step(xhat, z, t, s, last=j == 9, **kw)
        scale = max(1.0, float(np.abs(trajectory[j + 1]).max()))
        assert float(jnp.max(jnp.abs(z - trajectory[j + 1]))) <= 1e-5 * scale, j
    sampled = samplers.run_sampler(
        "ddim", guided, trajectory[0], labels, w, steps=10, times=times, **kw
    )
    np.testing.assert_allclose(sampled, z, rtol=0, atol=1e-5 * float(np.abs(z).max()))


@pytest.mark.parametrize("layout", ["Transformer2DModel", "DiTTransformer2DModel"])
def test_dit_xl2_manifest_fully_mapped(layout):
    with open(os.path.join(DATA, "dit_xl2_manifest.json")) as f:
        manifest = json.load(f)
    config = dict(manifest["config"], _class_name=layout)
    keys = reader.dit_model_config(config)
    abstract = reader.abstract_dit_params(keys, (32, 32, 4), 1000)
    ours = {reader.diffusers_name(n): (n, leaf.shape) for n, leaf in named_leaves(abstract).items()}
    real = manifest["layouts"][layout]
    assert len(real) == 28 * 19 + 6  # 19 tensors per block, patch and final layers
    assert set(ours) == set(real)
    for torch_name, shape in real.items():
        name, flax_shape = ours[torch_name]
        assert core.to_flax_layout(np.empty(shape), name).shape == flax_shape, torch_name
    assert sum(int(np.prod(s)) for s in real.values()) == sum(
        int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(abstract)
    )


@pytest.mark.parametrize("choice", ["eps", "auto"])
def test_student_of_imported_teacher_starts_as_teacher(choice):
    """An eps student copies its eps teacher; the default 'both' student of an epsilon teacher
    (DiT-XL/2's layout: learned variance) keeps its eps head and starts its x head at zero, so
    it is sigmoid(lambda - both_shift) (alpha^2 for shift 0) times the teacher's x-hat."""
    imported, teacher = _imported("dit_tiny")
    lo, hi = imported.logsnr_range
    config = base_config()
    config.model = core.model_config(imported.model)
    config.model.student_parameterisation = choice
    config.finetune.to = ""  # the converted head alone (the fine-tune: tests/test_dit_cli.py)
    head = student_head.head_conversion(config, 4)
    assert head.student == ("eps" if choice == "eps" else "both")
    student = denoiser.build_model(
        student_head.student_model_config(config),
        data_shape=imported.data_shape,
        num_classes=10,
        use_guidance=True,
        logsnr_min=lo,
        logsnr_max=hi,
    )
    fresh = denoiser.init_params(student, jax.random.PRNGKey(3), data_shape=(8, 8, 4))
    params = denoiser.student_params_from_teacher(imported.params, fresh, head)
    # the learned-variance channels became the x head: the output layer keeps its shape
    assert params["final_proj"]["kernel"].shape == imported.params["final_proj"]["kernel"].shape
    z = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 4))
    t, labels = jnp.array([0.05, 0.3, 0.7, 1.0]), jnp.array([0, 4, 9, 10])
    want = denoiser.make_denoise_fn(teacher, imported.params)(z, t, labels)
    if choice == "auto":
        logsnr = schedule.logsnr_schedule_cosine(t, logsnr_min=lo, logsnr_max=hi)
        kept = jax.nn.sigmoid(logsnr - student.both_shift)  # the eps half's weight
        want = want * kept[:, None, None, None]
    for w in (0.0, 1.5, 4.0):
        got = denoiser.make_denoise_fn(student, params)(z, t, labels, jnp.full(4, w))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4 * float(jnp.max(abs(want))))
    # ... and the guidance branch is live: a trained branch changes the output with w.
    params["guidance_embed"] = jax.tree.map(lambda p: p + 0.1, params["guidance_embed"])
    moved = denoiser.make_denoise_fn(student, params)(z, t, labels, jnp.full(4, 2.0))
    assert float(jnp.max(jnp.abs(moved - want))) > 1e-3


def _copy(tmp_path, name="dit_tiny"):
    folder = tmp_path / name
    shutil.copytree(os.path.join(DATA, name), folder)
    return folder


def _edit_json(path, **changes):
    value = json.loads(path.read_text())
    value.update(changes)
    path.write_text(json.dumps(value))


def _edit_tensors(folder, edit):
    from safetensors.numpy import load_file, save_file

    path = folder / "transformer" / core.WEIGHTS_FILE
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "break_folder, message",
    [
        (lambda f: shutil.rmtree(f / "transformer"), "nor transformer/"),
        (  # a loop where a part should be: named as such, not as a missing part
            lambda f: (
                shutil.rmtree(f / "transformer"),
                os.symlink("transformer", f / "transformer"),
            ),
            "transformer is a link that leads nowhere",
        ),
        (
            lambda f: os.symlink(f / "loop", f / "scheduler" / "loop"),
            "loop is a link that leads nowhere",
        ),
        (lambda f: (f / "vae").mkdir(), "the VAE config: .*vae/config.json does not exist"),
        (
            lambda f: shutil.copytree(os.path.join(DATA, "sd_tiny_v2_unet"), f / "vae"),
            "vae/config.json has _class_name='UNet2DConditionModel': accepted 'AutoencoderKL'",
        ),
        (
            lambda f: _edit_json(
                f / "scheduler" / "scheduler_config.json",
                _class_name="FlowMatchEulerDiscreteScheduler",
                use_karras_sigmas=True,
            ),
            "use_karras_sigmas=True: accepted false or null",
        ),
        (
            lambda f: _edit_json(
                f / "scheduler" / "scheduler_config.json",
                _class_name="FlowMatchHeunDiscreteScheduler",
            ),
            "_class_name='FlowMatchHeunDiscreteScheduler': accepted",
        ),
        (
            lambda f: _edit_json(
                f / "scheduler" / "scheduler_config.json", beta_schedule="sigmoid"
            ),
            "beta_schedule='sigmoid'",
        ),
        (
            lambda f: _edit_json(f / "scheduler" / "scheduler_config.json", prediction_type="flow"),
            "prediction_type='flow'",
        ),
        (
            lambda f: _edit_json(f / "transformer" / "config.json", norm_type="ada_norm"),
            "norm_type='ada_norm'",
        ),
        (lambda f: _edit_tensors(f, lambda t: t.pop("proj_out_2.bias")), "missing 1"),
        (
            lambda f: _edit_tensors(f, lambda t: t.update(extra=np.zeros(3, np.float32))),
            "1 not mapped \\(extra\\)",
        ),
        (
            lambda f: _edit_tensors(
                f, lambda t: t.update({"proj_out_2.bias": np.zeros(5, np.float32)})
            ),
            "has shape \\(5,\\)",
        ),
        (
            lambda f: _edit_json(f / "transformer" / "config.json", num_layers=3),
            "num_layers=3 but the weights hold 2 transformer blocks",
        ),
        (  # refused from the weights' header, before a million blocks are built
            lambda f: _edit_json(f / "transformer" / "config.json", num_layers=1_000_000),
            "num_layers=1000000 but the weights hold 2",
        ),
        (
            lambda f: _edit_json(f / "transformer" / "config.json", num_layers=-3),
            "num_layers=-3: accepted a positive integer",
        ),
        (
            lambda f: _edit_json(f / "transformer" / "config.json", num_layers="two"),
            "config.json has num_layers='two': accepted a positive integer",
        ),
        (
            lambda f: _edit_json(f / "transformer" / "config.json", attention_head_dim=8),
            "= 16 but the weights' width is 32",
        ),
        (
            lambda f: _edit_tensors(
                f,
                lambda t: t.update({"proj_out_2.bias": np.full_like(t["proj_out_2.bias"], np.inf)}),
            ),
            "'proj_out_2.bias' holds .* infinite",
        ),
    ],
)
def test_bad_folders_refused_in_one_line(tmp_path, break_folder, message):
    folder = _copy(tmp_path)
    break_folder(folder)
    with pytest.raises(core.FolderError, match=message) as error:
        pipeline.read_teacher_folder(str(folder))
    assert "\n" not in str(error.value)


def test_half_precision_and_sharded_weights_read_as_float32(tmp_path):
    """bfloat16 and float16 files read within their rounding; shards listed by an index read
    exactly as the single file."""
    from safetensors.flax import save_file as save_jax
    from safetensors.numpy import load_file, save_file

    folder = _copy(tmp_path)
    path = folder / "transformer" / core.WEIGHTS_FILE
    tensors = load_file(str(path))
    full = named_leaves(reader.read_dit_folder(folder).params)
    for dtype, rtol in ((jnp.bfloat16, 2**-8), (jnp.float16, 2**-11)):
        save_jax({k: jnp.asarray(v, dtype) for k, v in tensors.items()}, str(path))
        got = named_leaves(reader.read_dit_folder(folder).params)
        for name, leaf in full.items():
            assert got[name].dtype == np.float32
            np.testing.assert_allclose(got[name], leaf, rtol=rtol, atol=1e-7, err_msg=name)
    path.unlink()
    names = sorted(tensors)
    shards = {"part-1.safetensors": names[::2], "part-2.safetensors": names[1::2]}
    for shard, members in shards.items():
        save_file({n: tensors[n] for n in members}, str(folder / "transformer" / shard))
    weight_map = {n: shard for shard, members in shards.items() for n in members}
    (folder / "transformer" / core.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    got = named_leaves(reader.read_dit_folder(folder).params)
    for name, leaf in full.items():
        np.testing.assert_array_equal(got[name], leaf)


def test_dit_with_a_flow_scheduler_is_a_flow_teacher(tmp_path):
    """A DiT folder whose scheduler is FlowMatchEulerDiscreteScheduler (a flow-trained DiT, as
    SiT): the network is fed z / (alpha + sigma) and 1000 s, and its output is read as the
    velocity; checked against diffusers' own forward of the same weights."""
    folder = tmp_path / "dit_flow"
    shutil.copytree(os.path.join(DATA, "dit_tiny"), folder)
    with open(folder / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, f)
    imported, model = imported_dit(str(folder))
    assert imported.model["parameterisation"] == "flow" and model.flow_timesteps == 1000
    golden = np.load(os.path.join(DATA, "forward.npz"))
    rows = slice(1, 3)  # diffusers' timesteps 417.25 and 999 (0 is s = 0: no noise)
    s = golden["dit_tiny/t"][rows] / 1000.0
    logsnr = 2 * np.log((1 - s) / s)
    t = schedule.t_from_logsnr(logsnr, logsnr_min=model.logsnr_min, logsnr_max=model.logsnr_max)
    alpha, sigma = (np.asarray(a)[:, None, None, None] for a in schedule.alpha_sigma(logsnr))
    z_fm = golden["dit_tiny/x"][rows].transpose(0, 2, 3, 1)
    z = z_fm * (alpha + sigma)  # the VP z whose flow input is the golden input
    xhat = denoiser.make_denoise_fn(model, imported.params)(
        jnp.asarray(z), t, jnp.asarray(golden["dit_tiny/labels"][rows])
    )
    velocity = golden["dit_tiny/out"][rows].transpose(0, 2, 3, 1)[..., :4]
    expected = z_fm - s[:, None, None, None] * velocity  # x-hat = z_fm - s v
    np.testing.assert_allclose(xhat, expected, atol=1e-5)  # 9.5e-7 measured
