"""Pytree leaves by name: the one walker behind checkpoint checks, weight copies and export.

A leaf's name is its path with '/' between keys, e.g. 'Dense_0/kernel' (dict keys, sequence
indices and dataclass fields alike), the names Flax parameters are known by.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


def key_name(key: Any) -> str:
    """One path entry of `jax.tree_util.tree_flatten_with_path` as text."""
    for attribute in ("key", "idx", "name"):
        if hasattr(key, attribute):
            return str(getattr(key, attribute))
    return str(key)


def leaf_name(path: tuple) -> str:
    """A leaf's path as 'a/b/0'."""
    return "/".join(key_name(k) for k in path)


def named_leaves(tree: PyTree) -> dict[str, Any]:
    """{name: leaf} in jax's flattening order (None subtrees have no leaves)."""
    return {leaf_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatch(
    got: PyTree, want: PyTree, *, got_name: str = "the checkpoint", want_name: str = "the model"
) -> str | None:
    """None when both trees have the same leaf names and shapes; else the first difference."""
    have, need = named_leaves(got), named_leaves(want)
    for name in sorted(set(have) | set(need)):
        if name not in have:
            return f"parameter {name} of {want_name} is not in {got_name}"
        if name not in need:
            return f"parameter {name} of {got_name} is not in {want_name}"
        if tuple(have[name].shape) != tuple(need[name].shape):
            return (
                f"parameter {name} has shape {tuple(have[name].shape)} in {got_name} and "
                f"{tuple(need[name].shape)} in {want_name}"
            )
    return None


def cast_floating(tree: PyTree, dtype: str) -> PyTree:
    """`tree` with its floating leaves in `dtype`; other leaves unchanged.

    Leaves are arrays, or ShapeDtypeStructs (which keep their sharding); 'float32' or a None
    tree returns `tree` as it is.

    Frozen networks (config.train.frozen_dtype) are held so: 'bfloat16' halves their memory.
    """
    if dtype == "float32" or tree is None:
        return tree
    target = jnp.dtype(dtype)

    def cast(leaf):
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        if isinstance(leaf, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(leaf.shape, target, sharding=leaf.sharding)
        return leaf.astype(target)

    return jax.tree.map(cast, tree)
