"""Stable Diffusion 3's text side in Flax: prompts -> (prompt_embeds, pooled_prompt_embeds).

Reads a diffusers SD3 pipeline folder's six text parts with safetensors and tokenizers only (no
PyTorch, no transformers) and computes what StableDiffusion3Pipeline.encode_prompt (diffusers
0.42) computes for a prompt (the same prompt to all three encoders, no guidance):
- text_encoder/ + tokenizer/ (CLIP-L) and text_encoder_2/ + tokenizer_2/ (CLIP-G):
  transformers' CLIPTextModelWithProjection (`models.clip_text.ClipTextWithProjection`), each
  tokenizer padded ("max_length") and cut to the FIRST tokenizer's model_max_length (as
  encode_prompt does for both), no attention mask (causal only, padding attended);
  their states are hidden_states[-(clip_skip + 2)] (the penultimate layer's output by default,
  not through final_layer_norm) and their pooled outputs text_embeds (see ClipTextWithProjection
  for the end-token position);
- text_encoder_3/ + tokenizer_3/ (T5 v1.1): transformers' T5EncoderModel
  (`models.t5_encoder.T5Encoder`), padded and cut to `max_sequence_length`, no attention mask;
  its last_hidden_state. Without text_encoder_3/ (or with use_t5=False: diffusers' pipeline
  loaded with text_encoder_3=None) its states are zeros [B, max_sequence_length,
  joint_attention_dim];
- prompt_embeds = concat(CLIP-L states, CLIP-G states) on the last axis, zero-padded to T5's
  width, then T5's states after them along the sequence: [B, 77 + max_sequence_length,
  joint_attention_dim]; pooled_prompt_embeds = concat(CLIP-L, CLIP-G text_embeds) [B,
  projection_dim + projection_dim_2].

`SD3TextEncoder.encode` packs both into one condition (`models.mmdit.pack_condition`: pooled as
one extra last row), the `TextConditioner` interface every text run uses.

Files: config.json + model.safetensors (or transformers' shards: model.safetensors.index.json
and the files it names) in each text_encoder*/ folder; each tokenizer*/ folder as
`interop.text_encoder.load_tokenizer` reads it (tokenizer.json, or CLIP's vocab.json +
merges.txt, as SD3's tokenizer_2/ has them with pad token '!'). Every tensor must map to a
parameter with the expected shape and every parameter must be present; T5EncoderModel's
embedding is tied ('shared.weight' = 'encoder.embed_tokens.weight'): a file may hold either
name or both (then they must be equal), read as one tensor. CLIP names may carry
'text_model.' or not. Whatever cannot be built is refused in one line (`SD3TextFolderError`,
a `TextFolderError`, a FolderError and ValueError) naming the file and key or tensors.

If the folder has transformer/config.json, its joint_attention_dim must be T5's d_model and
its pooled_projection_dim the two projections' sum (the MMDiT takes these conditions).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

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
    read_json,
    read_sharded,
)
from distill_jax.interop.text_encoder import (
    TextFolderError,
    check_depth,
    check_vocabulary,
    encoder_params,
    encoder_sizes,
    load_tokenizer,
    read_text_shapes,
    read_text_tensors,
)
from distill_jax.models.clip_text import ClipTextWithProjection
from distill_jax.models.mmdit import condition_width, pack_condition
from distill_jax.models.t5_encoder import T5Encoder, T5Sizes, feed_forward, t5_tensor_names
from distill_jax.safetensors_file import read_safetensors_file, read_safetensors_shapes
from distill_jax.text_encoder import EncoderSizes, TextConditioner, params_from_tensors, tokenize

PROJECTION = "text_projection.weight"
T5_EMBEDDING, T5_TIED = "shared.weight", "encoder.embed_tokens.weight"
SHARDS_INDEX = "model.safetensors.index.json"
# transformers' CLIPTextConfig defaults of the keys SD3's configs may leave out.
_CLIP_DEFAULTS = {"projection_dim": 512, "eos_token_id": 49407}
_T5_SIZES = ("d_model", "d_kv", "num_heads", "num_layers", "d_ff", "vocab_size")
_T5_DEFAULTS = {
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "relu",
}


class SD3TextFolderError(TextFolderError):
    """An SD3 pipeline folder whose text parts cannot be read as its configs say."""


@dataclasses.dataclass(frozen=True)
class ClipPart:
    """One CLIPTextModelWithProjection of SD3: sizes, projection width, end token."""

    sizes: EncoderSizes
    projection: int
    eos_token_id: int


def clip_part(config: dict, where: str) -> ClipPart:
    """The ClipPart of a text_encoder{,_2}/config.json; refuses what cannot be built."""
    kind, sizes = encoder_sizes(config, where)
    if kind != "clip_text_model":
        raise SD3TextFolderError(
            f"{where} has model_type={kind!r}: accepted 'clip_text_model' "
            "(transformers' CLIPTextModelWithProjection)"
        )
    c = _CLIP_DEFAULTS | config
    return ClipPart(
        sizes,
        integer(c, "projection_dim", where),
        integer(c, "eos_token_id", where, low=0),
    )


def t5_sizes(config: dict, where: str) -> T5Sizes:
    """The T5Sizes of a text_encoder_3/config.json; refuses what cannot be built."""
    if config.get("model_type") != "t5":
        raise SD3TextFolderError(
            f"{where} has model_type={config.get('model_type')!r}: accepted 't5' "
            "(transformers' T5EncoderModel)"
        )
    if missing := [key for key in _T5_SIZES if key not in config]:
        raise SD3TextFolderError(f"{where} has no {', '.join(missing)}: accepted a T5 config")
    if config.get("is_decoder", False) is not False:
        raise SD3TextFolderError(
            f"{where} has is_decoder={config['is_decoder']!r}: accepted false (an encoder)"
        )
    c = _T5_DEFAULTS | config
    form = feed_forward(c["feed_forward_proj"])
    if form is None:
        raise SD3TextFolderError(
            f"{where} has feed_forward_proj={c['feed_forward_proj']!r}: accepted 'relu', "
            "'gated-gelu', or '[gated-](relu|gelu|gelu_new|silu)'"
        )
    buckets = integer(c, "relative_attention_num_buckets", where, low=4)
    return T5Sizes(
        width=integer(c, "d_model", where),
        head=integer(c, "d_kv", where),
        heads=integer(c, "num_heads", where),
        layers=integer(c, "num_layers", where),
        ffn=integer(c, "d_ff", where),
        vocab=integer(c, "vocab_size", where),
        buckets=buckets,
        max_distance=integer(c, "relative_attention_max_distance", where, low=buckets // 4 + 1),
        eps=number(c, "layer_norm_epsilon", where, positive=True),
        activation=form[0],
        gated=form[1],
    )


def read_shapes(folder: str) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a transformers model folder's weights, from the headers alone."""
    index = os.path.join(folder, SHARDS_INDEX)
    if not os.path.isfile(index):
        return read_text_shapes(folder)
    return read_sharded(index, read_safetensors_shapes, SD3TextFolderError)


