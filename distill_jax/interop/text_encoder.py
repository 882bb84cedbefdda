"""A diffusers pipeline's text encoder and tokenizer in Flax: prompts -> prompt_embeds.

Reads a pipeline's `text_encoder/` (config.json + model.safetensors, transformers layout) and
`tokenizer/` folders with safetensors and tokenizers only (no PyTorch, no transformers), so a
prompt gives the prompt_embeds that diffusers' StableDiffusionPipeline.encode_prompt gives:
- `tokenizer(prompt, padding="max_length", max_length=model_max_length, truncation=True)`:
  a CLIP byte-level BPE (tokenizer.json, or vocab.json + merges.txt built as transformers'
  CLIPTokenizer builds them) or a BERT WordPiece (tokenizer.json, or vocab.txt);
- the text encoder: transformers' CLIPTextModel (model_type 'clip_text_model': pre-LayerNorm,
  causal self-attention, final_layer_norm) or BertModel (model_type 'bert', e.g. a folder whose
  text_encoder/ is all-MiniLM-L6-v2: `text_encoder.MiniLM` at the config's sizes);
- the attention mask is passed only when config.json says use_attention_mask (as encode_prompt):
  otherwise CLIP attends causally over padding too, and BERT attends to every position. Padding
  states are returned as the encoder computes them, not zeroed;
- clip_skip=None: the last hidden state (after final_layer_norm); clip_skip=k: hidden state
  [-(k+1)] (the output of layer N-k, 0 = the embeddings) through final_layer_norm.

Every tensor of the safetensors file must map to a parameter with the expected shape and every
parameter must be present (IGNORED_TENSORS are buffers and heads that prompt_embeds never use);
anything else is refused in one line (`TextFolderError`, a ValueError) naming the tensors.
CLIP files may carry the 'text_model.' prefix (released pipelines) or not (transformers 5).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax import trees
from distill_jax.interop.core import (
    FolderError,
    PyTree,
    abstract_params,
    check_layer_count,
    integer,
    loaded_like,
    match_named_tensors,
    number,
)
from distill_jax.models.clip_text import ClipText
from distill_jax.safetensors_file import read_safetensors_file, read_safetensors_shapes
from distill_jax.text_encoder import (
    ACTIVATIONS,
    EncoderSizes,
    MiniLM,
    TextConditioner,
    bert_tensor_names,
    params_from_tensors,
    tokenize,
    torch_names,
)

if TYPE_CHECKING:
    from tokenizers import Tokenizer

# Tensors that may be in a text encoder file and are not parameters of prompt_embeds: index
# buffers older transformers saved, and BertModel's pooler (encode_prompt takes output [0]).
IGNORED_TENSORS = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    "pooler.dense.weight",
    "pooler.dense.bias",
)
CLIP_PREFIX = "text_model."
# transformers' CLIPTextConfig and BertConfig defaults of the keys a config.json may leave out;
# the sizes (_SIZES) it must name.
_DEFAULTS = {
    "clip_text_model": {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "type_vocab_size": 0},
    "bert": {"hidden_act": "gelu", "layer_norm_eps": 1e-12, "type_vocab_size": 2},
}
_SIZES = ("hidden_size", "num_attention_heads", "num_hidden_layers", "intermediate_size",
          "vocab_size", "max_position_embeddings")  # fmt: skip
# CLIP's pre-tokenizer split (transformers 5 CLIPTokenizer), special tokens first.
_CLIP_SPLIT = (
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
)


class TextFolderError(FolderError):
    """A text_encoder/ or tokenizer/ folder that does not hold what its config says."""


def clip_tensor_names(sizes: EncoderSizes) -> dict[str, str]:
    """{CLIPTextModel tensor name (transformers 5, no 'text_model.'): `ClipText` param path}."""
    names = torch_names("embed", "embeddings.token_embedding", "token_embedding")
    names |= torch_names("embed", "embeddings.position_embedding", "position_embedding")
    names |= torch_names("norm", "final_layer_norm", "final_layer_norm")
    layer_modules = [
        ("linear", "self_attn.q_proj", "self_attn/query"),
        ("linear", "self_attn.k_proj", "self_attn/key"),
        ("linear", "self_attn.v_proj", "self_attn/value"),
        ("linear", "self_attn.out_proj", "self_attn/output"),
        ("norm", "layer_norm1", "layer_norm1"),
        ("norm", "layer_norm2", "layer_norm2"),
        ("linear", "mlp.fc1", "fc1"),
        ("linear", "mlp.fc2", "fc2"),
    ]
    for i in range(sizes.layers):
        for kind, torch_name, flax_path in layer_modules:
            names |= torch_names(kind, f"encoder.layers.{i}.{torch_name}", f"layer_{i}/{flax_path}")
    return names


def encoder_sizes(
    config: dict, where: str = "text encoder config.json"
) -> tuple[str, EncoderSizes]:
    """(model_type, sizes) of a text_encoder/config.json; refuses what cannot be built."""
    kind = config.get("model_type")
    if kind not in _DEFAULTS:
        raise TextFolderError(
            f"{where} has model_type={kind!r}: accepted 'clip_text_model' ("
            "transformers' CLIPTextModel) or 'bert' (BertModel)"
        )
    if missing := [key for key in _SIZES if key not in config]:
        raise TextFolderError(
            f"{where} has no {', '.join(missing)}: accepted a transformers config"
        )
    for key in _SIZES:
        integer(config, key, where)
    c = _DEFAULTS[kind] | config
    number(c, "layer_norm_eps", where, positive=True)
    integer(c, "type_vocab_size", where, low=0)
    sizes = EncoderSizes(
        width=c["hidden_size"],
        heads=c["num_attention_heads"],
        layers=c["num_hidden_layers"],
        ffn=c["intermediate_size"],
        vocab=c["vocab_size"],
        positions=c["max_position_embeddings"],
        token_types=c["type_vocab_size"],
        eps=c["layer_norm_eps"],
        activation=c["hidden_act"],
    )
    if sizes.activation not in ACTIVATIONS:
        raise TextFolderError(
            f"text encoder hidden_act {sizes.activation!r} is not supported "
            f"(only {', '.join(ACTIVATIONS)})"
        )
    if sizes.width % sizes.heads:
        raise TextFolderError(
            f"text encoder hidden_size {sizes.width} is not a multiple of "
            f"num_attention_heads {sizes.heads}"
        )
    if c.get("position_embedding_type", "absolute") != "absolute":
        raise TextFolderError(
            f"BERT position_embedding_type {c['position_embedding_type']!r} is not supported "
            "(only 'absolute')"
        )
    return kind, sizes


def _module(kind: str, sizes: EncoderSizes, skip: int = 0) -> nn.Module:
    return ClipText(sizes, skip) if kind == "clip_text_model" else MiniLM(sizes)


def _names(kind: str, sizes: EncoderSizes) -> dict[str, str]:
    return clip_tensor_names(sizes) if kind == "clip_text_model" else bert_tensor_names(sizes)


def expected_tensors(config: dict) -> dict[str, tuple[int, ...]]:
    """{tensor name: PyTorch shape} that a text encoder of this config.json must hold.

    No weights: the shapes are jax.eval_shape's of the Flax module. CLIP names without
    'text_model.'.
    """
    kind, sizes = encoder_sizes(config)
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(_module(kind, sizes).init, jax.random.key(0), ids, ids)["params"]
    flat = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    names = _names(kind, sizes)
    if set(names.values()) != set(flat):  # the tables above and the modules disagree: a bug
        raise AssertionError(f"unnamed Flax params: {sorted(set(flat) - set(names.values()))}")
    return {t: flat[f][::-1] if f.endswith("/kernel") else flat[f] for t, f in names.items()}


def match_tensors(
    config: dict, found: dict[str, tuple[int, ...]], where: str = "the text encoder"
) -> dict[str, str]:
    """{name in the file: name in `expected_tensors(config)`} of a file's {name: shape}.

    Refuses in one line (TextFolderError) any missing, unexpected or misshapen tensor.
    """
    expected = expected_tensors(config)
    renamed = {name.removeprefix(CLIP_PREFIX): name for name in found}
    if len(renamed) < len(found):
        raise TextFolderError(f"{where} holds tensors both with and without {CLIP_PREFIX!r}")
    used = {name: file_name for name, file_name in renamed.items() if name not in IGNORED_TENSORS}
    match_named_tensors(
        {name: found[file_name] for name, file_name in used.items()},
        expected,
        where,
        what=f"a {config.get('model_type')} text encoder (hidden_size "
        f"{config.get('hidden_size')}, {config.get('num_hidden_layers')} layers)",
        error=TextFolderError,
    )
    return {file_name: name for name, file_name in used.items()}


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as error:
        raise TextFolderError(f"{path} is not a readable JSON file ({error})") from None


def _token(value) -> str | None:
    """A special token of tokenizer_config.json: a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def _clip_bpe(folder: str, special: dict) -> Tokenizer:
    """transformers 5 CLIPTokenizer's tokenizer, from vocab.json + merges.txt."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE

    vocab = _read_json(os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "merges.txt"), encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    unk = special.get("unk_token", "<|endoftext|>")
    model = BPE(
        vocab,
        merges,
        continuing_subword_prefix="",
        end_of_word_suffix="</w>",
        fuse_unk=False,
        unk_token=unk,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    bos = special.get("bos_token", "<|startoftext|>")
    eos = special.get("eos_token", "<|endoftext|>")
    _add_special(tokenizer, special)
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, tokenizer.token_to_id(eos)), (bos, tokenizer.token_to_id(bos)), False, False
    )
    return tokenizer


def _bert_wordpiece(folder: str, config: dict, special: dict) -> Tokenizer:
    """transformers 5 BertTokenizer's tokenizer, from vocab.txt."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = {token.rstrip("\n"): i for i, token in enumerate(f.readlines())}
    tokenizer = Tokenizer(WordPiece(vocab, unk_token=special.get("unk_token", "[UNK]")))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        strip_accents=config.get("strip_accents"),
        lowercase=config.get("do_lower_case", True),
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    cls, sep = special.get("cls_token", "[CLS]"), special.get("sep_token", "[SEP]")
    _add_special(tokenizer, special)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{cls}:0 $A:0 {sep}:0",
        special_tokens=[(cls, tokenizer.token_to_id(cls)), (sep, tokenizer.token_to_id(sep))],
    )
    return tokenizer


