"""Shared pytest fixtures: one smoke run of every stage per test session."""

import hashlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading

import pytest

# The test extra installs libtpu (for `distill-jax plan`); without a TPU, JAX would still try
# to start it in every process, print libtpu's warnings on stderr and take its lockfile. The
# suite and every command it starts run on the CPU.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
SUITE_XLA_FLAG = "--xla_backend_optimization_level=1"
# The suite compiles far more than it runs: LLVM at optimisation level 1 instead of XLA's
# default 2 cut the digits smoke run from 102 s to 81 s here with its steps as fast, and the same
# losses to 1e-4 relative. The suite and the commands it starts inherit it; tests that set their
# own XLA_FLAGS (to fake devices) add it to theirs.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), SUITE_XLA_FLAG]).strip()

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE_CONFIG = str(ROOT / "configs" / "digits.py") + ":smoke"
TEXT_SMOKE_CONFIG = str(ROOT / "configs" / "digits_latent_text.py") + ":smoke"


# The start of a script run in a fresh interpreter where importing distill_jax fails: what an
# exported sampler's user has. Tests append their own body and check sys.modules at the end.
NO_DISTILL_JAX = """
import importlib.abc, sys

class NoDistillJax(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "distill_jax":
            raise ImportError("distill_jax must not be imported by the exported sampler")

sys.meta_path.insert(0, NoDistillJax())
"""


# A fresh interpreter without distill_jax that loads an exported sampler from argv[1], calls it
# on the 'noise', 'labels' and 'w' arrays of the .npz argv[2], and saves the images to argv[3].
STANDALONE = NO_DISTILL_JAX + textwrap.dedent(
    """
    import numpy as np
    artifact, inputs, out = sys.argv[1:4]
    sys.path.insert(0, artifact)
    from run_sampler import load_exported

    data = np.load(inputs)
    sampler = load_exported(artifact)
    np.save(out, sampler(data["noise"], data["labels"], data["w"]))
    assert "distill_jax" not in sys.modules
    print("STANDALONE OK", sampler.noise_shape, sampler.image_shape)
    """
)


def sample_standalone(artifact, tmp_path, noise, labels, w):
    """Images of the exported sampler at `artifact` on these inputs, from a fresh interpreter
    that cannot import distill_jax (`STANDALONE`, with only PATH and HOME of the environment)."""
    import numpy as np

    np.savez(tmp_path / "inputs.npz", noise=noise, labels=labels, w=w)
    (tmp_path / "standalone.py").write_text(STANDALONE)
    env = {k: os.environ[k] for k in ("PATH", "HOME") if k in os.environ}
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, "standalone.py", str(artifact), "inputs.npz", "out.npy"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "STANDALONE OK" in result.stdout, result.stderr[-3000:]
    return np.load(tmp_path / "out.npy")


def snapshot(directory) -> dict | None:
    """{relative path: (content hash or 'dir', mtime)} of everything under `directory`.

    Tests compare two snapshots to show that a refused command changed nothing.
    """
    directory = pathlib.Path(directory)
    if not directory.exists():
        return None
    return {
        str(p.relative_to(directory)): (
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir",
            p.stat().st_mtime_ns,
        )
        for p in sorted(directory.rglob("*"))
    }


def pytest_configure(config):
    """Keep the CLI's persistent XLA compilation cache inside the test session's temp area."""
    cache = pathlib.Path(tempfile.gettempdir()) / f"distill_jax_test_xla_{os.getpid()}"
    os.environ.setdefault("DISTILL_JAX_COMPILATION_CACHE", str(cache))


class _SmokeRuns:
    """The session's smoke runs (`distill-jax run` subprocesses), started in the background as
    soon as the tests are collected, one after another in the order the tests first need them.

    A smoke run mostly compiles, on one core; started early it overlaps the in-process tests
    on the other instead of leaving that core idle while a fixture waits for it.
    """

    def __init__(self, root: pathlib.Path):
        self.root = root
        self.cache = root / "distill_jax_cache"  # DISTILL_JAX_CACHE: feature classifiers
        self.cache.mkdir(parents=True, exist_ok=True)
        self.results: dict[str, tuple[pathlib.Path, subprocess.CompletedProcess]] = {}
        self.done: dict[str, threading.Event] = {}

    def run(self, name: str) -> tuple[pathlib.Path, subprocess.CompletedProcess]:
        workdir = self.root / name / "run"
        env = dict(os.environ, DISTILL_JAX_CACHE=str(self.cache))
        command = [sys.executable, "-m", "distill_jax", *SMOKE_RUNS[name], f"--workdir={workdir}"]
        result = subprocess.run(
            command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
        )
        return workdir, result

    def start(self, names: list[str]) -> None:
        for name in names:
            self.done[name] = threading.Event()

        def chain():
            for name in names:
                try:
                    self.results[name] = self.run(name)
                finally:
                    self.done[name].set()

        threading.Thread(target=chain, daemon=True).start()

    def workdir(self, name: str) -> pathlib.Path:
        """The finished run's workdir (run now if it was not started in the background)."""
        if name in self.done:
            self.done[name].wait()
        if name not in self.results:
            self.results[name] = self.run(name)
        workdir, result = self.results[name]
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return workdir


