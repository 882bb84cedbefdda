"""Write the golden files that check distill_jax.interop.text_encoder against transformers + diffusers.

Needs PyTorch, transformers and diffusers (`pip install -e .[diffusers]`); CI never runs it, the
tests read what it wrote into tests/data/diffusers/:
- sd_tiny/tokenizer/: a tiny CLIP byte-level BPE tokenizer. Nothing can be downloaded, so one is
  learnt here (byte-level BPE after CLIP's normaliser and pre-tokeniser, '</w>' suffix) from
  generated captions, written as CLIP's vocab.json + merges.txt (256 bytes, 256 bytes+'</w>',
  the merges, <|startoftext|>, <|endoftext|>), loaded by transformers' CLIPTokenizer and saved
  by its save_pretrained (model_max_length 77). vocab.json and merges.txt stay beside the
  tokenizer.json it writes, as in released pipelines that have no tokenizer.json;
- sd_tiny/text_encoder/: a seeded random CLIPTextModel (width 32, 4 layers, 4 heads, MLP 37,
  quick_gelu, 77 positions; LayerNorm weights made random too), saved as safetensors;
- bert_tiny/{text_encoder,tokenizer}/: a seeded random BertModel (width 32, 2 layers, 4 heads,
  MLP 37, 32 positions) and a BertTokenizer built from a small vocab.txt written here
  (model_max_length 16), both saved by save_pretrained;
- text_golden.npz: for each awkward prompt of PROMPTS, the token ids transformers' tokenizer
  gives (padding="max_length", truncation=True), the prompt_embeds that diffusers'
  StableDiffusionPipeline.encode_prompt returns with clip_skip None and 1 (1: its lines
  replayed, see `_embeds`), and with clip_skip None when the text encoder's config says
  use_attention_mask; the same for bert_tiny (`bert_*` keys; no attention mask is passed);
- sd15_text_manifest.json, sd21_text_manifest.json: every tensor name and shape of the SD 1.5
  and SD 2.1 text encoders, built on the meta device from their config.json values (below), and
  that config.json. The names are transformers 5's; the released files put them under
  'text_model.' and add the position_ids buffer (the tests check both).

Run (in an environment with the [diffusers] extra):
    python scripts/golden_text.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode

# runwayml/stable-diffusion-v1-5 text_encoder/config.json (OpenAI CLIP ViT-L/14's text tower).
SD15_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
# stabilityai/stable-diffusion-2-1 text_encoder/config.json (OpenCLIP ViT-H/14's text tower as
# diffusers ships it: the last of its 24 layers dropped, so 23).
SD21_TEXT_CONFIG = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)
CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
LONG = (
    "a very detailed photograph of a small grey cat sitting on the roof of an old red house "
    "at sunset, with tall green trees, a blue lake, white clouds, birds flying over the hills, "
    "a wooden boat on the water, children playing near the shore, mountains far away, soft warm "
    "light, high contrast, sharp focus, award winning, trending on the internet, eight k"
)
PROMPTS = [
    "",
    "a photo of a cat",
    LONG,
    "hello, world!!! (a) [b] {c} -- 'quoted' \"double\"... ;:?",
    "café crème brûlée, naïve façade; 一只猫 在屋顶上 🐱🚀",
    "  a   photo\tof\n a  CAT  ",
    "A THICK SEVEN, It's the cat's 42nd toy <|endoftext|> you'll see",
]


def _captions() -> list[str]:
    """English-like training text for the tiny BPE: digit captions and common phrases."""
    digits = "zero one two three four five six seven eight nine".split()
    adjectives = "thick thin slanted small large bold faint curly neat messy tall wide".split()
    nouns = "cat dog horse house tree lake boat bird mountain cloud photo painting".split()
    colours = "red green blue grey white black yellow warm soft".split()
    lines = [f"a {a} {d}" for a in adjectives for d in digits]
    lines += [f"a photo of a {c} {n}" for c in colours for n in nouns]
    lines += [f"a painting of the {n} near the {m}, digital art!" for n in nouns for m in nouns]
    lines += [LONG, "it's the cat's toy; you'll see what we've done. I'm sure they'd like it."]
    return lines


def _train_merges(count: int = 300) -> list[tuple[str, str]]:
    """CLIP-style byte-level BPE merges learnt from `_captions`.

    A plain BPE loop rather than tokenizers' BpeTrainer, whose ties between equally frequent
    pairs fall differently from run to run: here the most frequent pair wins, ties to the
    smallest pair, so the files are the same on every run.
    """
    tokenizer = Tokenizer(BPE())
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    words: Counter = Counter()
    for line in _captions():
        normalised = tokenizer.normalizer.normalize_str(line)
        for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(normalised):
            words[tuple(word[:-1]) + (word[-1] + "</w>",)] += 1
    merges = []
    while len(merges) < count:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        words = Counter({_merge(word, best): n for word, n in words.items()})
    return merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    """word with every adjacent occurrence of pair joined into one symbol."""
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer(folder: str) -> CLIPTokenizer:
    """vocab.json + merges.txt in CLIP's layout, then transformers' own save_pretrained."""
    merges = _train_merges()
    byte_chars = list(bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    assert len(vocab) == len(tokens), "a merge repeats a token"
    with tempfile.TemporaryDirectory() as raw:
        with open(os.path.join(raw, "vocab.json"), "w", encoding="utf-8") as f:
            json.dump(vocab, f, ensure_ascii=False)
        with open(os.path.join(raw, "merges.txt"), "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer.from_pretrained(raw, model_max_length=77)
        tokenizer.save_pretrained(folder)
        for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json only
            os.replace(os.path.join(raw, name), os.path.join(folder, name))
    return CLIPTokenizer.from_pretrained(folder)


def _randomise_norms(model: torch.nn.Module, seed: int) -> None:
    """LayerNorm weights and biases start at 1 and 0; random ones test their mapping."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))