def read_weights(folder: str) -> dict[str, np.ndarray]:
    """Every tensor of a transformers model folder: model.safetensors, or its indexed shards."""
    index = os.path.join(folder, SHARDS_INDEX)
    if not os.path.isfile(index):
        return read_text_tensors(folder)
    return read_sharded(index, read_safetensors_file, SD3TextFolderError)


def load_clip(abstract: PyTree, folder: str) -> PyTree:
    """A CLIPTextModelWithProjection folder's weights as params shaped as `abstract`.

    numpy float32: the CLIPTextModel tensors and text_projection.weight, for a
    ClipTextWithProjection.

    Raises:
      SD3TextFolderError: a file, tensor or size that does not fit, in one line.
    """
    where = os.path.join(folder, "config.json")
    config = read_json(where, "a CLIPTextModelWithProjection config")
    part = clip_part(config, where)
    tensors = read_weights(folder)
    projection = tensors.pop(PROJECTION, None)
    match_named_tensors(
        {} if projection is None else {PROJECTION: projection.shape},
        {PROJECTION: (part.projection, part.sizes.width)},
        os.path.join(folder, "model.safetensors"),
        what="a CLIPTextModelWithProjection",
        error=SD3TextFolderError,
    )
    params = encoder_params(tensors, folder, config, "clip_text_model", part.sizes)
    params = params | {"text_projection": {"kernel": np.asarray(projection.T, np.float32)}}
    return loaded_like(params, abstract, folder, "CLIPTextModelWithProjection", SD3TextFolderError)


