"""configs/sd35_medium.py on mock image-caption pairs with the tiny random SD3 pipeline
(sd3_tiny: MMDiT, two CLIPs with projection, T5, a VAE with SD3's latent shift and scale, the
flow-matching scheduler with shift 3): every stage through `distill-jax run`, then the
workdir samples with its students' samplers and stands alone without the folder."""

import json
import shutil

import numpy as np
from conftest import ROOT
from test_dit_cli import _cli

from distill_jax import export, sampling
from distill_jax.config import load_config
from distill_jax.data import image_captions, sources
from distill_jax.diffusion import flow
from distill_jax.run import Run, imported

DATA = ROOT / "tests" / "data" / "diffusers"


def test_sd35_medium_smoke_distils_a_flow_teacher(tmp_path):
    pairs = tmp_path / "pairs"
    image_captions.write_mock_pairs(str(pairs), 16)
    folder = tmp_path / "sd3_tiny"
    shutil.copytree(DATA / "sd3_tiny", folder)
    workdir = tmp_path / "run"
    flags = (
        f"--config={ROOT / 'configs' / 'sd35_medium.py'}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={pairs}",
    )
    result = _cli("run", *flags, f"--teacher=diffusers:{folder}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not evaluated: the data 'image_captions' has no class labels" in result.stderr
    finished = json.loads((workdir / "autoencoder" / "FINISHED.json").read_text())
    assert finished["latents"] == {"scale": 1.5305, "shape": [8, 8, 4], "shift": 0.0609}
    shutil.rmtree(folder)  # the workdir stands alone
    run = Run.open(workdir)
    assert sorted(run.students()) == [1, 2]
    m = run.config.model
    assert m.kind == "mmdit" and m.parameterisation == "flow"
    assert m.flow_schedule.num_train_timesteps == 1000
    assert run.config.text.max_tokens == 77 + 16 + 1
    assert run.config.diffusion.logsnr_min == -33.0
    conditions, _ = run.text_encoder().encode(["a blue star"])
    assert conditions.shape == (1, 94, 48)
    _check_caption_cache(run, workdir)
    for steps, stochastic in ((1, False), (2, True)):  # the 2-step student's stochastic sampler
        x = sampling.sample(
            run,
            model="student",
            steps=steps,
            w=4.0,
            conditions=conditions,
            seed=0,
            stochastic=stochastic,
        )
        assert x.shape == (1, 16, 16, 3) and np.all(np.isfinite(x))
    # The teacher on its own grid: the flow scheduler's shifted sigmas.
    times = imported.teacher_times(run, 4)
    sigmas = flow.scheduler_sigmas(4, num_train_timesteps=1000, shift=3.0)
    lo, hi = run.bounds["logsnr_min"], run.bounds["logsnr_max"]
    np.testing.assert_allclose(
        times, flow.times_of_flow_sigmas(sigmas, logsnr_min=lo, logsnr_max=hi)
    )
    x = sampling.sample(
        run, model="teacher", steps=4, w=4.0, conditions=conditions, seed=0, grid="teacher"
    )
    assert np.all(np.isfinite(x))
    metadata = export.export_sampler(workdir, steps=1, out=tmp_path / "export", platforms=("cpu",))
    meaning = metadata["inputs"][1]["meaning"]
    assert "StableDiffusion3Pipeline" in meaning and "'sd3_tiny'" in meaning
    assert metadata["inputs"][1]["shape"][1:] == [94, 48]
    assert load_config(str(ROOT / "configs" / "sd35_medium.py")).data.image_size == 1024


def _check_caption_cache(run, workdir):
    """The captions were encoded once into the workdir and are read lazily from there."""
    cache = workdir / "captions" / "train.npy"
    rows = np.load(cache, mmap_mode="r")
    source, conditions = run.pipeline_conditions("train")
    captions = sources.captions_of(source)
    assert rows.shape == (len(set(captions)), 94, 48) and len(conditions) == len(captions) == 16
    assert isinstance(conditions.rows, np.memmap)
    encoded, _ = run.text_encoder().encode(list(captions[:3]))
    np.testing.assert_allclose(conditions[np.arange(3)], encoded, atol=1e-6)
    before = cache.stat().st_mtime_ns
    run.pipeline_conditions("train")  # the same captions and encoder: not encoded again
    assert cache.stat().st_mtime_ns == before


def test_flow_teacher_config_refused_without_import(tmp_path):
    result = _cli(
        "run",
        f"--config={ROOT / 'configs' / 'sd3_digits.py'}:smoke",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode != 0
    assert "--teacher=diffusers:DIR" in result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
