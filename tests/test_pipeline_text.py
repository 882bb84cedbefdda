"""A diffusers pipeline's text encoder and tokenizer in Flax against transformers + diffusers.

Golden files from scripts/golden_text.py (tests/data/diffusers): a tiny CLIP pipeline (sd_tiny)
and a tiny BERT one (bert_tiny), the token ids and encode_prompt's prompt_embeds of awkward
prompts, and the tensor manifests of the SD 1.5 and SD 2.1 text encoders.
"""

import json
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from distill_jax import safetensors_file, text_encoder
from distill_jax.interop import text_encoder as pipeline_text
from distill_jax.interop.text_encoder import PipelineTextEncoder

DATA = pathlib.Path(__file__).parent / "data" / "diffusers"
GOLDEN = np.load(DATA / "text_golden.npz")
PROMPTS = [str(p) for p in GOLDEN["prompts"]]
SD_TINY, BERT_TINY = DATA / "sd_tiny", DATA / "bert_tiny"


def _folder(tmp_path, source: pathlib.Path, drop: str = "", config: dict | None = None) -> str:
    """A copy of source without the file drop, its config.json updated with config."""
    folder = tmp_path / source.name
    shutil.copytree(source, folder)
    if drop:
        os.remove(folder / drop)
    if config:
        values = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(values | config))
    return str(folder)


@pytest.fixture(scope="module")
def sd_tiny():
    return PipelineTextEncoder(SD_TINY / "text_encoder", SD_TINY / "tokenizer")


@pytest.mark.parametrize("drop", ["", "tokenizer.json"], ids=["tokenizer.json", "vocab+merges"])
def test_clip_token_ids_equal_transformers(sd_tiny, tmp_path, drop):
    folder = _folder(tmp_path, SD_TINY / "tokenizer", drop)
    encoder = PipelineTextEncoder(SD_TINY / "text_encoder", folder)
    ids, mask, truncated = encoder.tokenize(PROMPTS)
    for prompt, row, expected in zip(PROMPTS, ids, GOLDEN["ids"], strict=True):
        assert row.tolist() == expected.tolist(), prompt
    assert truncated == [len(p) > 300 for p in PROMPTS]  # only the long prompt is cut
    assert ids[PROMPTS.index(""), :3].tolist() == [754, 755, 755]  # bos, eos, pad (= eos)
    assert mask[PROMPTS.index("")].sum() == 2
    assert (encoder.max_tokens, encoder.width, encoder.vocab_size) == (77, 32, 756)


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_clip_prompt_embeds_equal_encode_prompt(clip_skip):
    encoder = PipelineTextEncoder(SD_TINY / "text_encoder", SD_TINY / "tokenizer", clip_skip)
    embeds, truncated = encoder.encode(PROMPTS)
    golden = GOLDEN["embeds" if clip_skip is None else "embeds_clip_skip_1"]
    assert embeds.dtype == np.float32 and embeds.shape == golden.shape == (len(PROMPTS), 77, 32)
    np.testing.assert_allclose(embeds, golden, atol=1e-5, rtol=0)


def test_attention_mask_only_when_the_config_says_use_attention_mask(sd_tiny, tmp_path):
    folder = _folder(tmp_path, SD_TINY / "text_encoder", config={"use_attention_mask": True})
    embeds, _ = PipelineTextEncoder(folder, SD_TINY / "tokenizer").encode(PROMPTS)
    np.testing.assert_allclose(embeds, GOLDEN["embeds_attention_mask"], atol=1e-5, rtol=0)
    # The mask changes the padding positions only (causal attention never looks ahead).
    real = sd_tiny.tokenize(PROMPTS)[1].astype(bool)
    np.testing.assert_allclose(embeds[real], GOLDEN["embeds"][real], atol=1e-5, rtol=0)
    assert np.abs(embeds[~real] - GOLDEN["embeds"][~real]).max() > 1e-2


@pytest.mark.parametrize("drop", ["", "tokenizer.json"], ids=["tokenizer.json", "vocab.txt"])
def test_bert_prompt_embeds_equal_encode_prompt(tmp_path, drop):
    tokenizer = _folder(tmp_path, BERT_TINY / "tokenizer", drop)
    encoder = PipelineTextEncoder(BERT_TINY / "text_encoder", tokenizer)
    ids, _, truncated = encoder.tokenize(PROMPTS)
    np.testing.assert_array_equal(ids, GOLDEN["bert_ids"])
    assert truncated == [row[-1] == 3 for row in GOLDEN["bert_ids"]]  # [SEP] last: full or cut
    if drop:
        return  # the same encoder: its states are checked once
    embeds, _ = encoder.encode(PROMPTS)
    # No attention mask (BertConfig has no use_attention_mask): padding is attended, not zero.
    np.testing.assert_allclose(embeds, GOLDEN["bert_embeds"], atol=1e-5, rtol=0)


def _manifest(name: str) -> tuple[dict, dict]:
    manifest = json.loads((DATA / f"{name}_text_manifest.json").read_text())
    return manifest["config"], {k: tuple(v) for k, v in manifest["tensors"].items()}


