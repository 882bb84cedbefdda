"""Prompts of a text run: from strings to text conditions, and the evaluation's held-out prompts.

Prompts go through the run's frozen text encoder (`Run.text_encoder`) at sampling time. A
prompt longer than config.text.max_tokens tokens is cut to that length (its last token kept
as the end token, [SEP] or CLIP's end of text) with a warning naming it; the empty prompt is
the null condition of guidance, so its samples are unconditional whatever w is, which is said
too.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from absl import logging

from distill_jax.data import captions
from distill_jax.run.run import Run

# What `sample` draws on a text run when no prompt is given: one prompt per digit.
DEFAULT_PROMPTS = tuple(f"the digit {name}" for name in captions.NAMES)


def check_condition_kind(run: Run, *, prompts: Sequence[str] | None, labels) -> None:
    """Refuse prompts on a class-label run and class labels on a text run, in one line."""
    if run.text and labels:
        raise ValueError(
            "this run is text-conditioned (config.text.enabled): it takes prompts, not class "
            "labels. Use --prompt 'a thick seven' (repeatable) or --prompts_file FILE."
        )
    if not run.text and prompts:
        raise ValueError(
            "this run conditions on class labels, not text (config.text.enabled=False): use "
            f"--labels with classes 0..{run.info.num_classes - 1} instead of a prompt."
        )


def read_prompts_file(path: str) -> list[str]:
    """One prompt per line of a UTF-8 text file (an empty line is the empty prompt)."""
    try:
        with open(path, encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(
            f"--prompts_file={path!r} cannot be read ({type(error).__name__}: {error}): "
            "accepted a UTF-8 text file with one prompt per line."
        ) from None
    if not lines:
        raise ValueError(f"--prompts_file={path!r} is empty: accepted one prompt per line.")
    return lines


def encode_prompts(run: Run, prompts: Sequence[str]) -> np.ndarray:
    """Text conditions float32 [P, L, 384] of `prompts`, warning about cut and empty ones."""
    encoder = run.text_encoder()
    conditions, truncated = encoder.encode(list(prompts))
    for text, cut in zip(prompts, truncated, strict=True):
        if cut and hasattr(encoder, "cut_note"):  # an SD3 pipeline's: three tokenizers
            logging.warning(
                "prompt %r is longer than the model reads: %s; it was cut there, as diffusers "
                "does.",
                text,
                encoder.cut_note(text),
            )
        elif cut:
            ids, mask, _ = encoder.tokenize([text])
            kept = encoder.tokenizer.decode(
                [int(i) for i, m in zip(ids[0], mask[0], strict=True) if m]
            )
            logging.warning(
                "prompt %r is longer than the %d tokens the model reads (config.text.max_tokens"
                ", its start and end tokens included): it was cut to %r, as diffusers does.",
                text,
                encoder.max_tokens,
                kept,
            )
        if not text.strip():
            logging.warning(
                "the empty prompt is the null condition of guidance: its samples are "
                "unconditional (w changes nothing for them)."
            )
    return conditions


def prompt_conditions(
    run: Run, prompts: Sequence[str] | None, num: int
) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, index [num] into them, conditions [num, L, 384]): prompts cycled to num."""
    prompts = list(prompts) if prompts else list(DEFAULT_PROMPTS)
    index = np.resize(np.arange(len(prompts)), num).astype(np.int32)
    return prompts, index, encode_prompts(run, prompts)[index]


def evaluation_prompts(num: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts [num], digits [num], thickness ranks [num]) from the held-out templates.

    Row k names digit k % 10 with thickness word (k // 10) % 3 (thin, none, thick: ranks 0,
    1, 2), template (k // 30) % 3 of HELD_OUT_TEMPLATES and number form (k // 90) % 5, so
    any num that is a multiple of 30 is balanced over digits and thickness words.
    """
    k = np.arange(num)
    digits = k % captions.NUM_CLASSES
    ranks = (k // 10) % len(captions.THICKNESS_WORDS)
    templates = captions.HELD_OUT_TEMPLATES
    prompts = [
        captions.prompt(
            int(digits[i]),
            templates[(i // 30) % len(templates)],
            captions.THICKNESS_WORDS[int(ranks[i])],
            form=(i // 90) % len(captions.number_forms(0)),
        )
        for i in range(num)
    ]
    return prompts, digits.astype(np.int32), ranks.astype(np.int32)