def t5_expected_tensors(sizes: T5Sizes) -> dict[str, tuple[int, ...]]:
    """{tensor name: PyTorch shape} a T5EncoderModel of these sizes holds ('shared.weight')."""
    ids = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    shapes = jax.eval_shape(T5Encoder(sizes).init, jax.random.key(0), ids)["params"]
    flat = {
        "/".join(k.key for k in path): leaf.shape
        for path, leaf in jax.tree_util.tree_flatten_with_path(shapes)[0]
    }
    names = t5_tensor_names(sizes)
    if set(names.values()) != set(flat):  # the table and the module disagree: a bug
        raise AssertionError(f"unnamed Flax params: {sorted(set(flat) ^ set(names.values()))}")
    return {t: flat[f][::-1] if f.endswith("/kernel") else flat[f] for t, f in names.items()}


def load_t5(abstract: PyTree, folder: str) -> PyTree:
    """A T5EncoderModel folder's weights as T5Encoder params, shaped as `abstract`.

    numpy float32, every tensor used (the tied embedding once).

    Raises:
      SD3TextFolderError: a file, tensor or size that does not fit, in one line.
    """
    config_path = os.path.join(folder, "config.json")
    sizes = t5_sizes(read_json(config_path, "a T5EncoderModel config"), config_path)
    tensors = read_weights(folder)
    where = os.path.join(folder, "model.safetensors")
    if T5_TIED in tensors:
        tied = tensors.pop(T5_TIED)
        if T5_EMBEDDING not in tensors:
            tensors[T5_EMBEDDING] = tied
        elif not np.array_equal(tensors[T5_EMBEDDING], tied):
            raise SD3TextFolderError(
                f"{where}: {T5_EMBEDDING} and {T5_TIED} differ: accepted one tied embedding"
            )
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    check_layer_count(shapes, "encoder.block.", sizes.layers, "num_layers", f"{folder}/config.json")
    match_named_tensors(
        shapes,
        t5_expected_tensors(sizes),
        where,
        what=f"a T5 encoder (d_model {sizes.width}, {sizes.layers} layers)",
        hint=f"the embedding may be named {T5_EMBEDDING} or {T5_TIED} (tied)",
        error=SD3TextFolderError,
    )
    params = params_from_tensors(tensors, t5_tensor_names(sizes))
    return loaded_like(params, abstract, folder, "T5EncoderModel", SD3TextFolderError)


