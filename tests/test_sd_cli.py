"""`--teacher=diffusers:DIR` with a text-to-image pipeline: import, captions encoded by the
pipeline's own text encoder, refusals (sampling from prompts: tests/test_sd_latent.py).

The teacher is tests/data/diffusers/sd_digits_tiny (scripts/golden_pipeline.py): a tiny random
pixel-space UNet2DConditionModel on 8x8x1 with a tiny BERT text encoder, v-prediction.
"""

import json
import shutil

import numpy as np
import pytest
from conftest import ROOT, snapshot
from test_dit_cli import _cli, _refused

from distill_jax import text_encoder
from distill_jax.interop import pipeline
from distill_jax.run import Run

DATA = ROOT / "tests" / "data" / "diffusers"
TEACHER = DATA / "sd_digits_tiny"
CONFIG = str(ROOT / "configs" / "sd_digits.py") + ":smoke"


@pytest.fixture(scope="module")
def sd_workdir(tmp_path_factory):
    """`train --teacher=diffusers:sd_digits_tiny`: the import (the teacher stage is done)."""
    workdir = tmp_path_factory.mktemp("sd") / "w"
    result = _cli(
        "train", f"--config={CONFIG}", f"--workdir={workdir}", f"--teacher=diffusers:{TEACHER}"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_import_makes_a_run_of_the_pipelines_text(sd_workdir):
    record = json.loads((sd_workdir / "teacher" / "FINISHED.json").read_text())["imported"]
    assert record["kind"] == "text_to_image" and record["source"] == str(TEACHER)
    assert record["text"] == dict(kind="bert", width=32, max_tokens=16, vocab=111)
    run = Run.open(sd_workdir)
    assert run.config.model.kind == "sd_unet" and run.config.model.parameterisation == "v"
    # The text encoder and tokenizer are read from the workdir's copy, not the folder.
    assert run.config.text.pipeline == str(sd_workdir / "imported")
    assert run.config.text.max_tokens == 16
    # The captions are encoded again by the pipeline's encoder, not MiniLM's stored states.
    source = run.train_source(run.stage("stage1"))
    rows = np.array([0, 7, 500])
    encoder = pipeline.text_encoder(str(TEACHER))
    captions = list(np.asarray(source.arrays["caption"])[rows].astype(str))
    want, _ = encoder.encode(captions)
    np.testing.assert_array_equal(source.take(rows)["condition"], want)
    assert source.arrays["condition"].shape[1:] == (16, 32)
    assert run.null_condition.shape == (16, 32)
    # One interface for the pipeline's encoder and the bundled MiniLM.
    assert isinstance(run.text_encoder(), text_encoder.TextConditioner)
    assert (run.text_encoder().max_tokens, run.text_encoder().width) == (16, 32)


def test_pipelines_that_do_not_fit_the_run_refused(tmp_path):
    fresh = tmp_path / "fresh"
    _refused(
        _cli("train", f"--config={CONFIG}", f"--workdir={fresh}", f"--teacher=diffusers:{DATA}"),
        "is not a diffusers pipeline folder distill_jax reads",
    )
    _refused(
        _cli(
            "train",
            f"--config={ROOT / 'configs' / 'digits_dit.py'}:smoke",
            f"--workdir={fresh}",
            f"--teacher=diffusers:{TEACHER}",
        ),
        "has no captions",
    )
    # A damaged text encoder is refused at the import, not at stage one.
    broken = tmp_path / "broken"
    shutil.copytree(TEACHER, broken)
    weights = broken / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _refused(
        _cli("train", f"--config={CONFIG}", f"--workdir={fresh}", f"--teacher=diffusers:{broken}"),
        "text_encoder/model.safetensors",
    )
    assert snapshot(fresh) is None


@pytest.mark.parametrize("command", ["run", "train", "distill"])
def test_a_config_whose_network_comes_from_an_import_refuses_a_workdir_without_one(
    tmp_path, command
):
    """sd_digits.py (and digits_dit.py, dit_xl2, sd15, sd21) build no network of their own:
    without --teacher=diffusers:DIR the command says so in one line and writes nothing."""
    fresh = tmp_path / "fresh"
    _refused(
        _cli(command, f"--config={CONFIG}", f"--workdir={fresh}"),
        "has no imported teacher",
        "--teacher=diffusers:DIR",
    )
    assert snapshot(fresh) is None
