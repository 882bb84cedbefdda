"""PyTorch tensors mapped onto our parameters by name and shape: the one check every reader uses.

A checkpoint written elsewhere (diffusers' DiT, U-Net and AutoencoderKL, transformers' text
encoders) is read only when every tensor it holds is wanted, every wanted tensor is there and
each has the shape its config.json implies; anything else is refused in one line naming the
tensors, so a config that does not fit its weights is caught before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence


def match_named_tensors(
    found: Mapping[str, Sequence[int]],
    wanted: Mapping[str, Sequence[int]],
    where: str,
    *,
    what: str,
    our_shape: Callable[[str, tuple[int, ...]], tuple[int, ...]] | None = None,
    hint: str | None = None,
    error: type[Exception] = ValueError,
) -> None:
    """Refuse unless `found` {name: PyTorch shape} holds exactly the tensors `wanted` names.

    `wanted` maps each tensor name to its expected shape: in our layout when `our_shape`
    (name, PyTorch shape -> that shape in our layout) is given, else PyTorch's. `hint` is added
    to the message when names are missing or left over.

    Raises:
      error: one line, '{where} does not hold {what} of its config.json's size: missing N (...);
        M not mapped (...)', or '{where}: tensor {name} has shape ..., which does not fit its
        config.json (expected ...)', the first misshapen tensor in `wanted`'s order.
    """
    missing, extra = sorted(set(wanted) - set(found)), sorted(set(found) - set(wanted))
    if missing or extra:
        parts = [f"missing {len(missing)} ({', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(extra)} not mapped ({', '.join(extra[:3])})"] if extra else []
        parts += [hint] if hint else []
        raise error(f"{where} does not hold {what} of its config.json's size: {'; '.join(parts)}")
    for name, want in wanted.items():
        shape = tuple(int(d) for d in found[name])
        got = shape if our_shape is None else tuple(our_shape(name, shape))
        if got != tuple(want):
            layout = "" if our_shape is None else " in our layout"
            raise error(
                f"{where}: tensor {name} has shape {shape}, which does not fit its config.json "
                f"(expected {tuple(want)}{layout})"
            )