class SD3TextEncoder(TextConditioner):
    """SD3's three text encoders: prompts -> packed conditions [B, max_tokens, width].

    `encode_parts` gives encode_prompt's (prompt_embeds, pooled_prompt_embeds); `encode` packs
    them (`models.mmdit.pack_condition`). max_tokens = the first tokenizer's model_max_length
    + max_sequence_length + 1 (the pooled row); width = max(joint_attention_dim, pooled width).
    `tokenize` and `tokenizer` are CLIP-L's (tokenizer/): the tokens a warning about a cut
    prompt shows; `encode`'s truncated flags are any of the three tokenizers' (only CLIPs'
    without T5).

    Args:
      folder: the pipeline folder (text_encoder/, tokenizer/, text_encoder_2/, tokenizer_2/,
        and text_encoder_3/ + tokenizer_3/ unless T5 is left out).
      max_sequence_length: T5's tokens (encode_prompt's max_sequence_length, 256 by default).
      clip_skip: encode_prompt's clip_skip (None = 0: the penultimate layer's states).
      use_t5: False computes what diffusers computes with text_encoder_3=None (zeros).
      joint_attention_dim: the zeros' width without T5; by default transformer/config.json's.
    """

    def __init__(
        self,
        folder,
        max_sequence_length: int = 256,
        clip_skip: int | None = None,
        use_t5: bool = True,
        joint_attention_dim: int | None = None,
        dtype: str = "float32",
    ):
        try:
            self._build(
                os.fspath(folder), max_sequence_length, clip_skip, use_t5, joint_attention_dim
            )
            # On the device once, not with every call; bfloat16 (config.train.frozen_dtype)
            # halves T5-XXL's 19 GB of float32 weights. It computes in float32.
            self.clip_params, self.t5_params = jax.device_put(
                trees.cast_floating((self.clip_params, self.t5_params), dtype)
            )
        except SD3TextFolderError:
            raise
        except FolderError as error:  # core's and interop.text_encoder's refusals: one class
            raise SD3TextFolderError(str(error)) from None

    def _build(self, folder, max_sequence_length, clip_skip, use_t5, joint_attention_dim) -> None:
        if not os.path.isdir(folder):
            raise SD3TextFolderError(f"{folder} is not a directory")
        arguments = {"max_sequence_length": max_sequence_length}
        self.max_sequence_length = integer(arguments, "max_sequence_length", "SD3TextEncoder")
        clip_modules = self._read_clips(folder, clip_skip)
        clip_width = sum(m.sizes.width for m in clip_modules)
        pooled_width = sum(m.projection for m in clip_modules)
        t5_module, joint, source = self._read_t5(folder, use_t5, joint_attention_dim)
        _check_transformer(folder, joint, pooled_width, source)
        if clip_width > joint:
            raise SD3TextFolderError(
                f"the CLIP encoders' hidden sizes add up to {clip_width}, more than the T5 width "
                f"{joint} they are padded to"
            )
        self.joint_attention_dim, self.pooled_width = joint, pooled_width
        self.max_tokens = self.clip_length + self.max_sequence_length + 1
        self.width = condition_width(joint, pooled_width)
        length = self.max_sequence_length
        self._apply = jax.jit(
            lambda clip_params, t5_params, clip_ids, t5_ids: _encode(
                clip_modules, t5_module, clip_params, t5_params, clip_ids, t5_ids, joint, length
            )
        )

    def _read_clips(self, folder: str, clip_skip: int | None) -> list[ClipTextWithProjection]:
        """Both CLIPs' tokenizers, modules and params (CLIP-L's tokenizer sets the length)."""
        self.clip_tokenizers, clip_modules, self.clip_params = [], [], []
        for suffix in ("", "_2"):
            encoder_dir = os.path.join(folder, f"text_encoder{suffix}")
            where = os.path.join(encoder_dir, "config.json")
            config = read_json(where, f"SD3's text_encoder{suffix}")
            part = clip_part(config, where)
            tokenizer_dir = os.path.join(folder, f"tokenizer{suffix}")
            tokenizer, length, pad_id = load_tokenizer(tokenizer_dir)
            if not suffix:  # CLIP-L's: both CLIP tokenizers pad and cut to its length
                self.tokenizer, self.clip_length, self.pad_id = tokenizer, length, pad_id
            check_vocabulary(tokenizer, tokenizer_dir, part.sizes.vocab)
            if self.clip_length > part.sizes.positions:
                raise SD3TextFolderError(
                    f"{folder}/tokenizer/tokenizer_config.json: model_max_length "
                    f"{self.clip_length} exceeds max_position_embeddings {part.sizes.positions} "
                    f"of {where}"
                )
            if clip_skip is not None and not 0 <= clip_skip < part.sizes.layers:
                raise SD3TextFolderError(
                    f"clip_skip={clip_skip} must count layers of {encoder_dir} (0 to its "
                    f"num_hidden_layers - 1 = {part.sizes.layers - 1})"
                )
            self.clip_tokenizers.append((tokenizer, pad_id))
            module = ClipTextWithProjection(part.sizes, part.projection, part.eos_token_id)
            clip_modules.append(module.clone(skip=clip_skip or 0))
            check_depth(encoder_dir, "clip_text_model", part.sizes, read_shapes(encoder_dir))
            ids = jnp.zeros((1, 2), jnp.int32)  # the module is built once its depth is checked
            self.clip_params.append(load_clip(abstract_params(module, ids, ids), encoder_dir))
        return clip_modules

    def _read_t5(self, folder: str, use_t5: bool, joint_attention_dim: int | None):
        """(T5 module or None, the joint width, where that width comes from)."""
        t5_dir = os.path.join(folder, "text_encoder_3")
        self.use_t5 = bool(use_t5) and os.path.isdir(t5_dir)
        self.t5_params, self.t5_tokenizer, self.t5_pad_id = None, None, 0
        if not self.use_t5:
            return None, _joint_attention_dim(folder, joint_attention_dim), "joint_attention_dim"
        where = os.path.join(t5_dir, "config.json")
        sizes = t5_sizes(read_json(where, "SD3's text_encoder_3"), where)
        tokenizer_dir = os.path.join(folder, "tokenizer_3")
        self.t5_tokenizer, _, self.t5_pad_id = load_tokenizer(tokenizer_dir)
        check_vocabulary(self.t5_tokenizer, tokenizer_dir, sizes.vocab)
        check_layer_count(read_shapes(t5_dir), "encoder.block.", sizes.layers, "num_layers", where)
        ids = jnp.zeros((1, 2), jnp.int32)  # the module is built once its depth is checked
        self.t5_params = load_t5(abstract_params(T5Encoder(sizes), ids), t5_dir)
        if joint_attention_dim is not None and joint_attention_dim != sizes.width:
            raise SD3TextFolderError(
                f"joint_attention_dim={joint_attention_dim} is not {where}'s d_model {sizes.width}"
            )
        return T5Encoder(sizes), sizes.width, f"{where}'s d_model"

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """CLIP-L's (ids int32 [B, 77], mask int32 [B, 77], truncated [B])."""
        return tokenize(self.tokenizer, prompts, self.clip_length, self.pad_id)

    def cut_note(self, prompt: str) -> str:
        """Which tokenizers cut `prompt`, in words (for the warning about a cut prompt)."""
        notes = []
        if any(
            tokenize(t, [prompt], self.clip_length, pad)[2][0] for t, pad in self.clip_tokenizers
        ):
            notes.append(f"the CLIP encoders read its first {self.clip_length} tokens")
        if self.use_t5:
            length = self.max_sequence_length
            if tokenize(self.t5_tokenizer, [prompt], length, self.t5_pad_id)[2][0]:
                notes.append(
                    f"T5 reads its first {length} tokens (config.text.max_sequence_length)"
                )
        return " and ".join(notes)

    def encode_parts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """encode_prompt's (prompt_embeds, pooled_prompt_embeds), float32.

        prompt_embeds [B, 77 + max_sequence_length, joint_attention_dim], pooled_prompt_embeds
        [B, projection_dim + projection_dim_2].
        """
        embeds, pooled, _ = self._encode_parts(prompts)
        return embeds, pooled

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(pack_condition(prompt_embeds, pooled) float32 [B, max_tokens, width], truncated).

        truncated: any of the tokenizers cut the prompt (callers warn).
        """
        embeds, pooled, truncated = self._encode_parts(prompts)
        return pack_condition(embeds, pooled).astype(np.float32), truncated

    def _encode_parts(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        prompts = list(prompts)
        tokens = [tokenize(t, prompts, self.clip_length, pad) for t, pad in self.clip_tokenizers]
        if self.use_t5:
            length = self.max_sequence_length
            tokens.append(tokenize(self.t5_tokenizer, prompts, length, self.t5_pad_id))
        truncated = [any(cut) for cut in zip(*(t[2] for t in tokens), strict=True)]
        t5_ids = tokens[2][0] if self.use_t5 else None
        embeds, pooled = self._apply(
            self.clip_params, self.t5_params, [t[0] for t in tokens[:2]], t5_ids
        )
        return np.asarray(embeds, np.float32), np.asarray(pooled, np.float32), truncated


def _encode(clip_modules, t5_module, clip_params, t5_params, clip_ids, t5_ids, joint, length):
    """(prompt_embeds, pooled) of token ids: encode_prompt's arithmetic."""
    states, pooled = zip(
        *(
            module.apply({"params": params}, ids, jnp.ones_like(ids))
            for module, params, ids in zip(clip_modules, clip_params, clip_ids, strict=True)
        ),
        strict=True,
    )
    clip = jnp.concatenate(states, axis=-1)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, joint - clip.shape[-1])))
    if t5_module is None:
        t5 = jnp.zeros((clip.shape[0], length, joint), clip.dtype)
    else:
        t5 = t5_module.apply({"params": t5_params}, t5_ids)
    return jnp.concatenate([clip, t5], axis=1), jnp.concatenate(pooled, axis=-1)


def _joint_attention_dim(folder: str, given: int | None) -> int:
    """The T5 zeros' width without T5: the argument, else transformer/config.json's."""
    if given is not None:
        return integer({"joint_attention_dim": given}, "joint_attention_dim", "SD3TextEncoder")
    where = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(where):
        raise SD3TextFolderError(
            f"{folder} has no text_encoder_3/ (or use_t5=False) and no {where}: pass "
            "joint_attention_dim, the width of the zeros that stand for T5's states"
        )
    return integer(read_json(where, "SD3's transformer"), "joint_attention_dim", where)


def _check_transformer(folder: str, joint: int, pooled: int, joint_source: str) -> None:
    """Refuse text parts whose widths the folder's transformer/config.json does not take."""
    where = os.path.join(folder, "transformer", "config.json")
    if not os.path.isfile(where):
        return
    config = read_json(where, "SD3's transformer")
    for key, width, source in (
        ("joint_attention_dim", joint, joint_source),
        ("pooled_projection_dim", pooled, "the CLIP encoders' projection_dim sum"),
    ):
        if integer(config, key, where) != width:
            raise SD3TextFolderError(
                f"{where} has {key}={config[key]} but {source} is {width}: the text encoders "
                "are not this transformer's"
            )