@pytest.mark.parametrize("name,layers,width", [("sd15", 12, 768), ("sd21", 23, 1024)])
def test_every_tensor_of_the_sd_text_encoders_is_mapped(name, layers, width):
    config, tensors = _manifest(name)
    assert (config["num_hidden_layers"], config["hidden_size"]) == (layers, width)
    # The manifests are transformers 5's names; released files (older transformers) put every
    # tensor under 'text_model.' and carry the position_ids buffer.
    released = {f"text_model.{k}": v for k, v in tensors.items()}
    released["text_model.embeddings.position_ids"] = (1, 77)
    for found in (tensors, released):
        names = pipeline_text.match_tensors(config, found)
        assert sorted(names.values()) == sorted(tensors)


def test_the_minilm_folder_maps_through_the_same_path():
    from safetensors import safe_open

    folder = text_encoder.default_encoder_dir()
    config = json.loads(pathlib.Path(folder, "config.json").read_text())
    with safe_open(os.path.join(folder, "model.safetensors"), "np") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    names = pipeline_text.match_tensors(config, shapes)
    # Everything but the position_ids buffer and the pooler (unused by prompt_embeds).
    assert set(shapes) - set(names) == {
        "embeddings.position_ids",
        "pooler.dense.weight",
        "pooler.dense.bias",
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_load(sd_tiny, tmp_path, dtype):
    import jax.numpy as jnp
    from safetensors.flax import save_file as save_flax

    folder = _folder(tmp_path, SD_TINY / "text_encoder")
    tensors = safetensors_file.read_safetensors_file(os.path.join(folder, "model.safetensors"))
    save_flax(
        {k: jnp.asarray(v, dtype) for k, v in tensors.items()},
        os.path.join(folder, "model.safetensors"),
    )
    params = PipelineTextEncoder(folder, SD_TINY / "tokenizer").params
    expected = jax.tree.map(lambda a: np.asarray(jnp.asarray(a, dtype), np.float32), sd_tiny.params)
    jax.tree.map(np.testing.assert_array_equal, params, expected)


def _edit(tensors: dict, edit: str) -> None:
    if edit == "missing":
        del tensors["final_layer_norm.weight"]
    elif edit == "leftover":
        tensors["text_projection.weight"] = np.zeros((32, 32), np.float32)
    else:
        tensors["encoder.layers.2.mlp.fc1.weight"] = np.zeros((36, 32), np.float32)


@pytest.mark.parametrize(
    "edit,message",
    [
        ("missing", r"does not hold .* config.json's size: missing 1 \(final_layer_norm.weight\)$"),
        ("leftover", r"1 not mapped \(text_projection.weight\)$"),
        ("wrong", r"fc1.weight has shape \(36, 32\), .*config.json \(expected \(37, 32\)\)$"),
    ],
)
def test_a_file_that_does_not_match_its_config_is_refused(tmp_path, edit, message):
    folder = _folder(tmp_path, SD_TINY / "text_encoder")
    path = os.path.join(folder, "model.safetensors")
    tensors = safetensors_file.read_safetensors_file(path)
    _edit(tensors, edit)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=message):
        PipelineTextEncoder(folder, SD_TINY / "tokenizer")


def test_a_tokenizer_larger_than_the_encoder_vocabulary_is_refused():
    with pytest.raises(ValueError, match="has 756 tokens but the text encoder's vocab_size is 111"):
        PipelineTextEncoder(BERT_TINY / "text_encoder", SD_TINY / "tokenizer")


@pytest.mark.parametrize(
    "folder,clip_skip",
    [(BERT_TINY, 1), (SD_TINY, 5), (SD_TINY, -1)],
    ids=["bert", "more-than-layers", "negative"],
)
def test_clip_skip_needs_a_clip_encoder_with_that_many_layers(folder, clip_skip):
    with pytest.raises(ValueError, match=f"clip_skip={clip_skip} must count layers of a CLIP"):
        PipelineTextEncoder(folder / "text_encoder", folder / "tokenizer", clip_skip)


@pytest.mark.parametrize(
    "damage",
    ["tokenizer.json", "merges.txt", "vocab.json"],
    ids=["garbage-tokenizer.json", "garbage-merges", "vocab-not-json"],
)
def test_tokenizer_files_that_do_not_load_are_refused_in_one_line(tmp_path, damage):
    folder = pathlib.Path(_folder(tmp_path, SD_TINY / "tokenizer"))
    if damage != "tokenizer.json":
        os.remove(folder / "tokenizer.json")  # read vocab.json + merges.txt instead
    (folder / damage).write_text("{ this is not a tokenizer")
    with pytest.raises(pipeline_text.TextFolderError) as error:
        PipelineTextEncoder(SD_TINY / "text_encoder", folder)
    message = str(error.value)
    assert "\n" not in message and str(folder) in message, message
    assert "tokenizer.json, vocab.json + merges.txt (CLIP) or vocab.txt (BERT)" in message or (
        "not a readable JSON file" in message
    ), message
