"""Bad input through the real CLI and run_sampler.py: one clear line, exit 2, nothing changed.

Each case is a command line (and, where needed, a damaged file) that a user could type. For
every case the test asserts the exit code, that the last line of stderr names the bad value and
what is accepted, that no traceback is printed, and that no file of the finished smoke workdir
or of the exported artifact changed (contents and modification times). The commands run once
per session, each in its own process forked after the imports they share (tests/cli_forks.py);
each parametrized test checks its own result.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from conftest import snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "digits.py") + ":smoke"


def _files(root: pathlib.Path, run: pathlib.Path) -> dict[str, pathlib.Path]:
    """Input files, good and damaged, that the cases refer to."""
    root.mkdir(parents=True, exist_ok=True)
    images = np.zeros((4, 8, 8, 1), np.uint8)
    paths = {
        "good_npz": root / "good.npz",
        "bad_labels_npz": root / "bad_labels.npz",
        "wrong_shape_npz": root / "wrong_shape.npz",
        "truncated_npz": root / "truncated.npz",
        "text_npz": root / "text.npz",
        "no_images_npz": root / "no_images.npz",
        "mask_npy": root / "mask.npy",
        "mask_wrong_shape": root / "mask_wrong.npz",
        "mask_no_key": root / "mask_no_key.npz",
        "not_a_run": root / "not_a_run",
        "other_dir": root / "other_dir",
        "corrupt_config_run": root / "corrupt_config_run",
        "corrupt_finished_run": root / "corrupt_finished_run",
        "damaged_checkpoint_run": root / "damaged_checkpoint_run",
    }
    np.savez(paths["good_npz"], images=images, labels=np.arange(4, dtype=np.int32))
    np.savez(paths["bad_labels_npz"], images=images, labels=np.array([1, 11, 2, 99], np.int32))
    np.savez(paths["wrong_shape_npz"], images=np.zeros((4, 16, 16, 1), np.uint8))
    paths["truncated_npz"].write_bytes(paths["good_npz"].read_bytes()[:100])
    paths["text_npz"].write_text("not an archive")
    np.savez(paths["no_images_npz"], something=np.zeros(3))
    np.save(paths["mask_npy"], np.ones((8, 8, 1), np.float32))
    np.savez(paths["mask_wrong_shape"], mask=np.ones((5, 5, 1), np.float32))
    np.savez(paths["mask_no_key"], other=np.ones((8, 8, 1), np.float32))
    paths["not_a_run"].mkdir(exist_ok=True)
    (paths["other_dir"] / "keep.txt").parent.mkdir(exist_ok=True)
    (paths["other_dir"] / "keep.txt").write_text("precious")
    shutil.copytree(run, paths["corrupt_config_run"], dirs_exist_ok=True)
    (paths["corrupt_config_run"] / "config.json").write_text("{ not json")
    shutil.copytree(run, paths["corrupt_finished_run"], dirs_exist_ok=True)
    (paths["corrupt_finished_run"] / "stage2" / "steps_0004" / "FINISHED.json").write_text("{")
    shutil.copytree(run, paths["damaged_checkpoint_run"], dirs_exist_ok=True)
    # Every data file of the 4-step student cut in half: the per-process ones and the merged
    # root's, which Orbax writes on some saves and not others.
    student = paths["damaged_checkpoint_run"] / "stage2" / "steps_0004"
    data_files = list(student.glob("*/state/**/d/*"))
    assert data_files, f"no Orbax data files under {student}"
    for data_file in data_files:
        data_file.write_bytes(data_file.read_bytes()[: data_file.stat().st_size // 2])
    return paths


T = ["train", f"--config={SMOKE}", "--workdir={new}"]
D = ["distill", f"--config={SMOKE}", "--workdir={new}"]
S = ["sample", "--workdir={run}", "--steps=4", "--guidance=1", "--out={tmp}/s.npz"]
E = ["export", "--workdir={run}", "--steps=4"]
R = ["RUN_SAMPLER", "{artifact}"]

# (id, command, what the last stderr line must contain). Every case must exit with code 2.
CASES = [
    # The command line itself.
    ("no_command", ["--workdir={new}"], "Expected exactly one command"),
    ("unknown_command", ["fly", "--workdir={new}"], "Unknown command 'fly'"),
    ("no_workdir", ["train", f"--config={SMOKE}"], "--workdir is required"),
    ("no_config", ["train", "--workdir={new}"], "--config is required"),
    ("unknown_flag", [*T, "--colour=blue"], "colour"),
    (
        "sample_without_steps",
        ["sample", "--workdir={run}", "--guidance=1", "--out={tmp}/s"],
        "--steps",
    ),
    ("export_without_out", ["export", "--workdir={run}", "--steps=4"], "--out"),
    # Config files, variants and keys.
    ("missing_config_file", ["train", "--config=configs/nope.py", "--workdir={new}"], "nope.py"),
    ("unknown_variant", ["train", "--config=configs/digits.py:huge", "--workdir={new}"], "huge"),
    ("unknown_key", [*T, "--config.teacher.no_such_key=1"], "no_such_key"),
    ("key_of_wrong_type", [*T, "--config.teacher.num_steps=abc"], "num_steps"),
    # Config values: every count, range and finite number is checked before anything is written.
    ("negative_teacher_steps", [*T, "--config.teacher.num_steps=-5"], "teacher.num_steps=-5"),
    ("zero_teacher_steps", [*T, "--config.teacher.num_steps=0"], "teacher.num_steps=0"),
    ("nan_lr", [*T, "--config.stage1.optimizer.learning_rate=nan"], "learning_rate=nan"),
    ("w_min_above_w_max", [*T, "--config.guidance.w_min=5"], "w_min <= w_max"),
    ("n_start_not_power", [*D, "--config.stage2.n_start=12"], "n_start"),
    ("exact_gmm_on_digits", [*T, "--config.teacher.kind=exact_gmm"], "exact_gmm"),
    (
        "negative_extra_blocks",
        [*T, "--config.model.student_extra_blocks=-1"],
        "student_extra_blocks=-1",
    ),
    (
        "extra_blocks_on_mlp",
        [
            "distill",
            "--config=" + str(ROOT / "configs" / "gmm.py") + ":smoke",
            "--workdir={new}",
            "--config.model.student_extra_blocks=1",
        ],
        "only ('unet',) grow extra blocks",
    ),
    ("text_on_class_data", [*T, "--config.text.enabled=True"], "text.enabled=True"),
    (
        "no_t5_tokens",
        [
            "run",
            "--config=" + str(ROOT / "configs" / "sd3_digits.py") + ":smoke",
            "--workdir={new}",
            "--config.text.max_sequence_length=0",
            "--teacher=diffusers:" + str(ROOT / "tests" / "data" / "diffusers" / "sd3_tiny"),
        ],
        "text.max_sequence_length=0 is invalid: accepted an integer >= 1",
    ),
    ("unknown_dataset", [*T, "--config.data.name=no_such_dataset_xyz"], "no_such_dataset_xyz"),
    # Workdirs and their records.
    (
        "corrupt_config_json",
        [
            "sample",
            "--workdir={corrupt_config_run}",
            "--steps=4",
            "--guidance=1",
            "--out={tmp}/s.npz",
        ],
        "config.json",
    ),
    (
        "changed_model",
        ["train", f"--config={SMOKE}", "--workdir={run}", "--config.model.channels=8"],
        "--allow_config_change",
    ),
    (
        "not_a_run",
        ["sample", "--workdir={not_a_run}", "--steps=4", "--guidance=1", "--out={tmp}/s.npz"],
        "not a run directory",
    ),
    (
        "corrupt_finished_json",
        [
            "sample",
            "--workdir={corrupt_finished_run}",
            "--steps=4",
            "--guidance=1",
            "--out={tmp}/s.npz",
        ],
        "FINISHED.json",
    ),
    ("missing_teacher_dir", [*D, "--teacher={tmp}/no_teacher"], "no_teacher"),
    (
        "damaged_student_checkpoint",
        [
            "sample",
            "--workdir={damaged_checkpoint_run}",
            "--steps=4",
            "--guidance=1",
            "--out={tmp}/s.npz",
        ],
        "cannot be read",
    ),
    (
        "export_damaged_student_checkpoint",
        ["export", "--workdir={damaged_checkpoint_run}", "--steps=4", "--out={tmp}/x"],
        "cannot be read",
    ),
    ("evaluate_not_a_run", ["evaluate", "--workdir={not_a_run}"], "not a run directory"),
    # sample.
    ("no_such_student", [*S[:2], "--steps=3", *S[3:]], "1, 2, 4, 8"),
    ("zero_steps", [*S[:2], "--steps=0", *S[3:]], "--steps=0"),
    ("nan_guidance", [*S[:3], "--guidance=nan", S[4]], "guidance=nan"),
    ("teacher_nan_guidance", [*S, "--model=teacher", "--guidance=nan"], "guidance=nan"),
    (
        "negative_prompt_on_class_labels",
        [*S, "--model=teacher", "--negative_prompt=blurry"],
        "--negative_prompt needs a text run",
    ),
    ("guidance_out_of_range", [*S[:3], "--guidance=99", S[4]], "trained range"),
    ("zero_num", [*S, "--num=0"], "num=0"),
    ("num_beyond_memory", [*S, "--num=100000000000"], "of memory, and"),
    ("prompt_on_class_run", [*S, "--prompt=a thick seven"], "conditions on class labels"),
    ("schedule_outside_unit", [*S, "--guidance_schedule=interval:0.5,1.5"], "0 <= LO <= HI"),
    ("schedule_reversed", [*S, "--guidance_schedule=interval:0.8,0.2"], "interval [0.8, 0.2]"),
    ("schedule_unknown", [*S, "--guidance_schedule=cosine"], "accepted 'constant'"),
    (
        "schedule_leaves_trained_range",
        [*S[:3], "--guidance=3", S[4], "--guidance_schedule=ramp:0,2"],
        "per-step weights 0..4.5",
    ),
    ("export_bad_schedule", [*E, "--out={tmp}/x", "--guidance_schedule=ramp:1"], "ramp:1"),
    ("label_out_of_range", [*S, "--labels=10"], "labels"),
    ("label_not_integer", [*S, "--labels=a"], "labels"),
    ("missing_init", [*S, "--init={tmp}/none.npz"], "none.npz"),
    ("truncated_init", [*S, "--init={truncated_npz}"], "truncated.npz"),
    ("text_init", [*S, "--init={text_npz}"], "text.npz"),
    ("init_without_images", [*S, "--init={no_images_npz}"], "no_images.npz"),
    ("init_labels_out_of_range", [*S, "--init={bad_labels_npz}", "--t_start=0.5"], "11"),
    ("init_wrong_shape", [*S, "--init={wrong_shape_npz}", "--t_start=0.5"], "shape"),
    ("unknown_mask", [*S, "--init={good_npz}", "--mask=diagonal"], "left"),
    ("mask_npy", [*S, "--init={good_npz}", "--mask={mask_npy}"], "mask.npy"),
    ("mask_wrong_shape", [*S, "--init={good_npz}", "--mask={mask_wrong_shape}"], "shape"),
    ("mask_without_key", [*S, "--init={good_npz}", "--mask={mask_no_key}"], "mask"),
    ("mask_without_init", [*S, "--mask=left"], "--init"),
    ("t_start_zero", [*S, "--init={good_npz}", "--t_start=0"], "t_start=0"),
    ("t_start_above_one", [*S, "--init={good_npz}", "--t_start=1.5"], "t_start=1.5"),
    ("t_start_without_init", [*S, "--t_start=0.5"], "init"),
    # export.
    ("export_over_the_workdir", [*E, "--out={run}", "--overwrite"], "not a distill_jax"),
    ("export_over_other_dir", [*E, "--out={other_dir}", "--overwrite"], "not a distill_jax"),
    ("export_existing_out", [*E, "--out={other_dir}"], "exists"),
    (
        "export_no_such_student",
        ["export", "--workdir={run}", "--steps=3", "--out={tmp}/x"],
        "1, 2, 4, 8",
    ),
    ("export_zero_batch", [*E, "--out={tmp}/x", "--batch_size=0"], "batch_size=0"),
    ("export_unknown_platform", [*E, "--out={tmp}/x", "--platforms=rocm"], "rocm"),
    # run_sampler.py of an exported artifact.
    ("sampler_missing_artifact", ["RUN_SAMPLER", "{tmp}/no_artifact"], "no_artifact"),
    ("sampler_w_out_of_range", [*R, "--w", "99"], "99"),
    ("sampler_w_nan", [*R, "--w", "nan"], "nan"),
    ("sampler_label_out_of_range", [*R, "--label", "99"], "99"),
    ("sampler_zero_num", [*R, "--num", "0"], "num"),
    ("sampler_tampered_file_name", ["RUN_SAMPLER", "{tampered}"], "weights.npz"),
    ("sampler_damaged_weights", ["RUN_SAMPLER", "{damaged}"], "weights.npz is damaged"),
]

# Config values checked in-process (the same `validate_config` the CLI runs before anything is
# written; the CLI table above keeps a few of them end to end): (id, key, value, message).
CONFIG_VALUE_CASES = [
    ("zero_stage1_steps", "stage1.num_steps", 0, "stage1.num_steps=0"),
    ("zero_round_steps", "stage2.steps_per_round", 0, "stage2.steps_per_round=0"),
    ("zero_final_steps", "stage2.final_steps_per_round", 0, "final_steps_per_round=0"),
    ("negative_final_rounds", "stage2.final_rounds", -1, "stage2.final_rounds=-1"),
    ("nan_final_lr", "stage2.final_learning_rate", float("nan"), "final_learning_rate=nan"),
    ("zero_batch", "teacher.batch_size", 0, "teacher.batch_size=0"),
    ("negative_lr", "teacher.optimizer.learning_rate", -1, "learning_rate=-1"),
    ("inf_lr", "stage2.optimizer.learning_rate", float("inf"), "learning_rate=inf"),
    ("negative_warmup", "teacher.optimizer.warmup_steps", -1, "warmup_steps=-1"),
    ("unknown_decay", "teacher.optimizer.decay", "exponential", "exponential"),
    ("ema_above_one", "teacher.optimizer.ema_decay", 1.5, "ema_decay=1.5"),
    ("negative_clip", "teacher.optimizer.grad_clip", -1, "grad_clip=-1"),
    ("negative_weight_decay", "stage1.optimizer.weight_decay", -0.1, "weight_decay"),
    ("nan_w_max", "guidance.w_max", float("nan"), "w_max=nan"),
    ("w_min_below_minus_one", "guidance.w_min", -3, "w_min=-3"),
    ("p_uncond_above_one", "diffusion.p_uncond", 1.5, "p_uncond=1.5"),
    ("logsnr_order", "diffusion.logsnr_min", 30, "logsnr_min=30"),
    ("unknown_weighting", "diffusion.loss_weighting", "foo", "foo"),
    ("unknown_model_kind", "model.kind", "transformer", "transformer"),
    ("unknown_parameterisation", "model.parameterisation", "z", "parameterisation='z'"),
    ("unknown_dtype", "model.dtype", "int8", "int8"),
    ("unknown_guidance_head", "model.guidance_head", "quadratic", "guidance_head='quadratic'"),
    ("zero_channels", "model.channels", 0, "model.channels=0"),
    ("dropout_above_one", "model.dropout", 1.5, "dropout=1.5"),
    ("n_end_zero", "stage2.n_end", 0, "n_start"),
    ("zero_checkpoint_every", "train.checkpoint_every", 0, "checkpoint_every=0"),
    ("zero_keep", "train.keep_checkpoints", 0, "keep_checkpoints=0"),
    ("zero_log_every", "train.log_every", 0, "log_every=0"),
    ("zero_fsdp", "train.mesh_fsdp_axis", 0, "mesh_fsdp_axis=0"),
    ("zero_eval_samples", "eval.num_samples", 0, "eval.num_samples=0"),
    ("zero_eval_seeds", "eval.seeds", 0, "eval.seeds=0"),
    ("nan_eval_weight", "eval.guidance_weights", (0.0, float("nan")), "guidance_weights"),
]


@pytest.mark.parametrize(
    "case_id, key, value, expected", CONFIG_VALUE_CASES, ids=[c[0] for c in CONFIG_VALUE_CASES]
)
def test_config_value_is_refused_naming_key_and_value(case_id, key, value, expected):
    from distill_jax import config as config_lib
    from distill_jax import config_checks

    config = config_lib.load_config(SMOKE, {key: value})
    with pytest.raises(ValueError, match=re.escape(expected)):
        config_checks.validate_config(config)


def _artifacts(root: pathlib.Path, run: pathlib.Path) -> dict[str, pathlib.Path]:
    """An exported 4-step sampler, a copy whose metadata names a file outside it, a damaged one."""
    from distill_jax import export

    artifact = root / "artifact"
    export.export_sampler(run, steps=4, out=artifact, platforms=("cpu",))
    tampered, damaged = root / "tampered", root / "damaged"
    shutil.copytree(artifact, tampered)
    metadata = json.loads((tampered / "metadata.json").read_text())
    metadata["weights"]["file"] = "../artifact/weights.npz"
    (tampered / "metadata.json").write_text(json.dumps(metadata))
    shutil.copytree(artifact, damaged)
    weights = (damaged / "weights.npz").read_bytes()
    (damaged / "weights.npz").write_bytes(weights[:-100] + bytes(100))
    return {"artifact": artifact, "tampered": tampered, "damaged": damaged}


def _command(case_id: str, argv: list[str], names: dict[str, pathlib.Path], root: pathlib.Path):
    scratch = root / "cases" / case_id
    scratch.mkdir(parents=True)
    values = {key: str(path) for key, path in names.items()}
    values.update(tmp=str(scratch), new=str(scratch / "new_workdir"))
    argv = [arg.format(**values) for arg in argv]
    if argv[0] == "RUN_SAMPLER":
        loader = names["artifact"] / "run_sampler.py"
        return ["SCRIPT", str(loader), *argv[1:], "--out", str(scratch / "out.npy")]
    return argv


@pytest.fixture(scope="session")
def bad_input_results(smoke_workdir, tmp_path_factory):
    """{case id: (completed process, scratch dir)} plus the watched trees before and after."""
    root = tmp_path_factory.mktemp("bad_inputs")
    run = root / "run"
    shutil.copytree(smoke_workdir, run)
    names = {"run": run, **_files(root / "files", run), **_artifacts(root, run)}
    watched = [run, root / "files", names["artifact"], names["tampered"], names["damaged"]]
    before = [snapshot(d) for d in watched]
    # The classifier cache and XLA cache stay as the smoke run left them.
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    outputs = root / "outputs"
    outputs.mkdir()
    cases = [
        {"id": case_id, "argv": _command(case_id, argv, names, root), "out": str(outputs / case_id)}
        for case_id, argv, _ in CASES
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    # Each command line runs in its own process, forked after the imports they all share.
    server = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "cli_forks.py"), str(root / "cases.json")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert server.returncode == 0, server.stderr[-3000:]
    results = {
        case["id"]: types.SimpleNamespace(**json.loads(pathlib.Path(case["out"]).read_text()))
        for case in cases
    }
    after = [snapshot(d) for d in watched]
    return results, before, after, root


def test_at_least_sixty_distinct_bad_inputs():
    assert len(CASES) >= 60
    assert len({case_id for case_id, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("case_id, argv, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gives_one_clear_line(bad_input_results, case_id, argv, expected):
    results, _, _, root = bad_input_results
    result = results[case_id]
    stderr = result.stderr.strip()
    last = stderr.splitlines()[-1] if stderr else ""
    assert result.returncode == 2, (result.returncode, stderr[-2000:])
    assert "Traceback" not in stderr, stderr[-3000:]
    assert expected in last, last
    assert ": error: " in last, last
    scratch = root / "cases" / case_id
    assert not (scratch / "new_workdir").exists()  # nothing was created for a refused run
    assert sorted(p.name for p in scratch.iterdir()) == [], list(scratch.iterdir())


def test_bad_inputs_changed_nothing(bad_input_results):
    _, before, after, _ = bad_input_results
    assert after == before
