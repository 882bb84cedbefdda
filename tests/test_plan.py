"""`distill-jax plan`: the digits smoke config's real steps compiled for a TPU v5e 2x2 slice.

libtpu describes the slice (no TPU here). The compiled teacher step and students' samplers must
report positive memory and FLOPs, FLOPs that double with the batch and grow with the sampler's
steps, and a batch too large for the chip as not fitting; bad input ends in one line and exit
code 2. A TPU compilation takes seconds even for this model, so only the teacher step and two
samplers are compiled, plus a sampler at twice the batch and the teacher at 32768 times it.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import shutil
import subprocess
import sys

import pytest

from distill_jax import parallel, planning, topologies
from distill_jax.config import load_config
from distill_jax.planning import estimate
from distill_jax.run import imported

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "digits.py") + ":smoke"
SLICE = "v5e-4"  # v5e:2x2
PROGRAMS = ("teacher", "sample/student_0001", "sample/student_0004")


def _plan(overrides: dict | None = None, stages=PROGRAMS) -> dict:
    config = load_config(SMOKE, overrides)
    return planning.plan_run(config, SLICE, stages=stages, log=lambda line: None)


def _programs(plan: dict) -> dict[str, dict]:
    return {entry["name"]: entry for entry in plan["programs"]}


@pytest.fixture(scope="module")
def whole_plan() -> dict:
    return _plan()


@pytest.fixture(scope="module")
def smoke_plan(whole_plan) -> dict[str, dict]:
    return _programs(whole_plan)


def test_memory_flops_and_times_are_consistent(smoke_plan):
    assert set(smoke_plan) == set(PROGRAMS)
    for entry in smoke_plan.values():
        assert entry["fits"] and not entry["problem"], entry
        assert 0 < entry["total_bytes"] < entry["hbm_bytes"] == 16 * 1024**3
        assert entry["argument_bytes"] > 0 and entry["flops"] > 0 and entry["bytes_accessed"] > 0
        roofline = max(entry["flops"] / 197e12, entry["bytes_accessed"] / 819e9)
        assert entry["seconds"] == pytest.approx(roofline)
    teacher = smoke_plan["teacher"]
    # The train state (params, EMA, two Adam moments) is an argument, donated to the output.
    assert teacher["alias_bytes"] > 0
    assert teacher["calls"] == 20 and teacher["stage_seconds"] == pytest.approx(
        20 * teacher["seconds"]
    )
    assert teacher["images_per_s"] == pytest.approx(32 / 4 / teacher["seconds"])


def test_sampler_flops_grow_with_its_steps(smoke_plan):
    # XLA counts a fori_loop's body once; the plan multiplies it by the steps. Were XLA to
    # count the trips itself, this ratio would be 16.
    one, four = smoke_plan["sample/student_0001"], smoke_plan["sample/student_0004"]
    assert four["flops"] / one["flops"] == pytest.approx(4.0, rel=0.05)


def test_flops_double_with_the_batch(smoke_plan):
    # The 1-step sampler (a train step would cost a second teacher compilation, ~3x longer).
    config = load_config(SMOKE)
    stages = ("sample/student_0001",)
    plan = planning.plan_run(config, SLICE, stages=stages, sample_batch=128, log=lambda _: None)
    doubled = _programs(plan)["sample/student_0001"]
    ratio = doubled["flops"] / smoke_plan["sample/student_0001"]["flops"]
    assert 1.95 < ratio < 2.05, ratio


def test_a_batch_too_large_for_the_chip_does_not_fit(monkeypatch):
    # 2^20 images of 8x8: 2^18 per chip, whose activations alone exceed 16 GiB; a larger
    # 'fsdp' axis shards only the (small) train state, so no mesh is offered. (Microbatches
    # would fit: tests/test_microbatches.py plans them on this CPU, where they compile in
    # seconds; a fitting TPU compile of these shapes takes two minutes.)
    monkeypatch.setattr(planning.plan, "MAX_SAVER_TRIES", 0)
    entry = _programs(_plan({"teacher.batch_size": 2**20}, stages=("teacher",)))["teacher"]
    assert not entry["fits"] and entry["total_bytes"] > 16 * 1024**3
    assert "does not fit with fsdp sizes tried (none" in entry["advice"]


def test_fsdp_advice_shards_the_state_only():
    # 20 GiB in all, 12 GiB of it train state: on 8 chips of 16 GiB, fsdp 2 leaves
    # 20 - 12 * 1/2 = 14 GiB; the state alone cannot go below the 8 GiB of activations.
    gib = 1024**3
    result = estimate.Estimate("teacher", "train", 8, 1, total_bytes=20 * gib, hbm_bytes=16 * gib)
    assert estimate.fsdp_candidates(result, fsdp=1, chips=8, state_bytes=12 * gib) == [2, 4, 8]
    result.total_bytes = 30 * gib
    assert estimate.fsdp_candidates(result, fsdp=1, chips=8, state_bytes=12 * gib) == []


def test_catalogue_names_what_gcloud_rents_and_libtpu_describes():
    assert topologies.topology("v4-32").chips == 16  # v4 names count TensorCores
    assert topologies.topology("v5litepod-8") == topologies.topology("v5e-8")
    assert topologies.topology("v5p-512").libtpu_name == "v5:4x8x8"  # 256 chips
    topologies.abstract_devices(topologies.topology(SLICE))  # loads libtpu's description
    assert topologies.describable() == list(topologies.TOPOLOGIES)


def test_every_fsdp_size_makes_a_mesh_on_a_3d_torus():
    """v5p-128 is a 4x4x4 torus: fsdp 2 does not factor its axes, and the mesh splits one
    (was a NotImplementedError traceback out of `plan`'s advice)."""
    devices = topologies.abstract_devices(topologies.topology("v5p-128"))
    for fsdp in (1, 2, 4, 8, 16, 32, 64):
        mesh = parallel.make_mesh(len(devices) // fsdp, fsdp=fsdp, devices=devices)
        assert dict(mesh.shape) == {"data": len(devices) // fsdp, "fsdp": fsdp}


def _cli(*args: str, cwd: pathlib.Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distill_jax", "plan", f"--config={SMOKE}", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


BAD_INPUT = {
    "unknown topology": (("--topology=v9-16",), "--topology='v9-16' is unknown: accepted v4-8"),
    "mesh not dividing": (("--topology=v5e-4", "--mesh=3x1"), "the slice has 4 chips"),
    "fsdp not dividing": (("--topology=v5e-4", "--mesh=-1x3"), "fsdp size of 3 does not divide"),
    "config not building": (
        ("--topology=v5e-4", "--config.model.channel_mult=(1,2,2,2,2)"),
        "image size 8x8 is not divisible",
    ),
    "no topology": ((), "plan needs --topology"),
    "no import for an imported network": (
        ("--topology=v5e-4", f"--config={ROOT / 'configs' / 'sd_digits.py'}:smoke"),
        "plan it with --teacher=diffusers:DIR",
    ),
}


def test_table_and_json(whole_plan, tmp_path):
    table = planning.format_plan(whole_plan)
    assert "v5e-4 (v5e:2x2): 4 chips, mesh data=4 x fsdp=1" in table
    assert all(name in table for name in PROGRAMS) and "cloud.google.com/tpu/docs/v5e" in table
    # A figure not measured (NaN) is written as null: the file is valid JSON.
    whole_plan = dict(whole_plan, unmeasured=float("nan"))
    path = planning.write_plan(whole_plan, tmp_path / "plan.json")
    strict = json.loads(pathlib.Path(path).read_text(), parse_constant=lambda name: 1 / 0)
    assert strict["unmeasured"] is None
    assert json.loads(pathlib.Path(path).read_text())["programs"] == json.loads(
        json.dumps(whole_plan["programs"])
    )


def test_an_imported_pipeline_is_planned_from_its_json_files(tmp_path):
    """A pipeline folder without its weights (JSON and tokenizer files only, as before the
    download) plans: the U-Net's sizes come from its config, the imported teacher is not a
    stage to train, and the text encoder's weights are not needed."""
    folder = tmp_path / "sd_digits_tiny"
    shutil.copytree(ROOT / "tests" / "data" / "diffusers" / "sd_digits_tiny", folder)
    for weights in folder.glob("*/*.safetensors"):
        weights.unlink()
    config = load_config(str(ROOT / "configs" / "sd_digits.py") + ":smoke")
    config = imported.plan_config(config, f"diffusers:{folder}")
    assert config.model.kind == "sd_unet" and config.text.max_tokens == 16
    plan = planning.plan_run(config, "cpu", stages=("teacher", "stage1"), log=lambda line: None)
    (stage1,) = plan["programs"]
    assert stage1["name"] == "stage1" and stage1["fits"] and stage1["flops"] > 0


def test_bad_input_is_one_line(tmp_path):
    """Through the CLI (nothing compiles): one line on stderr, exit code 2."""
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = {
            name: pool.submit(_cli, *args, cwd=tmp_path) for name, (args, _) in BAD_INPUT.items()
        }
    for name, future in futures.items():
        result = future.result()
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert lines[-1].startswith("distill-jax plan: error: "), (name, lines)
        assert BAD_INPUT[name][1] in lines[-1], (name, lines[-1])
        assert "Traceback" not in result.stderr and "libtpu" not in result.stderr.lower(), name
