"""configs/sd15_laion.py and configs/sd21_768.py on mock image-caption pairs with tiny SD-layout
pipelines (sd_tiny: SD 1.x layout, epsilon; sd_tiny_v2: SD 2.x layout, v-prediction), the
pipeline's VAE as the run's autoencoder and its CLIP encoding the captions. One smoke runs
every stage through `distill-jax run`, which stops after distillation saying why it does not
evaluate; the other imports and samples (the stages are the same code)."""

import json
import os
import shutil
import tarfile

import numpy as np
import pytest
from conftest import ROOT
from test_dit_cli import _cli

from distill_jax import export, sampling
from distill_jax.config import load_config
from distill_jax.data import image_captions
from distill_jax.evaluation import evaluate
from distill_jax.run import Run, imported
from distill_jax.training import drivers

DATA = ROOT / "tests" / "data" / "diffusers"


def _v2_folder(tmp_path):
    """sd_tiny_v2's unet/ and scheduler/ with sd_tiny's vae/, text_encoder/ and tokenizer/."""
    folder = tmp_path / "sd_tiny_v2"
    shutil.copytree(DATA / "sd_tiny_v2", folder)
    for part in ("vae", "text_encoder", "tokenizer"):
        os.symlink(DATA / "sd_tiny" / part, folder / part)
    return folder


def test_sd21_768_smoke_runs_every_stage_on_mock_shards(tmp_path):
    """The smoke through `distill-jax run`: import (the VAE encodes the pairs), stage one and a
    halving round of the v-prediction SD 2.x-layout U-Net, then no evaluation, said why. Then
    the pipeline folder is deleted: the workdir samples, exports and resumes without it."""
    pairs = tmp_path / "pairs"
    image_captions.write_mock_pairs(str(pairs), 16)
    workdir = tmp_path / "run"
    flags = (
        f"--config={ROOT / 'configs' / 'sd21_768.py'}:smoke",
        f"--workdir={workdir}",
        f"--config.data.data_dir={pairs}",
    )
    result = _cli("run", *flags, f"--teacher=diffusers:{_v2_folder(tmp_path)}")
    assert result.returncode == 0, result.stderr[-3000:]
    _stands_alone(workdir, tmp_path, flags)
    assert "not evaluated: the data 'image_captions' has no class labels" in result.stderr
    finished = json.loads((workdir / "autoencoder" / "FINISHED.json").read_text())
    assert finished["latents"] == {"scale": 0.18215, "shape": [16, 16, 4]}
    run = Run.open(workdir)
    assert sorted(run.students()) == [1, 2] and run.config.text.max_tokens == 77
    assert run.config.model.parameterisation == "v" and run.config.model.sd_unet.linear_projection
    assert run.config.guidance.w_min == 2.0 and run.config.guidance.w_max == 14.0
    with pytest.raises(ValueError, match="has no class labels"):
        evaluate.evaluate_run(workdir)
    assert load_config(str(ROOT / "configs" / "sd21_768.py")).data.image_size == 768


def _stands_alone(workdir, tmp_path, flags):
    """With the imported folder deleted: sample from a prompt, export, and resume."""
    shutil.rmtree(tmp_path / "sd_tiny_v2")
    run = Run.open(workdir)
    assert run.config.text.pipeline == str(workdir / "imported")
    conditions, _ = run.text_encoder().encode(["a blue star"])
    x = sampling.sample(run, model="student", steps=1, w=4.0, conditions=conditions, seed=0)
    assert x.shape == (1, 32, 32, 3) and np.all(np.isfinite(x))
    metadata = export.export_sampler(workdir, steps=1, out=tmp_path / "export", platforms=("cpu",))
    meaning = metadata["inputs"][1]["meaning"]
    assert "'sd_tiny_v2'" in meaning and str(tmp_path) not in meaning
    # Resumed as `distill-jax run` resumes (every stage is finished: nothing to train).
    config = load_config(flags[0].removeprefix("--config="))
    config.data.data_dir = flags[2].removeprefix("--config.data.data_dir=")
    config = imported.with_recorded_import(config, workdir)
    assert drivers.train_teacher(config, workdir) is None
    assert drivers.distill_stages(config, workdir) == []


def test_sd15_laion_smoke_imports_an_epsilon_pipeline_on_caption_files(tmp_path):
    """SD 1.x layout, epsilon prediction, pairs as caption files beside the images: the import
    and the teacher's samples from a prompt through the VAE."""
    shards = image_captions.write_mock_pairs(str(tmp_path / "shards"), 8)
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for shard in shards:
        with tarfile.open(shard) as archive:
            archive.extractall(pairs, filter="data")
    config = load_config(str(ROOT / "configs" / "sd15_laion.py") + ":smoke")
    config.data.data_dir = str(pairs)
    config = imported.import_teacher(config, tmp_path / "run", f"diffusers:{DATA / 'sd_tiny'}")
    run = Run.open(tmp_path / "run")
    assert run.config.model.parameterisation == "eps" and run.latent
    assert tuple(run.info.shape) == (16, 16, 4) and run.info.num_train == 8
    x = sampling.sample(
        run,
        model="teacher",
        steps=2,
        w=4.0,
        conditions=run.text_encoder().encode(["a blue star"])[0],
        seed=0,
        grid="teacher",
    )
    assert x.shape == (1, 32, 32, 3) and np.all(np.isfinite(x))
    assert load_config(str(ROOT / "configs" / "sd15_laion.py")).data.image_size == 512
