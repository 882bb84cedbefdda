"""SD3's text side (two CLIPs with projection and a T5) in Flax against transformers + diffusers.

Golden files from scripts/golden_sd3_text.py (tests/data/diffusers): sd3_tiny's six text parts,
t5_relu_tiny (a T5 with the non-gated feed-forward) and sd3_text_golden.npz (each tokenizer's
ids and StableDiffusion3Pipeline.encode_prompt's outputs).
"""

import json
import os
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from distill_jax import safetensors_file
from distill_jax.interop import core, sd3_text
from distill_jax.interop.core import FolderError
from distill_jax.interop.sd3_text import SD3TextEncoder, SD3TextFolderError
from distill_jax.interop.text_encoder import TextFolderError
from distill_jax.models import mmdit
from distill_jax.models.t5_encoder import T5Encoder
from distill_jax.text_encoder import TextConditioner, tokenize

DATA = pathlib.Path(__file__).parent / "data" / "diffusers"
SD3_TINY = DATA / "sd3_tiny"
GOLDEN = np.load(DATA / "sd3_text_golden.npz")
PROMPTS = [str(p) for p in GOLDEN["prompts"]]
LENGTH = int(GOLDEN["max_sequence_length"])  # T5's tokens in the golden: 16
TEXT_PARTS = [
    f"{kind}{suffix}" for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")
]
JOINT, POOLED = 48, 32  # T5's d_model, the two projections' sum


def _copy(tmp_path, drop=(), transformer: dict | None = None) -> pathlib.Path:
    """The text parts of sd3_tiny (not `drop`), and a transformer/config.json if given."""
    folder = tmp_path / "sd3"
    for part in TEXT_PARTS:
        if part not in drop:
            shutil.copytree(SD3_TINY / part, folder / part)
    if transformer is not None:
        (folder / "transformer").mkdir()
        (folder / "transformer" / "config.json").write_text(json.dumps(transformer))
    return folder


def _edit_config(path: pathlib.Path, **values) -> None:
    config = json.loads(path.read_text())
    path.write_text(json.dumps(config | values))


def _refused(folder, match: str, **kwargs) -> str:
    with pytest.raises(SD3TextFolderError) as error:
        SD3TextEncoder(folder, max_sequence_length=LENGTH, **kwargs)
    message = str(error.value)
    assert "\n" not in message and match in message, message
    return message


@pytest.fixture(scope="module")
def encoder():
    return SD3TextEncoder(SD3_TINY, max_sequence_length=LENGTH)


def test_token_ids_equal_transformers(encoder):
    ids, mask, truncated = encoder.tokenize(PROMPTS)  # CLIP-L's
    np.testing.assert_array_equal(ids, GOLDEN["ids_1"])
    np.testing.assert_array_equal(mask, GOLDEN["mask_1"])
    assert truncated == [False, False, True, False, False]  # the long prompt
    # tokenizer_2 is vocab.json + merges.txt with pad '!' (matched whole, as transformers does).
    (tokenizer_2, pad_2), (tokenizer_1, _) = encoder.clip_tokenizers[1], encoder.clip_tokenizers[0]
    assert tokenizer_1 is encoder.tokenizer and pad_2 == 0
    np.testing.assert_array_equal(tokenize(tokenizer_2, PROMPTS, 77, pad_2)[0], GOLDEN["ids_2"])
    ids_3, mask_3, _ = tokenize(encoder.t5_tokenizer, PROMPTS, LENGTH, encoder.t5_pad_id)
    np.testing.assert_array_equal(ids_3, GOLDEN["ids_3"])
    np.testing.assert_array_equal(mask_3, GOLDEN["mask_3"])
    assert (encoder.max_tokens, encoder.width) == (77 + LENGTH + 1, max(JOINT, POOLED))