_DIT_TEACHER = ROOT / "tests" / "data" / "diffusers" / "dit_tiny_legacy"
# fixture name: the command and its flags (the workdir added).
SMOKE_RUNS = {
    "smoke_workdir": ("run", f"--config={SMOKE_CONFIG}"),
    "dit_workdir": (
        "run",
        f"--config={ROOT / 'configs' / 'digits_dit.py'}:smoke",
        f"--teacher=diffusers:{_DIT_TEACHER}",
    ),
    "text_workdir": ("run", f"--config={TEXT_SMOKE_CONFIG}"),
    # tests/test_latent.py's: the latent smoke's autoencoder (longer) and a 1-step teacher.
    "other_run": (
        "train",
        f"--config={ROOT / 'configs' / 'digits_latent.py'}:smoke",
        "--config.seed=3",
        "--config.autoencoder.num_steps=120",
        "--config.train.checkpoint_every=40",
        "--config.teacher.num_steps=1",
    ),
}
_SMOKES: list[_SmokeRuns] = []


def _module(item) -> str:
    return item.nodeid.split("::")[0]


def _smoke_runs_of(item) -> list[str]:
    """The smoke runs a test uses: as fixtures, or named by its parameters (getfixturevalue)."""
    params = getattr(item, "callspec", None)
    named = [v for v in (params.params.values() if params else ()) if isinstance(v, str)]
    return [name for name in [*item.fixturenames, *named] if name in SMOKE_RUNS]


@pytest.hookimpl(trylast=True)  # after -k and -m have deselected
def pytest_collection_modifyitems(session, config, items):
    """Start the smoke runs the selected tests use, in the order they first use them.

    The test files that use none of them run first (each file's tests stay together and in
    order), so that the smoke runs are made while those run instead of being waited for.
    """
    uses = {}
    for item in items:
        uses[_module(item)] = uses.get(_module(item), False) or bool(_smoke_runs_of(item))
    items[:] = sorted(items, key=lambda item: uses[_module(item)])  # stable: order kept within
    root = pathlib.Path(tempfile.mkdtemp(prefix="distill_jax_smokes_"))
    config.add_cleanup(lambda: shutil.rmtree(root, ignore_errors=True))
    runs = _SmokeRuns(root)
    _SMOKES.append(runs)
    used = [name for item in items for name in _smoke_runs_of(item)]
    runs.start(list(dict.fromkeys(used)))


def background_workdir(name: str) -> pathlib.Path:
    """The workdir of SMOKE_RUNS[name], finished (started in the background if a collected
    test uses a fixture of that name; run now otherwise)."""
    return _SMOKES[-1].workdir(name)


@pytest.fixture(scope="session")
def classifier_cache():
    """A session-wide cache folder for feature classifiers (DISTILL_JAX_CACHE)."""
    return _SMOKES[-1].cache


@pytest.fixture(scope="session")
def smoke_workdir():
    """A workdir made by `distill-jax run --config=configs/digits.py:smoke` (all stages,
    evaluation and report), shared by every test of the session; read-only for tests."""
    return background_workdir("smoke_workdir")


@pytest.fixture(scope="session")
def text_workdir():
    """The same for `configs/digits_latent_text.py:smoke`: a text-conditioned run (prompts
    through the frozen MiniLM encoder) in the latent space of an autoencoder, so one run covers
    the text path and its conditions cached beside the latents; read-only for tests. (The pixel
    text config's U-Net and losses are tested in tests/test_text.py without a whole run.)"""
    return background_workdir("text_workdir")


@pytest.fixture(scope="session")
def dit_workdir():
    """`distill-jax run --config=configs/digits_dit.py:smoke --teacher=diffusers:...`: a tiny
    DiT that diffusers made (tests/data/diffusers/dit_tiny_legacy) imported and distilled down
    to one step, then evaluated; read-only for tests."""
    return background_workdir("dit_workdir")


def imported_dit(folder):
    """(core.ImportedTeacher, our DiT) of a diffusers DiT folder, on its trained range."""
    from distill_jax.interop import core
    from distill_jax.interop import dit as reader
    from distill_jax.models import denoiser

    imported = reader.read_dit_folder(folder)
    lo, hi = imported.logsnr_range
    model = denoiser.build_model(
        core.model_config(imported.model),
        data_shape=imported.data_shape,
        num_classes=imported.num_classes,
        use_guidance=False,
        logsnr_min=lo,
        logsnr_max=hi,
    )
    return imported, model


def assert_same_guided_images(imported, model, encoder, golden, times, rtol: float) -> None:
    """Our guided DDIM on `times` gives a pipeline loop's golden images (`golden`: its noise,
    prompts, steps and images 'w=0', 'w=1', 'w=4'), within rtol times the images' scale (guided
    samples may leave [-1, 1]), each w at once."""
    import jax.numpy as jnp
    import numpy as np

    from distill_jax.diffusion import guidance, samplers
    from distill_jax.models import denoiser

    lo, hi = imported.logsnr_range
    prompts = [str(p) for p in golden["prompts"]]
    conditions, _ = encoder.encode(prompts)
    null, _ = encoder.encode([""])
    guided = guidance.make_guided_denoise_fn(
        denoiser.make_denoise_fn(model, imported.params), null_condition=jnp.asarray(null[0])
    )
    weights = (0.0, 1.0, 4.0)
    n = len(prompts)
    ours = samplers.run_sampler(
        "ddim",
        guided,
        jnp.tile(jnp.asarray(golden["noise"]), (3, 1, 1, 1)),
        jnp.tile(jnp.asarray(conditions), (3, 1, 1)),
        jnp.repeat(jnp.asarray(weights), n),
        steps=int(golden["steps"]),
        times=times,
        logsnr_min=lo,
        logsnr_max=hi,
    )
    for i, w in enumerate(weights):
        theirs = golden[f"w={w:g}"]
        assert theirs.shape == (n,) + tuple(imported.data_shape)
        error = float(np.max(np.abs(np.asarray(ours[i * n : (i + 1) * n]) - theirs)))
        assert error <= rtol * max(1.0, float(np.max(np.abs(theirs)))), (w, error)
