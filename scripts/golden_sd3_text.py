"""Write the golden files that check distill_jax.interop.sd3_text against transformers + diffusers.

Needs PyTorch, transformers and diffusers (`pip install -e .[diffusers]`); CI never runs it, the
tests read what it wrote into tests/data/diffusers/. Nothing is downloaded: every part is a
seeded random tiny one made here (every LayerNorm / T5LayerNorm weight and bias randomised too):
- sd3_tiny/tokenizer/: the tiny CLIP byte-level BPE of scripts/golden_text.py (model_max_length
  77), with its tokenizer.json;
- sd3_tiny/tokenizer_2/: the same BPE with pad token '!' (as SD3's CLIP-G tokenizer), written as
  SD3's release has it: vocab.json + merges.txt + tokenizer_config.json, no tokenizer.json;
- sd3_tiny/tokenizer_3/: a small Unigram (SentencePiece-style: NFKC, whitespace split,
  Metaspace '▁') learnt by the `tokenizers` library from digit captions
  (distill_jax.data.captions) and golden_text's captions, wrapped as transformers'
  T5TokenizerFast (<pad> 0, </s> 1, <unk> 2, 3 sentinels) and saved by save_pretrained
  (model_max_length 256);
- sd3_tiny/text_encoder/: CLIPTextModelWithProjection, hidden 16, projection 16, 2 layers, 2
  heads, MLP 32, quick_gelu, eos_token_id 2 (the pre-#24773 configs SD3 ships: pooled at the
  largest id);
- sd3_tiny/text_encoder_2/: CLIPTextModelWithProjection, hidden 24, projection 16, 2 layers,
  2 heads, MLP 48, gelu, eos_token_id the real end token (pooled at its first position);
- sd3_tiny/text_encoder_3/: T5EncoderModel, d_model 48, d_kv 8, 2 heads (inner width 16, not
  d_model), 2 layers, d_ff 64, gated-gelu, 8 buckets, max distance 16;
- t5_relu_tiny/: a T5EncoderModel with feed_forward_proj 'relu' (config.json +
  model.safetensors), for the non-gated feed-forward;
- sd3_text_golden.npz: for PROMPTS, each tokenizer's ids (padding="max_length",
  truncation=True; tokenizer_3 at MAX_SEQUENCE_LENGTH), and StableDiffusion3Pipeline.
  encode_prompt's prompt_embeds and pooled_prompt_embeds (max_sequence_length
  MAX_SEQUENCE_LENGTH, no guidance) with clip_skip None and 1, and with text_encoder_3=None
  (T5 zeros, width the tiny transformer's joint_attention_dim 48); t5_relu_tiny's
  last_hidden_state of the tokenizer_3 ids without and with their attention mask.

The pipeline object is built with the tiny parts; its transformer (for the no-T5 zeros' width
only) is a random SD3Transformer2DModel made here and not saved (scripts/golden_sd3.py writes
sd3_tiny/transformer/).

Run (in an environment with the [diffusers] extra):
    python scripts/golden_sd3_text.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import golden_text  # noqa: E402  (scripts/ is not a package)

from distill_jax.data import captions  # noqa: E402

MAX_SEQUENCE_LENGTH = 16  # T5's tokens in the golden (SD3's default is 256)
PROMPTS = [
    "",
    "a thin, left-leaning seven",
    golden_text.LONG,
    "café crème brûlée, naïve façade; 一只猫 在屋顶上 🐱🚀",
    "A THICK #7!!! It's the cat's toy <|endoftext|> you'll see",
]


def _t5_training_text() -> list[str]:
    """Digit captions (train and held-out templates, every attribute word) and phrases."""
    rng = np.random.default_rng(captions.CAPTION_SEED)
    words = ["thin", "thick", "small", "left-leaning", "right-leaning"]
    templates = captions.TRAIN_TEMPLATES + captions.HELD_OUT_TEMPLATES
    digits = [digit for digit in range(10) for _ in range(30)]
    lines = [captions.make_caption(digit, words, templates, rng) for digit in digits]
    return lines + golden_text._captions()


def write_t5_tokenizer(folder: str) -> T5TokenizerFast:
    """A Unigram learnt by tokenizers' UnigramTrainer, saved as transformers' T5TokenizerFast."""
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    trainer = trainers.UnigramTrainer(
        vocab_size=200,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        max_piece_length=10,
    )
    tokenizer.train_from_iterator(_t5_training_text(), trainer)
    # The trainer's scores differ in their last digits from run to run (parallel sums) and
    # equal ones come in any order: rounded and sorted, the files are the same on every run.
    pieces = json.loads(tokenizer.to_str())["model"]["vocab"]
    vocab = [(piece, round(score, 6)) for piece, score in pieces]
    vocab = vocab[:3] + sorted(vocab[3:], key=lambda piece: (-piece[1], piece[0]))
    assert [piece for piece, _ in vocab[:3]] == ["<pad>", "</s>", "<unk>"], vocab[:3]
    t5 = T5TokenizerFast(vocab=vocab, extra_ids=3, model_max_length=256)
    t5._tokenizer.normalizer = tokenizer.normalizer  # T5's own: a precompiled NFKC, then this
    t5.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def write_clip_tokenizers(out: str) -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """tokenizer/ (with tokenizer.json) and tokenizer_2/ (pad '!', vocab.json + merges.txt)."""
    first = golden_text.write_clip_tokenizer(os.path.join(out, "tokenizer"))
    folder = os.path.join(out, "tokenizer_2")
    golden_text.write_clip_tokenizer(folder)
    CLIPTokenizer.from_pretrained(folder, pad_token="!").save_pretrained(folder)
    os.remove(os.path.join(folder, "tokenizer.json"))  # as released: built from vocab + merges
    return first, CLIPTokenizer.from_pretrained(folder)


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """Every norm weight and every bias random (init makes them 1 and 0): their mapping shows."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                base = 1.0 if name.endswith("weight") else 0.0
                noise = torch.randn(parameter.shape, generator=generator)
                parameter.copy_(base + 0.1 * noise)


