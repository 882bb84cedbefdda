"""Multi-process training: 2 local processes equal 1, a dead process ends the job, FSDP.

The end-to-end runs go through launch/local.py (2 processes x 2 fake CPU devices, gloo
collectives) on the Gaussian-mixture smoke config, whose MLP keeps them to seconds of compute.
"""

import importlib.util
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import SUITE_XLA_FLAG
from jax.sharding import PartitionSpec

from distill_jax import checkpoints, parallel
from distill_jax.config import load_config
from distill_jax.data.loader import make_train_loader
from distill_jax.run import Run
from distill_jax.run.workdir import LABELS_FILE, LATENTS_FILE
from distill_jax.training import drivers

ROOT = pathlib.Path(__file__).resolve().parents[1]
GMM_SMOKE = str(ROOT / "configs" / "gmm.py") + ":smoke"
# One stage-two round only (8 -> 4 sampling steps).
ONE_ROUND = {"stage2.n_end": 4}
STAGES = ("teacher", "stage1", "stage2/steps_0004")


def _load_local_launcher():
    spec = importlib.util.spec_from_file_location("launch_local", ROOT / "launch" / "local.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


local = _load_local_launcher()


def _launch(*command: str, processes: int = 2, devices: int = 2) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch" / "local.py"),
            f"--num_processes={processes}",
            f"--devices_per_process={devices}",
            "--grace_s=60",
            "--",
            *command,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )


def _leaves(workdir: pathlib.Path, stage: str, which: str) -> list[np.ndarray]:
    run = Run.open(workdir)
    params = run.load_params(run.stage(stage), which=which)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]


@pytest.mark.slow
def test_two_processes_match_one_process_through_teacher_stage_one_and_stage_two(tmp_path):
    multi = tmp_path / "two_processes"
    flags = [f"--config={GMM_SMOKE}", f"--workdir={multi}", "--config.stage2.n_end=4"]
    train = _launch("train", *flags)
    assert train.returncode == 0, train.stdout + train.stderr
    p0 = [line for line in train.stdout.splitlines() if line.startswith("[p0] ")]
    assert any("[teacher] step 20/20" in line for line in p0), train.stdout[-3000:]
    # Stage one and the stage-two round also shard params over a 2-wide 'fsdp' axis
    # (mesh 2 x 2 across both processes): the result must not change.
    distill = _launch("distill", *flags, "--config.train.mesh_fsdp_axis=2")
    assert distill.returncode == 0, distill.stdout + distill.stderr

    single = tmp_path / "one_process"
    config = load_config(GMM_SMOKE, ONE_ROUND)
    drivers.train_teacher(config, single)
    drivers.distill_stages(config, single)

    for stage in STAGES:
        assert checkpoints.stage_finished(multi / stage)["final_step"] > 0
        for which in ("params", "ema_params"):
            got, want = _leaves(multi, stage, which), _leaves(single, stage, which)
            assert len(got) == len(want) > 4
            for a, b in zip(got, want, strict=True):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"{stage} {which}")
    # Each process saved its own data-iterator position.
    final = max(int(p.name) for p in (multi / "teacher").iterdir() if p.name.isdigit())
    data_files = sorted(p.name for p in (multi / "teacher" / str(final) / "data").glob("*.json"))
    assert data_files == ["process_0-of-2.json", "process_1-of-2.json"]
    # Only process 0 wrote metrics: every (stage, step) once, the same records as one process.
    records = [json.loads(line) for line in (multi / "metrics.jsonl").open()]
    keys = [(r["stage"], r["step"]) for r in records]
    assert len(keys) == len(set(keys))
    single_keys = [
        (r["stage"], r["step"]) for r in map(json.loads, (single / "metrics.jsonl").open())
    ]
    assert keys == single_keys
    assert json.loads((multi / "config.json").read_text())["train"]["mesh_fsdp_axis"] == 2