@pytest.mark.parametrize("clip_skip", [None, 1])
def test_prompt_embeds_equal_encode_prompt(encoder, clip_skip):
    if clip_skip is not None:
        encoder = SD3TextEncoder(SD3_TINY, max_sequence_length=LENGTH, clip_skip=clip_skip)
    suffix = "" if clip_skip is None else f"_clip_skip_{clip_skip}"
    embeds, pooled = encoder.encode_parts(PROMPTS)
    golden, golden_pooled = (
        GOLDEN[f"prompt_embeds{suffix}"],
        GOLDEN[f"pooled_prompt_embeds{suffix}"],
    )
    assert embeds.dtype == pooled.dtype == np.float32
    assert embeds.shape == golden.shape == (len(PROMPTS), 77 + LENGTH, JOINT)
    assert pooled.shape == golden_pooled.shape == (len(PROMPTS), POOLED)
    np.testing.assert_allclose(embeds, golden, atol=1e-5, rtol=0)  # measured 1.2e-6
    np.testing.assert_allclose(pooled, golden_pooled, atol=1e-5, rtol=0)  # measured 9.5e-7
    assert np.all(embeds[:, :77, 16 + 24 :] == 0)  # the CLIP states zero-padded to T5's width


def test_encode_is_a_text_conditioner_that_unpacks_to_encode_prompt(encoder):
    assert isinstance(encoder, TextConditioner)
    conditions, truncated = encoder.encode(PROMPTS)
    assert conditions.dtype == np.float32
    assert conditions.shape == (len(PROMPTS), encoder.max_tokens, encoder.width)
    states, pooled = mmdit.unpack_condition(conditions, JOINT, POOLED)
    np.testing.assert_allclose(states, GOLDEN["prompt_embeds"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, GOLDEN["pooled_prompt_embeds"], atol=1e-5, rtol=0)
    # Cut by any tokenizer: the long prompt by all three, two more by T5's 16 tokens.
    assert truncated == [False, False, True, True, True]


def test_without_t5_its_states_are_zeros(tmp_path):
    folder = _copy(tmp_path, drop=("text_encoder_3", "tokenizer_3"))
    encoder = SD3TextEncoder(folder, max_sequence_length=LENGTH, joint_attention_dim=JOINT)
    embeds, pooled = encoder.encode_parts(PROMPTS)
    np.testing.assert_allclose(embeds, GOLDEN["prompt_embeds_no_t5"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(pooled, GOLDEN["pooled_prompt_embeds_no_t5"], atol=1e-5, rtol=0)
    assert np.all(embeds[:, 77:] == 0)
    _, truncated = encoder.encode(PROMPTS)
    assert truncated == [False, False, True, False, False]  # the CLIPs' only
    # Without the argument the width is transformer/config.json's; without either, refused.
    _refused(folder, "pass joint_attention_dim")
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text(
        json.dumps({"joint_attention_dim": JOINT, "pooled_projection_dim": POOLED})
    )
    assert SD3TextEncoder(folder, max_sequence_length=LENGTH).joint_attention_dim == JOINT


def test_use_t5_false_leaves_t5_out(tmp_path):
    encoder = SD3TextEncoder(_copy(tmp_path), LENGTH, use_t5=False, joint_attention_dim=JOINT)
    assert not encoder.use_t5 and encoder.t5_params is None


@pytest.mark.parametrize("masked", [False, True])
def test_relu_t5_equals_t5_encoder_model(masked):
    folder = str(DATA / "t5_relu_tiny")
    config = json.loads((DATA / "t5_relu_tiny" / "config.json").read_text())
    sizes = sd3_text.t5_sizes(config, folder)
    assert (sizes.activation, sizes.gated) == ("relu", False)
    params = _t5_params(folder, sizes)
    mask = GOLDEN["mask_3"] if masked else None
    states = T5Encoder(sizes).apply({"params": params}, GOLDEN["ids_3"], mask)
    golden = GOLDEN["t5_relu_states_masked" if masked else "t5_relu_states"]
    np.testing.assert_allclose(np.asarray(states), golden, atol=1e-5, rtol=0)


def _t5_params(folder, sizes) -> dict:
    """The folder's T5 weights, loaded for the T5Encoder of `sizes`."""
    ids = jnp.zeros((1, 2), jnp.int32)
    return sd3_text.load_t5(core.abstract_params(T5Encoder(sizes), ids), str(folder))


def _t5_tensors(folder: pathlib.Path) -> dict:
    return safetensors_file.read_safetensors_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("names", ["embed_tokens", "both"])
def test_the_tied_t5_embedding_may_have_either_name_or_both(tmp_path, names):
    folder = _copy(tmp_path) / "text_encoder_3"
    config = json.loads((folder / "config.json").read_text())
    sizes = sd3_text.t5_sizes(config, str(folder))
    expected = _t5_params(SD3_TINY / "text_encoder_3", sizes)
    tensors = _t5_tensors(folder)
    tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"]
    if names == "embed_tokens":
        del tensors["shared.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    params = _t5_params(folder, sizes)
    np.testing.assert_array_equal(params["shared"]["embedding"], expected["shared"]["embedding"])
    if names == "both":
        tensors["encoder.embed_tokens.weight"] = tensors["shared.weight"] + 1
        save_file(tensors, str(folder / "model.safetensors"))
        _refused(folder.parent, "shared.weight and encoder.embed_tokens.weight differ")


@pytest.mark.parametrize(
    "shard, match",
    [
        ("../text_encoder/model.safetensors", "which is not a file beside it"),
        ("model-00009-of-00009.safetensors", "which"),
    ],
)
def test_an_index_naming_a_shard_outside_its_folder_or_absent_is_refused(tmp_path, shard, match):
    folder = _copy(tmp_path) / "text_encoder_3"
    names = sorted(_t5_tensors(folder))
    os.rename(folder / "model.safetensors", folder / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in names} | {names[0]: shard}
    (folder / sd3_text.SHARDS_INDEX).write_text(json.dumps({"weight_map": weight_map}))
    message = _refused(folder.parent, match)
    assert shard in message and "does not hold" in message or "beside" in message


def test_sharded_t5_weights_read_through_their_index(tmp_path):
    folder = _copy(tmp_path) / "text_encoder_3"
    tensors = _t5_tensors(folder)
    os.remove(folder / "model.safetensors")
    names = sorted(tensors)
    shards = {
        "model-00001-of-00002.safetensors": names[:7],
        "model-00002-of-00002.safetensors": names[7:],
    }
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, str(folder / shard))
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / sd3_text.SHARDS_INDEX).write_text(json.dumps(index))
    config = json.loads((folder / "config.json").read_text())
    sizes = sd3_text.t5_sizes(config, str(folder))
    params = _t5_params(folder, sizes)
    expected = _t5_params(SD3_TINY / "text_encoder_3", sizes)
    np.testing.assert_array_equal(
        params["block_1"]["layer_1"]["DenseReluDense"]["wo"]["kernel"],
        expected["block_1"]["layer_1"]["DenseReluDense"]["wo"]["kernel"],
    )


@pytest.mark.parametrize(
    "part,values,match",
    [
        ("text_encoder_3", {"d_model": "48"}, "text_encoder_3/config.json has d_model='48'"),
        ("text_encoder_3", {"feed_forward_proj": "gated-tanh"}, "feed_forward_proj='gated-tanh'"),
        ("text_encoder_3", {"model_type": "mt5x"}, "model_type='mt5x'"),
        ("text_encoder_3", {"is_decoder": True}, "is_decoder=True"),
        ("text_encoder_3", {"num_layers": 3}, "has num_layers=3 but the weights hold 2"),
        # Refused from the headers before a module that deep is traced (it would not finish).
        ("text_encoder_3", {"num_layers": 1_000_000}, "num_layers=1000000 but the weights hold"),
        (
            "text_encoder_2",
            {"num_hidden_layers": 1_000_000},
            "num_hidden_layers=1000000 but the weights hold",
        ),
        ("text_encoder_3", {"layer_norm_epsilon": -1}, "layer_norm_epsilon=-1"),
        ("text_encoder", {"projection_dim": 0}, "text_encoder/config.json has projection_dim=0"),
        ("text_encoder_2", {"eos_token_id": [2, 3]}, "eos_token_id=[2, 3]"),
        ("text_encoder_2", {"model_type": "bert"}, "model_type='bert'"),
        ("text_encoder", {"hidden_size": 24}, "does not fit its config.json"),
    ],
)
def test_bad_config_keys_are_refused_in_one_line(tmp_path, part, values, match):
    folder = _copy(tmp_path)
    _edit_config(folder / part / "config.json", **values)
    _refused(folder, match)


@pytest.mark.parametrize(
    "part,edit,match",
    [
        ("text_encoder", "drop text_projection.weight", "missing 1 (text_projection.weight)"),
        ("text_encoder_2", "drop text_model.final_layer_norm.bias", "(final_layer_norm.bias)"),
        (
            "text_encoder_3",
            "drop encoder.block.1.layer.0.SelfAttention.k.weight",
            "SelfAttention.k",
        ),
        ("text_encoder_3", "add decoder.final_layer_norm.weight", "1 not mapped (decoder."),
    ],
)
def test_missing_and_leftover_tensors_are_refused(tmp_path, part, edit, match):
    folder = _copy(tmp_path)
    path = folder / part / "model.safetensors"
    tensors = safetensors_file.read_safetensors_file(str(path))
    action, name = edit.split()
    if action == "drop":
        del tensors[name]
    else:
        tensors[name] = np.ones((JOINT,), np.float32)
    save_file(tensors, str(path))
    message = _refused(folder, match)
    assert str(path) in message, message


@pytest.mark.parametrize("part", ["tokenizer", "tokenizer_3"])
def test_a_garbage_tokenizer_json_is_refused_in_one_line(tmp_path, part):
    folder = _copy(tmp_path)
    (folder / part / "tokenizer.json").write_text("{ this is not a tokenizer")
    _refused(folder, f"{folder / part}: its tokenizer files do not load")


def test_text_parts_that_do_not_fit_the_transformer_are_refused(tmp_path):
    folder = _copy(tmp_path, transformer={"joint_attention_dim": 64, "pooled_projection_dim": 32})
    _refused(folder, "has joint_attention_dim=64 but")
    _edit_config(
        folder / "transformer" / "config.json", joint_attention_dim=48, pooled_projection_dim=40
    )
    _refused(folder, "pooled_projection_dim=40 but the CLIP encoders' projection_dim sum is 32")


def test_every_refusal_is_one_error_class():
    assert issubclass(SD3TextFolderError, TextFolderError) and issubclass(
        TextFolderError, FolderError
    )
    assert issubclass(SD3TextFolderError, ValueError)


@pytest.mark.parametrize("clip_skip", [-1, 2])
def test_clip_skip_must_leave_a_layer(clip_skip):
    _refused(SD3_TINY, f"clip_skip={clip_skip} must count layers", clip_skip=clip_skip)


@pytest.mark.parametrize("folder, max_tokens", [("sd3_tiny", 77 + 16 + 1), ("sd_tiny", 0)])
def test_text_encoders_hold_bfloat16_weights_where_the_config_says(folder, max_tokens):
    """config.train.frozen_dtype='bfloat16': the pipeline's encoders keep half-size weights
    (T5-XXL's 19 GB become 9.5) and still compute in float32, within 2% of the float32 states."""
    from distill_jax.interop import pipeline

    folder = str(DATA / folder)
    prompts = ["a photo of a cat", "two"]
    states = {}
    for dtype in ("float32", "bfloat16"):
        encoder = pipeline.text_encoder(folder, None, max_tokens, dtype)
        params = getattr(encoder, "params", None) or (encoder.clip_params, encoder.t5_params)
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(dtype)}
        states[dtype], _ = encoder.encode(prompts)
        assert states[dtype].dtype == np.float32
    scale = np.abs(states["float32"]).max()
    error = np.abs(states["bfloat16"] - states["float32"]).max() / scale
    assert 0 < error < 0.02, error  # measured 0.8% and 1.0%


def test_a_cut_prompt_is_said_to_be_cut_where_it_was():
    """The warning names the tokenizer that cut: T5 at max_sequence_length, CLIP at 77."""
    encoder = SD3TextEncoder(SD3_TINY, max_sequence_length=4)
    short, long = "a cat", " ".join(["a photo of a cat"] * 20)
    assert encoder.encode([short, long])[1] == [False, True]
    assert encoder.cut_note(short) == ""
    note = encoder.cut_note(long)
    assert "T5 reads its first 4 tokens (config.text.max_sequence_length)" in note
    assert f"the CLIP encoders read its first {encoder.clip_length} tokens" in note