def write_clip(folder: str, vocab_size: int, seed: int, **sizes) -> CLIPTextModelWithProjection:
    """A seeded random CLIPTextModelWithProjection, saved as safetensors."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        num_hidden_layers=2,
        num_attention_heads=2,
        bos_token_id=vocab_size - 2,
        pad_token_id=1,
        **sizes,
    )
    model = CLIPTextModelWithProjection(config).eval()
    _randomise_norms(model, seed + 100)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def write_t5(folder: str, vocab_size: int, seed: int, feed_forward_proj: str) -> T5EncoderModel:
    """A seeded random tiny T5EncoderModel, saved as safetensors."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=48,
        d_kv=8,
        num_heads=2,
        num_layers=2,
        d_ff=64,
        feed_forward_proj=feed_forward_proj,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )
    model = T5EncoderModel(config).eval()
    _randomise_norms(model, seed + 100)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _pipeline(parts: dict, transformer=None) -> StableDiffusion3Pipeline:
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None, **parts)


def _encode(pipe: StableDiffusion3Pipeline, clip_skip: int | None = None) -> tuple:
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            PROMPTS,
            None,
            None,
            device="cpu",
            do_classifier_free_guidance=False,
            clip_skip=clip_skip,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    return embeds.numpy().astype(np.float32), pooled.numpy().astype(np.float32)


def _ids(tokenizer, length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True)
    return np.asarray(tokens.input_ids, np.int32), np.asarray(tokens.attention_mask, np.int32)


def write_goldens(out: str) -> None:
    """sd3_tiny's text parts, t5_relu_tiny and sd3_text_golden.npz."""
    folder = os.path.join(out, "sd3_tiny")
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3") + tuple(
        f"tokenizer{suffix}" for suffix in ("", "_2", "_3")
    ):
        shutil.rmtree(os.path.join(folder, part), ignore_errors=True)
    tokenizer, tokenizer_2 = write_clip_tokenizers(folder)
    tokenizer_3 = write_t5_tokenizer(os.path.join(folder, "tokenizer_3"))
    parts = dict(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3,
        text_encoder=write_clip(
            os.path.join(folder, "text_encoder"),
            len(tokenizer),
            seed=0,
            hidden_size=16,
            intermediate_size=32,
            projection_dim=16,
            hidden_act="quick_gelu",
            eos_token_id=2,
        ),
        text_encoder_2=write_clip(
            os.path.join(folder, "text_encoder_2"),
            len(tokenizer_2),
            seed=1,
            hidden_size=24,
            intermediate_size=48,
            projection_dim=16,
            hidden_act="gelu",
            eos_token_id=tokenizer_2.eos_token_id,
        ),
        text_encoder_3=write_t5(
            os.path.join(folder, "text_encoder_3"), len(tokenizer_3) + 2, 2, "gated-gelu"
        ),
    )
    golden = {}
    for key, part, length in (
        ("ids_1", tokenizer, 77),
        ("ids_2", tokenizer_2, 77),
        ("ids_3", tokenizer_3, MAX_SEQUENCE_LENGTH),
    ):
        golden[key], golden[key.replace("ids", "mask")] = _ids(part, length)
    pipe = _pipeline(parts)
    golden["prompt_embeds"], golden["pooled_prompt_embeds"] = _encode(pipe)
    embeds, pooled = _encode(pipe, clip_skip=1)
    golden["prompt_embeds_clip_skip_1"], golden["pooled_prompt_embeds_clip_skip_1"] = embeds, pooled
    torch.manual_seed(3)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=48,
        caption_projection_dim=16,
        pooled_projection_dim=32,
        pos_embed_max_size=16,
    )
    no_t5 = _pipeline(parts | dict(text_encoder_3=None, tokenizer_3=None), transformer)
    golden["prompt_embeds_no_t5"], golden["pooled_prompt_embeds_no_t5"] = _encode(no_t5)
    relu = write_t5(os.path.join(out, "t5_relu_tiny"), len(tokenizer_3) + 2, 4, "relu")
    with torch.no_grad():
        ids = torch.as_tensor(golden["ids_3"], dtype=torch.long)
        golden["t5_relu_states"] = relu(ids).last_hidden_state.numpy()
        mask = torch.as_tensor(golden["mask_3"], dtype=torch.long)
        golden["t5_relu_states_masked"] = relu(ids, attention_mask=mask).last_hidden_state.numpy()
    np.savez_compressed(
        os.path.join(out, "sd3_text_golden.npz"),
        prompts=np.asarray(PROMPTS),
        max_sequence_length=np.asarray(MAX_SEQUENCE_LENGTH),
        **golden,
    )


def main() -> None:
    """Write every golden file into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    write_goldens(out)
    print(f"wrote SD3 text golden files to {out}")


if __name__ == "__main__":
    main()
