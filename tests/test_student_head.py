"""A student's parameterisation apart from its teacher's: the routes, the head conversion, the
fine-tune stage in the run's plan (distill_jax/models/student_head.py)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.config import base_config
from distill_jax.diffusion.schedule import logsnr_schedule_cosine
from distill_jax.models import denoiser, student_head
from distill_jax.run import stages

POINT = (3,)


def _config(teacher: str, finetune: str = "auto", student: str = "auto"):
    c = base_config()
    c.model.kind = "mlp"
    c.model.mlp_hidden, c.model.mlp_depth, c.model.dropout = 32, 2, 0.0
    c.model.guidance_fourier_dim = 8
    c.model.parameterisation = teacher
    c.model.student_parameterisation = student
    c.finetune.to = finetune
    return c


@pytest.mark.parametrize(
    "teacher, finetune, student, want_finetune, want_student",
    [
        ("eps", "auto", "auto", "v", "v"),  # the default route of an epsilon teacher
        ("eps", "", "auto", "", "both"),  # no fine-tune: the converted head
        ("eps", "", "eps", "", "eps"),  # the teacher's own head (the noisy baseline)
        ("v", "auto", "auto", "", "v"),  # a v teacher needs neither
        ("x", "auto", "auto", "", "x"),
        ("both", "auto", "auto", "", "both"),
        ("v", "v", "auto", "", "v"),  # already v: nothing to fine-tune
        ("eps", "x", "auto", "x", "x"),
    ],
)
def test_routes_resolve(teacher, finetune, student, want_finetune, want_student):
    config = _config(teacher, finetune, student)
    assert student_head.finetune_target(config) == want_finetune
    assert student_head.student_parameterisation(config) == want_student
    names = [spec.name for spec in stages.plan_stages(config)]
    stage_one = stages.plan_stages(config)[names.index("stage1")]
    if want_finetune:
        assert names[:3] == ["teacher", stages.FINETUNE_STAGE, "stage1"]
        assert stage_one.teacher == stages.FINETUNE_STAGE
    else:
        assert stages.FINETUNE_STAGE not in names and stage_one.teacher == "teacher"


@pytest.mark.parametrize(
    "teacher, finetune, student, message",
    [
        ("v", "", "both", r"'both' needs an 'eps' \(or 'both'\) teacher"),
        ("both", "", "v", "cannot start from a 'both' teacher"),
        ("eps", "", "vv", "student_parameterisation='vv' is unknown"),
        ("eps", "y", "auto", "finetune.to='y' is unknown"),
    ],
)
def test_routes_that_do_not_convert_are_refused(teacher, finetune, student, message):
    with pytest.raises(ValueError, match=message):
        student_head.student_parameterisation(_config(teacher, finetune, student))


def _student(config):
    model_config = student_head.student_model_config(config)
    return denoiser.build_model(model_config, data_shape=POINT, num_classes=3, use_guidance=True)


@pytest.mark.parametrize("shift", [0.0, -5.0])
def test_both_head_of_an_epsilon_teacher_keeps_its_eps_and_starts_x_at_zero(shift):
    """The converted 'both' student is sigmoid(lambda - shift) times the teacher's x-hat at
    every t and w (alpha^2 for shift 0): the teacher where signal dominates, a fresh x head
    where noise does."""
    config = _config("eps", finetune="")
    config.model.student_both_shift = shift
    teacher = denoiser.build_model(
        config.model, data_shape=POINT, num_classes=3, use_guidance=False
    )
    rng = np.random.default_rng(0)
    teacher_params = jax.tree.map(
        lambda p: jnp.asarray(p + 0.2 * rng.standard_normal(p.shape), jnp.float32),
        denoiser.init_params(teacher, jax.random.key(0), data_shape=POINT),
    )
    student = _student(config)
    assert student.parameterisation == "both"
    fresh = denoiser.init_params(student, jax.random.key(1), data_shape=POINT)
    head = student_head.head_conversion(config, POINT[-1])
    params = denoiser.student_params_from_teacher(teacher_params, fresh, head)
    kernel = params["output_dense"]["kernel"]
    np.testing.assert_array_equal(kernel[:, :3], 0.0)  # the x slot
    np.testing.assert_array_equal(kernel[:, 3:], teacher_params["output_dense"]["kernel"])
    z = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    t = jnp.array([0.0, 0.2, 0.5, 0.8, 1.0])
    labels = jnp.array([0, 1, 2, 3, 1])
    assert student.both_shift == shift
    kept = jax.nn.sigmoid(logsnr_schedule_cosine(t) - shift)[:, None]
    want = kept * denoiser.make_denoise_fn(teacher, teacher_params)(z, t, labels)
    for w in (0.0, 4.0):
        got = denoiser.make_denoise_fn(student, params)(z, t, labels, jnp.full(5, w))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Without the conversion the eps weights would not fit the 'both' head at all.
    with pytest.raises(ValueError, match="output_dense"):
        denoiser.student_params_from_teacher(teacher_params, fresh)


def test_conversion_refuses_layers_that_do_not_fit():
    head = student_head.HeadConversion("final_proj", "eps", "both", channels=4)
    # a DiT patch projection: 4 positions (p = 2) of 4 eps channels -> 4 positions of x, eps
    teacher = jnp.arange(2 * 16, dtype=jnp.float32).reshape(2, 16)
    got = student_head.convert_output_layer(head, teacher, jnp.zeros((2, 32)))
    got = got.reshape(2, 4, 8)
    np.testing.assert_array_equal(got[..., :4], 0.0)
    np.testing.assert_array_equal(got[..., 4:], teacher.reshape(2, 4, 4))
    with pytest.raises(ValueError, match="does not convert"):
        student_head.convert_output_layer(head, teacher, jnp.zeros((3, 32)))


@pytest.mark.parametrize(
    "teacher, finetune, choice, want",
    [
        ("eps", "", "auto", "snr"),  # eps MSE: the epsilon teacher's own, bounded, error
        ("eps", "v", "auto", "truncated_snr"),  # a fine-tuned v teacher: diffusion's
        ("v", "auto", "auto", "truncated_snr"),
        ("eps", "", "constant", "constant"),
    ],
)
def test_stage_one_weighting(teacher, finetune, choice, want):
    config = _config(teacher, finetune)
    config.stage1.loss_weighting = choice
    assert student_head.stage_one_weighting(config) == want


def test_unknown_stage_one_weighting_refused():
    config = _config("eps")
    config.stage1.loss_weighting = "huber"
    with pytest.raises(ValueError, match="weighting='huber' is unknown"):
        student_head.stage_one_weighting(config)


def test_stage_one_loss_uses_its_weighting():
    """The same draws under 'constant' give the plain target MSE, under 'snr' another loss."""
    from distill_jax.training import distill

    config = _config("eps", finetune="")
    teacher = denoiser.build_model(config.model, data_shape=POINT, num_classes=3, use_guidance=0)
    teacher_params = denoiser.init_params(teacher, jax.random.key(0), data_shape=POINT)
    student = _student(config)
    head = student_head.head_conversion(config, POINT[-1])
    fresh = denoiser.init_params(student, jax.random.key(1), data_shape=POINT)
    params = denoiser.student_params_from_teacher(teacher_params, fresh, head)
    batch = {"x": jnp.ones((8, 3)), "condition": jnp.arange(8) % 3}
    losses = {}
    for name in ("constant", "snr"):
        loss_fn = distill.make_stage_one_loss(
            student,
            lambda p: denoiser.make_denoise_fn(teacher, p),
            null_condition=3,
            diffusion=config.diffusion,
            guidance=config.guidance,
            loss_weighting=name,
        )
        losses[name] = loss_fn(params, batch, jax.random.key(2), teacher_params)
    constant, metrics = losses["constant"]
    np.testing.assert_allclose(constant, metrics["target_mse"], rtol=1e-6)
    assert not np.isclose(float(losses["snr"][0]), float(constant), rtol=1e-3)
    assert float(losses["snr"][1]["target_mse"]) == float(metrics["target_mse"])


def test_student_both_shift_only_for_a_head_converted_from_eps():
    config = _config("eps", finetune="")
    config.model.student_both_shift = -5.0
    assert student_head.student_both_shift(config) == -5.0
    config.model.student_parameterisation = "v"  # a single head: no mixture to shift
    assert student_head.student_both_shift(config) == 0.0
    both = _config("both")
    both.model.student_both_shift = -5.0  # a 'both' teacher's students keep its own mixture
    assert student_head.student_both_shift(both) == 0.0


def test_an_import_keeps_the_runs_student_choices():
    from distill_jax.run import imported

    config = _config("v")
    config.model.student_parameterisation = "x"
    config.model.student_both_shift = -3.0
    keys = {"kind": "dit", "parameterisation": "eps"}
    got = imported.with_import(config, keys, (-10.0, 9.0)).model
    assert (got.kind, got.parameterisation) == ("dit", "eps")  # the folder's network
    assert (got.student_parameterisation, got.student_both_shift) == ("x", -3.0)  # the run's


def test_the_fine_tune_stage_learns_v_and_resumes_to_the_same_weights(tmp_path, caplog):
    """An imported epsilon DiT's teacher_v stage: stopped after 2 of 4 steps and rerun, it
    resumes from its checkpoint to the weights of a run straight through; the checkpoint reads
    as a v network, its rows are in metrics.jsonl, and the imported teacher is untouched."""
    import json
    import logging
    import pathlib

    from distill_jax import parallel
    from distill_jax.config import load_config
    from distill_jax.run import Run, imported
    from distill_jax.training import drivers

    root = pathlib.Path(__file__).resolve().parents[1]
    config = load_config(str(root / "configs" / "digits_dit.py") + ":smoke")
    config.finetune.num_steps, config.finetune.batch_size = 4, 8
    config.train.checkpoint_every = 1
    folder = f"diffusers:{root / 'tests' / 'data' / 'diffusers' / 'dit_digits_eps'}"

    def finetune(name, stop_after=None):
        workdir = tmp_path / name
        run = Run.create(imported.import_teacher(config, workdir, folder), workdir)
        spec = run.stage(stages.FINETUNE_STAGE)
        drivers.train_stage(run, spec, parallel.make_mesh(-1), stop_after=stop_after)
        return run, spec

    straight, spec = finetune("straight")
    assert straight.model(spec).parameterisation == "v"
    finetune("resumed", stop_after=2)
    caplog.set_level(logging.INFO, logger="absl")
    resumed, _ = finetune("resumed")
    log = "\n".join(r.getMessage() for r in caplog.records if "distill_jax" in r.pathname)
    assert f"[{stages.FINETUNE_STAGE}] resumed from step 2." in log
    for which in ("params", "ema_params"):
        a, b = (r.load_params(spec, which=which) for r in (straight, resumed))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
    teacher = straight.load_params(straight.stage("teacher"))
    moved = jax.tree.map(lambda x, y: float(jnp.max(jnp.abs(x - y))), teacher, a)
    assert max(jax.tree.leaves(moved)) > 0  # trained, from a copy: the import is kept
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert [r["step"] for r in rows if r["stage"] == stages.FINETUNE_STAGE][-1] == 4