def _add_special(tokenizer: Tokenizer, special: dict) -> None:
    """The named special tokens are matched whole in prompts, as transformers does."""
    from tokenizers import AddedToken

    tokens = dict.fromkeys(t for t in special.values() if tokenizer.token_to_id(t) is not None)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


def _build_tokenizer(folder: str, config: dict, special: dict) -> Tokenizer:
    """The folder's tokenizer from whichever files it has; files that do not load are refused."""
    from tokenizers import Tokenizer

    accepted = "tokenizer.json, vocab.json + merges.txt (CLIP) or vocab.txt (BERT)"
    try:
        if os.path.isfile(os.path.join(folder, "tokenizer.json")):
            tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        elif all(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.json", "merges.txt")):
            tokenizer = _clip_bpe(folder, special)
        elif os.path.isfile(os.path.join(folder, "vocab.txt")):
            tokenizer = _bert_wordpiece(folder, config, special)
        else:
            raise TextFolderError(f"{folder} has none of {accepted}")
    except TextFolderError:
        raise
    except Exception as error:  # noqa: BLE001 - tokenizers raises bare Exception on bad files
        reason = " ".join(str(error).split())[:200]
        raise TextFolderError(
            f"{folder}: its tokenizer files do not load ({type(error).__name__}: {reason}); "
            f"accepted a transformers tokenizer folder with {accepted}"
        ) from None
    return tokenizer


def load_tokenizer(folder: str) -> tuple[Tokenizer, int, int]:
    """(tokenizers.Tokenizer, model_max_length, pad id) of a transformers tokenizer/ folder.

    The tokenizer adds its special tokens; its own padding and truncation are off.
    """
    config = _read_json(os.path.join(folder, "tokenizer_config.json"))
    extra = os.path.join(folder, "special_tokens_map.json")
    special_map = (_read_json(extra) if os.path.isfile(extra) else {}) | config
    special = {
        key: _token(special_map[key])
        for key in ("bos_token", "eos_token", "unk_token", "pad_token", "cls_token", "sep_token")
        if _token(special_map.get(key)) is not None
    }
    tokenizer = _build_tokenizer(folder, config, special)
    tokenizer.no_truncation()
    tokenizer.no_padding()
    length = config.get("model_max_length")
    pad_id = tokenizer.token_to_id(special.get("pad_token", ""))
    if not isinstance(length, int) or length < 2 or length > 1 << 20:
        raise TextFolderError(
            f"{folder}/tokenizer_config.json: model_max_length {length!r} "
            "must be a token count (at least 2)"
        )
    if pad_id is None:
        raise TextFolderError(
            f"{folder}: the pad token {special.get('pad_token')!r} is not in the vocabulary"
        )
    return tokenizer, length, pad_id


class PipelineTextEncoder(TextConditioner):
    """A diffusers pipeline's tokenizer + text encoder: prompts -> prompt_embeds.

    prompt_embeds float32 [B, max_tokens, width] as StableDiffusionPipeline.encode_prompt
    computes them (`width`: hidden_size, `max_tokens`: model_max_length, `vocab_size`: the
    encoder's).
    """

    def __init__(
        self,
        text_encoder_dir: str,
        tokenizer_dir: str,
        clip_skip: int | None = None,
        dtype: str = "float32",
    ):
        """`dtype`: its weights' (config.train.frozen_dtype; it computes in float32)."""
        config = _read_json(os.path.join(text_encoder_dir, "config.json"))
        kind, sizes = encoder_sizes(config, os.path.join(text_encoder_dir, "config.json"))
        self.tokenizer, self.max_tokens, self.pad_id = load_tokenizer(tokenizer_dir)
        self.width, self.vocab_size = sizes.width, sizes.vocab
        check_vocabulary(self.tokenizer, tokenizer_dir, sizes.vocab)
        if self.max_tokens > sizes.positions:
            raise TextFolderError(
                f"the tokenizer's model_max_length {self.max_tokens} exceeds the text encoder's "
                f"max_position_embeddings {sizes.positions}"
            )
        if clip_skip is not None and not (
            kind == "clip_text_model" and 0 <= clip_skip <= sizes.layers
        ):
            raise TextFolderError(
                f"clip_skip={clip_skip} must count layers of a CLIP text encoder (0 to its "
                f"num_hidden_layers); {text_encoder_dir} is a {kind} model with {sizes.layers}"
            )
        check_depth(text_encoder_dir, kind, sizes, read_text_shapes(text_encoder_dir))
        ids = jnp.zeros((1, 2), jnp.int32)  # the module is built once its depth is checked
        params = load(abstract_params(_module(kind, sizes), ids, ids), text_encoder_dir)
        self.params = trees.cast_floating(params, dtype)
        self.use_attention_mask = bool(config.get("use_attention_mask", False))
        self._apply = jax.jit(_module(kind, sizes, clip_skip or 0).apply)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(ids int32 [B, max_tokens], mask int32 [B, max_tokens], truncated [B])."""
        return tokenize(self.tokenizer, prompts, self.max_tokens, self.pad_id)

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(prompt_embeds float32 [B, max_tokens, width], truncated [B]).

        Callers warn about truncated prompts (their end is dropped, the end token kept).
        """
        ids, mask, truncated = self.tokenize(prompts)
        attended = mask if self.use_attention_mask else np.ones_like(mask)
        states = self._apply({"params": self.params}, ids, attended)
        return np.asarray(states, np.float32), truncated


def check_vocabulary(tokenizer: Tokenizer, tokenizer_dir, vocab_size: int) -> None:
    """Refuse a tokenizer with ids beyond the text encoder's vocab_size (another model's)."""
    tokens = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    if tokens > vocab_size:
        raise TextFolderError(
            f"the tokenizer in {tokenizer_dir} has {tokens} tokens but the text encoder's "
            f"vocab_size is {vocab_size}: they are not from the same model"
        )


def read_text_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a text encoder folder's model.safetensors, from its header alone."""
    return _read_text_file(folder, read_safetensors_shapes)


def check_depth(folder: str, kind: str, sizes: EncoderSizes, shapes: dict) -> None:
    """The config's num_hidden_layers against the weights' `shapes`, before a module is built.

    A config claiming a million layers is refused here, not traced.
    """
    shapes = {k.removeprefix(CLIP_PREFIX): v for k, v in shapes.items()}
    prefix = "encoder.layers." if kind == "clip_text_model" else "encoder.layer."
    check_layer_count(shapes, prefix, sizes.layers, "num_hidden_layers", f"{folder}/config.json")


def read_text_tensors(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a text encoder folder's model.safetensors, float32 numpy (checked first).

    TextFolderError (one line) when the file is absent or not a valid safetensors file.
    """
    return _read_text_file(folder, read_safetensors_file)


def _read_text_file(folder: str, read_file):
    path = os.path.join(folder, "model.safetensors")
    if not os.path.isfile(path):
        raise TextFolderError(f"{folder} has no model.safetensors (only safetensors is read)")
    try:
        return read_file(path)
    except (OSError, ValueError) as error:
        raise TextFolderError(f"{path}: {error}") from None


def encoder_params(
    tensors: dict[str, np.ndarray], folder: str, config: dict, kind: str, sizes: EncoderSizes
) -> dict:
    """The Flax params of `_module(kind, sizes)` from a text encoder folder's tensors.

    Every tensor but IGNORED_TENSORS must be one of the encoder's, with its shape, and every
    parameter present (`match_tensors`), or TextFolderError names them.
    """
    path = os.path.join(folder, "model.safetensors")
    check_depth(folder, kind, sizes, {k: v.shape for k, v in tensors.items()})
    names = match_tensors(config, {k: v.shape for k, v in tensors.items()}, path)
    renamed = {name: tensors[file_name] for file_name, name in names.items()}
    return params_from_tensors(renamed, _names(kind, sizes))


def load(abstract: PyTree, folder: str) -> PyTree:
    """A text encoder folder's weights as our module's params, shaped as `abstract`.

    A CLIPTextModel or a BERT-family model; numpy float32; `abstract` is
    `core.abstract_params` of the module its config.json describes.

    Raises:
      TextFolderError: a file, tensor or size that does not fit, in one line.
    """
    where = os.path.join(folder, "config.json")
    config = _read_json(where)
    kind, sizes = encoder_sizes(config, where)
    params = encoder_params(read_text_tensors(folder), folder, config, kind, sizes)
    return loaded_like(params, abstract, folder, f"{kind} text encoder", TextFolderError)
