"""Rematerialisation of a network's blocks: what the backward pass keeps, and what it recomputes.

`config.model.remat` names a policy (`POLICIES`); `rematted(Block, policy)` is the block's
class wrapped in `flax.linen.remat` with it (the class itself for 'none'). The U-Net wraps its
ResNet and attention blocks, the DiT its transformer blocks, the SD U-Net its ResNet and
transformer blocks. The parameters keep their names, so checkpoints and imported weights do
not change, and the gradients are the same (tests/test_remat.py); only memory and time move:
- 'none': every intermediate of the forward pass is kept for the backward pass;
- 'full': only each block's inputs are kept; the block's forward runs again in the backward
  pass (about a third more compute, the least memory);
- 'dots_saveable': matmul and convolution outputs without batch dimensions are kept, the
  cheap elementwise work between them recomputed (maxtext's 'minimal');
- 'offload': as 'dots_saveable', but those outputs are kept in host memory (pinned_host) and
  brought back for the backward pass, for accelerators whose host link is fast (TPU v5p);
  backends without a pinned host memory space refuse it when the step compiles.
"""

from __future__ import annotations

import flax.linen as nn
import jax

POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


def check_policy(policy: str) -> str:
    """`policy` if it names one of POLICIES; ValueError naming them otherwise."""
    if policy not in POLICIES:
        raise ValueError(
            f"config.model.remat={policy!r} is unknown: accepted {', '.join(map(repr, POLICIES))}."
        )
    return policy


def rematted(block: type[nn.Module], policy: str, static_argnums: tuple[int, ...] = ()):
    """`block` wrapped to rematerialise under `policy` ('none': `block` itself).

    static_argnums: positions of its __call__'s non-array arguments, self counted as 0 (e.g. a
    `train` flag).
    """
    if check_policy(policy) == "none":
        return block
    return nn.remat(block, policy=POLICIES[policy], static_argnums=static_argnums)