def write_clip_encoder(folder: str, vocab_size: int) -> CLIPTextModel:
    """A seeded random tiny CLIPTextModel, saved as safetensors."""
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=4,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model = CLIPTextModel(config).eval()
    _randomise_norms(model, 1)
    model.save_pretrained(folder, safe_serialization=True)
    return model


def write_bert(folder: str) -> tuple[BertModel, BertTokenizer]:
    """A tiny BertModel and WordPiece tokenizer in transformers' layout."""
    words = "a an the of on in photo painting cat dog house tree red blue seven one two".split()
    pieces = ["##s", "##ing", "##ed", "##er", "##ly", "##e", "##a", "##o", "##t", "##n"]
    letters = list("abcdefghijklmnopqrstuvwxyz0123456789,.!?;:'\"()-")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + words + pieces
    vocab += ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab = list(dict.fromkeys(vocab))  # 'a' is a letter and a word: one id each token
    os.makedirs(os.path.join(folder, "tokenizer"), exist_ok=True)
    vocab_path = os.path.join(folder, "tokenizer", "vocab.txt")
    with open(vocab_path, "w", encoding="utf-8") as f:
        f.write("".join(token + "\n" for token in vocab))
    tokenizer = BertTokenizer.from_pretrained(
        os.path.join(folder, "tokenizer"), model_max_length=16
    )
    tokenizer.save_pretrained(os.path.join(folder, "tokenizer"))
    torch.manual_seed(2)
    config = BertConfig(
        vocab_size=len(vocab) + 3,  # an encoder may have more rows than the tokenizer uses
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=32,
    )
    model = BertModel(config).eval()
    _randomise_norms(model, 3)
    model.save_pretrained(os.path.join(folder, "text_encoder"), safe_serialization=True)
    return model, BertTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))


def _embeds(pipe: StableDiffusionPipeline, clip_skip: int | None = None) -> np.ndarray:
    """StableDiffusionPipeline.encode_prompt's prompt_embeds for PROMPTS.

    With clip_skip, encode_prompt (diffusers 0.42.1) calls text_encoder.text_model.
    final_layer_norm, which transformers 5's CLIPTextModel no longer has (its modules moved up
    a level, text_model. is gone from its names): AttributeError. So that branch is replayed
    here line for line, with final_layer_norm where it now is.
    """
    with torch.no_grad():
        if clip_skip is None:
            embeds, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, False)
            return embeds.numpy().astype(np.float32)
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        ids = tokenizer(
            PROMPTS,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden = encoder(ids, attention_mask=None, output_hidden_states=True).hidden_states
        return encoder.final_layer_norm(hidden[-(clip_skip + 1)]).numpy().astype(np.float32)


def _pipeline(encoder, tokenizer) -> StableDiffusionPipeline:
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=encoder,
        tokenizer=tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def write_goldens(out: str) -> None:
    """Both tiny folders and text_golden.npz."""
    tokenizer = write_clip_tokenizer(os.path.join(out, "sd_tiny", "tokenizer"))
    encoder = write_clip_encoder(os.path.join(out, "sd_tiny", "text_encoder"), len(tokenizer))
    pipe = _pipeline(encoder, tokenizer)
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True).input_ids
    golden = {"ids": np.asarray(ids, np.int32)}
    golden["embeds"] = _embeds(pipe)
    golden["embeds_clip_skip_1"] = _embeds(pipe, 1)
    encoder.config.use_attention_mask = True
    golden["embeds_attention_mask"] = _embeds(pipe)
    bert, bert_tokenizer = write_bert(os.path.join(out, "bert_tiny"))
    bert_ids = bert_tokenizer(PROMPTS, padding="max_length", max_length=16, truncation=True)
    golden["bert_ids"] = np.asarray(bert_ids.input_ids, np.int32)
    golden["bert_embeds"] = _embeds(_pipeline(bert, bert_tokenizer))
    np.savez(os.path.join(out, "text_golden.npz"), prompts=np.asarray(PROMPTS), **golden)


def write_manifests(out: str) -> None:
    """The SD 1.5 and SD 2.1 text encoders' tensor names and shapes, on the meta device."""
    for name, values in (("sd15", SD15_TEXT_CONFIG), ("sd21", SD21_TEXT_CONFIG)):
        config = CLIPTextConfig(**values)
        with torch.device("meta"):
            model = CLIPTextModel(config)
        manifest = {
            "config": json.loads(config.to_json_string()),
            "tensors": {key: list(t.shape) for key, t in model.state_dict().items()},
        }
        with open(os.path.join(out, f"{name}_text_manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1, sort_keys=True)


def main() -> None:
    """Write every golden file into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    os.makedirs(out, exist_ok=True)
    write_goldens(out)
    write_manifests(out)
    print(f"wrote text golden files to {out}")


if __name__ == "__main__":
    main()