@pytest.mark.slow
def test_killed_process_makes_the_other_exit_with_an_error(tmp_path):
    # Killing process 1 leaves process 0 waiting in a collective until the coordination
    # service (hosted by process 0) misses process 1's heartbeats; killing process 0 instead
    # ends process 1 at once (its coordinator connection drops), so this is the slower case.
    victim = 1
    lines: list[str] = []

    class Sink:
        def write(self, text):
            lines.append(text)

        def flush(self):
            pass

    job = local.start(
        [
            "train",
            f"--config={GMM_SMOKE}",
            f"--workdir={tmp_path}",
            "--config.teacher.num_steps=1000000",
            "--config.train.log_every=5",
        ],
        num_processes=2,
        devices_per_process=1,
        heartbeat_timeout_s=5,
        cwd=str(ROOT),
        sink=Sink(),
    )
    survivor = job.processes[1 - victim]
    try:
        deadline = time.monotonic() + 180
        while not any("[teacher] step 5/" in line for line in lines):
            assert time.monotonic() < deadline, "training did not start:\n" + "".join(lines)
            assert all(p.poll() is None for p in job.processes), "".join(lines)
            time.sleep(0.1)
        os.kill(job.pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        code = survivor.wait(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc in job.processes:
            if proc.poll() is None:
                proc.kill()
    assert code != 0
    assert elapsed < 60
    survivor_lines = "".join(line for line in lines if line.startswith(f"[p{1 - victim}]"))
    # Either a collective fails at once (Gloo sees the closed socket) and the survivor leaves
    # with one line naming the lost process, exit 3; or it waits (in a collective, or in
    # Orbax's commit barrier) until the coordination service misses the victim's heartbeats and
    # aborts it from C++, where no Python runs; the two can also race.
    if "JAX distributed service detected fatal errors" not in survivor_lines:
        assert code == 3, survivor_lines
        assert f"process {1 - victim} of 2 lost contact with another process" in survivor_lines
        assert "Traceback" not in survivor_lines, survivor_lines


FSDP_WORKER = """
import json, pathlib, sys
import jax, numpy as np
from distill_jax import parallel
from distill_jax.config import load_config
from distill_jax.run import Run
from distill_jax.training import drivers

config = load_config(sys.argv[1], {"teacher.num_steps": 15, "model.mlp_hidden": 64})
out = {}
for fsdp in (1, 2):
    workdir = pathlib.Path(sys.argv[2]) / f"fsdp{fsdp}"
    config.train.mesh_fsdp_axis = fsdp
    mesh = parallel.make_mesh(-1, fsdp=fsdp)
    run = Run.create(config, workdir)
    state = drivers.train_stage(run, run.stage("teacher"), mesh)
    specs = [str(leaf.sharding.spec) for leaf in jax.tree.leaves(state.opt_state)
             if hasattr(leaf, "sharding")]
    out[fsdp] = {
        "mesh": dict(mesh.shape),
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
        "specs": [str(x.sharding.spec) for x in jax.tree.leaves(state.params)],
        "opt_specs": specs,
    }
json.dump(out, open(pathlib.Path(sys.argv[2]) / "out.json", "w"))
"""


@pytest.mark.slow
def test_fsdp_on_a_2x2_mesh_trains_and_matches_data_parallelism(tmp_path):
    env = dict(os.environ, XLA_FLAGS=f"{SUITE_XLA_FLAG} --xla_force_host_platform_device_count=4")
    result = subprocess.run(
        [sys.executable, "-c", FSDP_WORKER, GMM_SMOKE, str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    dp, fsdp = out["1"], out["2"]
    assert dp["mesh"] == {"data": 4, "fsdp": 1} and fsdp["mesh"] == {"data": 2, "fsdp": 2}
    assert not any("fsdp" in spec for spec in dp["specs"])
    # Every weight matrix and the Adam moments are split over 'fsdp'.
    assert sum("fsdp" in spec for spec in fsdp["specs"]) >= len(fsdp["specs"]) // 2
    assert any("fsdp" in spec for spec in fsdp["opt_specs"])
    for a, b in zip(dp["params"], fsdp["params"], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
    assert checkpoints.stage_finished(tmp_path / "fsdp2" / "teacher")["final_step"] == 15


def test_process_batches_are_contiguous_blocks_of_the_single_process_batch():
    data = load_config(GMM_SMOKE).data
    single = make_train_loader(data, batch_size=8, seed=3, process_index=0, process_count=1)
    shards = [
        make_train_loader(data, batch_size=8, seed=3, process_index=p, process_count=4)
        for p in range(4)
    ]
    for _ in range(50):
        full = next(single)
        parts = [next(s) for s in shards]
        for key in ("x", "condition"):
            # Concatenated in process order, exactly the batch one process would load.
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), full[key])


@pytest.mark.parametrize(
    ("shape", "fsdp", "spec"),
    [
        ((32, 64), 2, PartitionSpec(None, "fsdp")),
        ((64, 32), 2, PartitionSpec("fsdp", None)),
        ((3, 3, 16, 16), 4, PartitionSpec(None, None, "fsdp", None)),
        ((5, 7), 2, PartitionSpec()),
        ((), 2, PartitionSpec()),
        ((32, 64), 1, PartitionSpec()),
    ],
)
def test_fsdp_spec_splits_the_largest_divisible_axis(shape, fsdp, spec):
    assert parallel.fsdp_spec(shape, fsdp) == spec


def test_make_mesh_refuses_an_fsdp_size_that_does_not_divide_the_devices():
    with pytest.raises(ValueError, match="mesh_fsdp_axis=0"):
        parallel.make_mesh(-1, fsdp=0)
    with pytest.raises(ValueError, match=f"mesh_fsdp_axis={len(jax.devices()) + 1}"):
        parallel.make_mesh(-1, fsdp=len(jax.devices()) + 1)


def test_initialize_distributed_reads_the_environment(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in ("SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "DISTILL_JAX_DISTRIBUTED"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISTILL_JAX_COORDINATOR", "host0:1234")
    monkeypatch.setenv("DISTILL_JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("DISTILL_JAX_PROCESS_ID", "3")
    monkeypatch.setenv("DISTILL_JAX_HEARTBEAT_TIMEOUT", "7")
    assert parallel.initialize_distributed()
    assert calls[-1] == dict(
        coordinator_address="host0:1234",
        num_processes=4,
        process_id=3,
        heartbeat_timeout_seconds=7,
        initialization_timeout=parallel.DEFAULT_INITIALIZATION_TIMEOUT_S,
    )
    assert parallel.initialize_distributed(process_id=1, initialization_timeout_s=9)
    assert calls[-1]["process_id"] == 1 and calls[-1]["initialization_timeout"] == 9

    monkeypatch.delenv("DISTILL_JAX_COORDINATOR")
    assert not parallel.initialize_distributed()  # one process: nothing to start
    monkeypatch.setenv("SLURM_NTASKS", "8")  # several SLURM tasks: JAX auto-detection
    assert parallel.initialize_distributed()
    assert "coordinator_address" not in calls[-1]
    monkeypatch.setenv("DISTILL_JAX_DISTRIBUTED", "off")
    assert not parallel.initialize_distributed()
    monkeypatch.setenv("DISTILL_JAX_DISTRIBUTED", "yes")
    with pytest.raises(ValueError, match="DISTILL_JAX_DISTRIBUTED"):
        parallel.initialize_distributed()
    monkeypatch.delenv("DISTILL_JAX_PROCESS_ID")
    monkeypatch.delenv("DISTILL_JAX_DISTRIBUTED")
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize_distributed(coordinator_address="host0:1")


FSDP_INIT_WORKER = """
import json, sys
import jax
jax.distributed.initialize(
    coordinator_address=sys.argv[3], num_processes=2, process_id=int(sys.argv[4])
)
from distill_jax import parallel
from distill_jax.config import load_config
from distill_jax.run import Run
from distill_jax.training import drivers, loop

config = load_config(sys.argv[1], {"model.mlp_hidden": 64})
run = Run.create(config, "/nonexistent")
spec = run.stage("teacher")
mesh = parallel.make_mesh(1, fsdp=4)
stage = drivers.BUILDERS[spec.kind](run, spec, None)
state, _, _ = loop.initial_state(stage, mesh)
leaves = []
for leaf in jax.tree.leaves(state.params) + jax.tree.leaves(state.opt_state):
    if leaf.ndim == 0:
        continue
    leaves.append({
        "shape": list(leaf.shape),
        "spec": [str(axis) for axis in leaf.sharding.spec],
        "local": [list(shard.data.shape) for shard in leaf.addressable_shards],
        "starts": [shard.index[0].start or 0 for shard in leaf.addressable_shards],
    })
# A teacher restored straight into these shardings enters the next stage as it is: no host
# fetch (which would need shards that live on the other process).
kept = parallel.host_to_global(state.params, parallel.param_shardings(state.params, mesh))
same = all(a is b for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(state.params)))
json.dump({"leaves": leaves, "global_arrays_kept": same}, open(sys.argv[2], "w"))
"""


def _two_workers(env: dict, script: str, arguments) -> list[str]:
    """Run `script` in two processes (arguments(i): process i's argv) to the end; their output."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, *arguments(i)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    return outputs


@pytest.mark.slow
def test_fsdp_initialisation_never_gives_a_process_a_whole_sharded_parameter(tmp_path):
    port = local.free_port()
    env = dict(
        os.environ,
        XLA_FLAGS=f"{SUITE_XLA_FLAG} --xla_force_host_platform_device_count=2",
        JAX_PLATFORMS="cpu",
    )
    _two_workers(
        env,
        FSDP_INIT_WORKER,
        lambda i: [GMM_SMOKE, str(tmp_path / f"p{i}.json"), f"localhost:{port}", str(i)],
    )
    results = [json.loads((tmp_path / f"p{i}.json").read_text()) for i in range(2)]
    assert all(r["global_arrays_kept"] for r in results)
    per_process = [r["leaves"] for r in results]
    sharded = 0
    for leaves in zip(*per_process, strict=True):
        first = leaves[0]
        if first["spec"][:1] != ["fsdp"]:
            continue  # leading axis not sharded (replicated or split along another axis)
        sharded += 1
        for leaf in leaves:
            # Two devices per process, each with a quarter of the leading axis: half in all.
            assert leaf["local"] == [[first["shape"][0] // 4, *first["shape"][1:]]] * 2, leaf
        held = [sorted(leaf["starts"]) for leaf in leaves]
        assert held[0] != held[1]  # the two processes hold different quarters
    assert sharded >= 2


def _two_process_train(workdir, *extra, sigterm_process=None, sink=None):
    """Train the teacher with 2 processes x 2 devices; optionally SIGTERM one process midway."""
    flags = [
        f"--config={GMM_SMOKE}",
        f"--workdir={workdir}",
        "--config.teacher.num_steps=300",
        "--config.train.log_every=10",
        "--config.train.checkpoint_every=100000",
        *extra,
    ]
    sink = sink or io.StringIO()
    job = local.start(
        ["train", *flags], num_processes=2, devices_per_process=2, cwd=ROOT, sink=sink
    )
    if sigterm_process is not None:
        metrics = pathlib.Path(workdir) / "metrics.jsonl"
        deadline = time.time() + 300
        while time.time() < deadline and all(p.poll() is None for p in job.processes):
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.05)
        job.processes[sigterm_process].send_signal(signal.SIGTERM)
    return local.wait(job, grace_s=120, timeout_s=600), sink


@pytest.mark.slow
def test_sigterm_on_one_of_two_processes_saves_one_agreed_step_and_resumes(tmp_path):
    straight, _ = _two_process_train(tmp_path / "straight")
    assert straight == [0, 0]
    codes, sink = _two_process_train(tmp_path / "preempted", sigterm_process=1)
    output = sink.getvalue()
    assert codes == [143, 143], output[-3000:]
    saved = [p.name for p in (tmp_path / "preempted" / "teacher").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 0 < int(saved[0]) < 300, saved
    # JAX's preemption service made both processes save the same step and say so.
    assert output.count(f"stopped by SIGTERM after step {saved[0]}") == 2, output[-3000:]
    resumed, sink = _two_process_train(tmp_path / "preempted")
    assert resumed == [0, 0], sink.getvalue()[-3000:]
    for which in ("params", "ema_params"):
        got = _leaves(tmp_path / "preempted", "teacher", which)
        want = _leaves(tmp_path / "straight", "teacher", which)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, b)


LATENT_WORKER = """
import json, sys
import jax
jax.distributed.initialize(
    coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[3])
)
from absl import logging
from etils import epath
logging.set_verbosity(logging.INFO)
from distill_jax.config import load_config
from distill_jax.run import latents

def encode(images):  # a fixed codec: 2x2 mean pooling, shifted
    b, h, w, c = images.shape
    return images.reshape(b, h // 2, 2, w // 2, 2, c).mean((2, 4)) - 0.1

data = load_config("configs/digits_latent.py:smoke").data
shape, scale = latents.encode_train_split(
    jax.tree_util.Partial(encode), data, epath.Path(sys.argv[1]), batch_size=96
)
print("RESULT", json.dumps({"shape": list(shape), "scale": scale}))
"""


def test_two_processes_share_the_encoding_of_the_train_split(tmp_path):
    """Each process of a pod encodes half the split into its own part; process 0 joins them.
    The files and the scale are those of one process encoding the whole split."""
    port = local.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    shared = tmp_path / "pod"
    shared.mkdir()
    outputs = _two_workers(env, LATENT_WORKER, lambda i: [str(shared), f"localhost:{port}", str(i)])
    single = tmp_path / "one"
    single.mkdir()
    one = subprocess.run(
        [sys.executable, "-c", LATENT_WORKER.replace("jax.distributed.initialize", "dict")]
        + [str(single), "unused", "0"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    results = [
        json.loads(line.split("RESULT ", 1)[1])
        for text in outputs + [one.stdout]
        for line in text.splitlines()
        if line.startswith("RESULT ")
    ]
    assert len(results) == 3 and results[0] == results[1]
    assert results[0]["shape"] == results[2]["shape"] and results[0]["shape"][-1] == 1
    assert abs(results[0]["scale"] / results[2]["scale"] - 1) < 1e-9
    # Each process encoded its own contiguous half.
    pattern = r"process (\d) encoded examples (\d+) to (\d+) of (\d+)"
    spans = [re.search(pattern, output) for output in outputs]
    (p0, a0, b0, n), (p1, a1, b1, _) = (m.groups() for m in spans)
    assert (p0, a0, p1, b1) == ("0", "0", "1", n) and b0 == a1 and 0 < int(b0) < int(n)
    assert sorted(p.name for p in shared.iterdir()) == sorted(p.name for p in single.iterdir())
    for name in (LATENTS_FILE, LABELS_FILE):
        assert (shared / name).read_bytes() == (single / name).read_bytes(), name
