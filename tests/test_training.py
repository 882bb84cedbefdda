"""Teacher training: the real command line, kill-and-resume, multi-device equality, errors."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import SUITE_XLA_FLAG

from distill_jax import checkpoints, parallel
from distill_jax.config import load_config
from distill_jax.config_checks import validate_config
from distill_jax.run import Run
from distill_jax.training import drivers, loop

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "digits.py") + ":smoke"


def _cli(workdir, *flags, env_extra=None, wait=True):
    env = dict(os.environ, **(env_extra or {}))
    cmd = [
        sys.executable,
        "-m",
        "distill_jax",
        "train",
        f"--config={SMOKE}",
        f"--workdir={workdir}",
        *flags,
    ]
    if not wait:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _final_params(stage_dir):
    run = Run.open(stage_dir.parent)
    return jax.tree.leaves(run.load_params(run.stage(stage_dir.name), which="params"))


def test_cli_trains_writes_checkpoints_and_resume_after_sigkill_matches(tmp_path):
    steps = ["--config.teacher.num_steps=60", "--config.train.checkpoint_every=10"]
    straight = _cli(tmp_path / "straight", *steps)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    teacher_dir = tmp_path / "straight" / "teacher"
    assert checkpoints.stage_finished(teacher_dir) == {"final_step": 60, "stage": "teacher"}
    assert (tmp_path / "straight" / "config.json").exists()
    records = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").open()]
    assert {"loss", "grad_norm", "learning_rate", "steps_per_s", "images_per_s", "eta_s"} <= set(
        records[-1]
    )
    assert any((tmp_path / "straight" / "logs" / "teacher").iterdir())  # TensorBoard events

    killed_dir = tmp_path / "killed"
    proc = _cli(killed_dir, *steps, wait=False)
    deadline = time.time() + 300
    # Kill as soon as a committed mid-run checkpoint exists (step 10, 20, ...).
    while time.time() < deadline:
        done = [p for p in (killed_dir / "teacher").glob("[0-9]*") if p.name.isdigit()]
        if done or proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert checkpoints.stage_finished(killed_dir / "teacher") is None, "run ended before the kill"
    resumed = _cli(killed_dir, *steps)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from step" in resumed.stdout + resumed.stderr
    for a, b in zip(_final_params(teacher_dir), _final_params(killed_dir / "teacher"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    again = _cli(killed_dir, *steps)  # a finished stage is skipped
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr


def test_a_run_recorded_before_a_schema_key_existed_resumes_with_its_default(tmp_path):
    from distill_jax.run import workdir as workdir_lib

    config = load_config("configs/digits.py:smoke")
    recorded = json.loads(config.to_json())
    del recorded["model"]["student_extra_blocks"]  # as written by an older distill_jax
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    workdir_lib.check_config(config, tmp_path, allow_config_change=False)
    config.model.student_extra_blocks = 1  # not the default: another model
    with pytest.raises(workdir_lib.ConfigMismatchError, match="student_extra_blocks: 0 -> 1"):
        workdir_lib.check_config(config, tmp_path, allow_config_change=False)


def test_reading_a_run_recorded_before_a_schema_key_existed_gives_its_default(tmp_path):
    from distill_jax.run import workdir as workdir_lib

    recorded = json.loads(load_config("configs/digits.py:smoke").to_json())
    del recorded["model"]["student_extra_blocks"]  # as written by an older distill_jax
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    config = workdir_lib.read_config(tmp_path)
    assert config.model.student_extra_blocks == 0
    assert config.model.channel_mult == (1,)  # recorded lists come back as tuples


def test_cli_refuses_model_changing_config_on_resume(tmp_path):
    first = _cli(tmp_path, "--config.teacher.num_steps=2")
    assert first.returncode == 0, first.stderr
    changed = _cli(tmp_path, "--config.teacher.num_steps=2", "--config.model.channels=8")
    assert changed.returncode != 0
    assert "model.channels" in changed.stderr and "--allow_config_change" in changed.stderr
    recorded = json.loads((tmp_path / "config.json").read_text())
    assert recorded["model"]["channels"] == 16  # the record of the existing run is untouched


@pytest.mark.parametrize(
    "bad_flag, message",
    [
        ("--config.data.name=no_such_dataset", "no_such_dataset"),
        ("--config.model.parameterisation=mu", "model.parameterisation"),
        ("--config.stage2.n_start=12", "stage2.n_start"),
    ],
)
def test_cli_bad_input_gives_clear_error(tmp_path, bad_flag, message):
    result = _cli(tmp_path / "w", bad_flag)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr.splitlines()[-1]


def _run_worker(devices, out, config=SMOKE):
    flags = f"{SUITE_XLA_FLAG} --xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags)
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "one_step_worker.py"), config, str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return np.load(out)


def test_one_step_on_1_and_8_devices_agree(tmp_path):
    one = _run_worker(1, tmp_path / "one.npz")
    eight = _run_worker(8, tmp_path / "eight.npz")
    assert int(one["devices"]) == 1 and int(eight["devices"]) == 8
    np.testing.assert_allclose(one["loss"], eight["loss"], rtol=1e-5)
    keys = [k for k in one.files if k.startswith("p")]
    assert len(keys) > 10
    for key in keys:
        np.testing.assert_allclose(one[key], eight[key], rtol=1e-4, atol=1e-6)


def test_batch_not_divisible_by_devices_is_refused(tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"{SUITE_XLA_FLAG} --xla_force_host_platform_device_count=8")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill_jax",
            "train",
            f"--config={SMOKE}",
            f"--workdir={tmp_path}",
            "--config.teacher.batch_size=12",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "batch_size=12" in result.stderr and "8 devices" in result.stderr


def test_validate_config_rejects_bad_values():
    config = load_config(SMOKE)
    validate_config(config)
    config.guidance.w_min, config.guidance.w_max = 3.0, 1.0
    with pytest.raises(ValueError, match="w_min <= w_max"):
        validate_config(config)


def _gmm_teacher_stage(workdir, *, log_every: int):
    """(config, run, spec, loop stage) of the GMM smoke teacher, saving every 5 steps."""
    config = load_config(str(ROOT / "configs" / "gmm.py") + ":smoke")
    config.train.checkpoint_every = 5
    config.train.log_every = log_every
    run = Run.create(config, workdir)
    spec = run.stage("teacher")
    return config, run, spec, drivers.BUILDERS["teacher"](run, spec, None)


def test_nan_guard_names_step_and_keeps_last_good_checkpoint(tmp_path):
    config, run, spec, stage = _gmm_teacher_stage(tmp_path, log_every=1)
    real_loss = stage.loss_fn
    poison_at = 7  # the 8th step (global step 8 after it) produces a NaN loss

    def poisoned_loss(params, batch, rng, teacher):
        loss, aux = real_loss(params, batch, rng, teacher)
        step_is_bad = jnp.all(rng == jax.random.fold_in(jax.random.PRNGKey(config.seed), poison_at))
        return jnp.where(step_is_bad, jnp.nan, loss), aux

    stage.loss_fn = poisoned_loss
    with pytest.raises(loop.NonFiniteError, match=r"step 8.*step 5"):
        loop.run_stage(stage, run, parallel.make_mesh(-1))
    directory = run.directory(spec)
    steps = sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit())
    assert steps == [5]
    assert checkpoints.stage_finished(directory) is None
    abstract = run.abstract_params(spec)
    params = jax.tree.leaves(checkpoints.restore_params(directory, abstract, which="params"))
    assert all(np.isfinite(p).all() for p in params)


def test_nan_guard_checks_the_parameters_it_would_save(tmp_path):
    # A finite loss with exploded parameters (1e30): param_norm, computed from the updated
    # parameters in float32, overflows, so the step is refused before any checkpoint holds them.
    _, run, spec, stage = _gmm_teacher_stage(tmp_path, log_every=5)
    real_init = stage.init_params
    stage.init_params = lambda teacher: jax.tree.map(lambda p: p + 1e30, real_init(teacher))

    def zero_loss(params, batch, rng, teacher):  # finite, and no gradient to change the params
        del batch, rng, teacher
        return sum(jnp.sum(0.0 * p) for p in jax.tree.leaves(params)), {}

    stage.loss_fn = zero_loss
    with pytest.raises(loop.NonFiniteError, match=r"'loss': 0.0.*param_norm': inf.*no checkpoint"):
        loop.run_stage(stage, run, parallel.make_mesh(-1))
    assert not [p for p in run.directory(spec).glob("[0-9]*") if p.name.isdigit()]
