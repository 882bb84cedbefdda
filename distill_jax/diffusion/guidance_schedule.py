"""Guidance schedules: the guidance weight of every sampling step, w_k = w * g(t_k).

A distilled student takes w at every call, so guiding each step differently costs nothing. A
schedule is a gain profile g over time t in [0, 1] that scales the nominal weight w:

- constant: g = 1, every step guided with w (what a scalar w means everywhere);
- interval [lo, hi]: g = 1 where lo <= t <= hi, else 0. Kynkaanniemi et al. 2024 ("Applying
  guidance in a limited interval improves sample and distribution quality") guide only at
  middle noise levels; w = 0 is the conditional model, so steps outside are unguided, and a
  guided teacher evaluates only its conditional half there;
- ramp (g1, g0): g linear in t, g(t) = g0 + (g1 - g0) t, from g1 at pure noise (t = 1) to g0
  at the data (t = 0); e.g. ramp:0,2 grows from no guidance to 2w, and averages 1 over t.

Step k of an N-step sampler started at t_start calls the network at t_k = t_start (N - k) / N,
k = 0..N-1, so `weights` returns [N] host-side float32 values, the per-step array that every
sampler in `samplers` accepts (as [N, B] or [N, 1]).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KINDS = ("constant", "interval", "ramp")
ACCEPTED = "accepted 'constant', 'interval:LO,HI' with 0 <= LO <= HI <= 1, or 'ramp:G1,G0'"


@dataclasses.dataclass(frozen=True)
class GuidanceSchedule:
    """A gain profile g(t); `parse_schedule` builds one from its name.

    Attributes:
      kind: 'constant', 'interval' or 'ramp'.
      interval: (lo, hi), the guided times of an interval schedule.
      ramp: (g1, g0), a ramp's gain at t = 1 and at t = 0.
    """

    kind: str = "constant"
    interval: tuple[float, float] = (0.0, 1.0)
    ramp: tuple[float, float] = (1.0, 1.0)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"guidance schedule kind {self.kind!r} is unknown: {ACCEPTED}.")
        numbers = (*self.interval, *self.ramp)
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers):
            raise ValueError(f"guidance schedule {self.name!r} has a non-finite number: {ACCEPTED}")
        lo, hi = self.interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval [{lo:g}, {hi:g}] is invalid: {ACCEPTED}.")

    @property
    def name(self) -> str:
        """'constant', 'interval:LO,HI' or 'ramp:G1,G0' (what `parse_schedule` reads back)."""
        if self.kind == "interval":
            return "interval:{:g},{:g}".format(*self.interval)
        if self.kind == "ramp":
            return "ramp:{:g},{:g}".format(*self.ramp)
        return "constant"

    def gain(self, t: np.ndarray) -> np.ndarray:
        """g(t) for times t in [0, 1] (float32, t's shape)."""
        t = np.asarray(t, np.float32)
        if self.kind == "interval":
            lo, hi = np.float32(self.interval[0]), np.float32(self.interval[1])
            return ((t >= lo) & (t <= hi)).astype(np.float32)
        if self.kind == "ramp":
            g1, g0 = np.float32(self.ramp[0]), np.float32(self.ramp[1])
            return (g0 + (g1 - g0) * t).astype(np.float32)
        return np.ones_like(t)

    def weights(self, w: float, *, steps: int, t_start: float = 1.0) -> np.ndarray:
        """[steps] float32: the guidance weight w * g(t_k) of each step, first step first."""
        t = np.float32(t_start) * np.arange(steps, 0, -1, dtype=np.float32) / np.float32(steps)
        return (np.float32(w) * self.gain(t)).astype(np.float32)


CONSTANT = GuidanceSchedule()


def parse_schedule(text: str) -> GuidanceSchedule:
    """The schedule named `text`: 'constant' (or ''), 'interval:LO,HI' or 'ramp:G1,G0'."""
    kind, _, args = str(text).strip().partition(":")
    if kind in ("", "constant") and not args:
        return CONSTANT
    try:
        values = tuple(float(v) for v in args.split(","))
    except ValueError:
        values = ()
    if kind not in ("interval", "ramp") or len(values) != 2:
        raise ValueError(f"guidance schedule {text!r} is invalid: {ACCEPTED}.")
    if kind == "interval":
        return GuidanceSchedule("interval", interval=values)
    return GuidanceSchedule("ramp", ramp=values)


def guided_evaluations(weights: np.ndarray) -> int:
    """Network evaluations per sample of a guided teacher over steps with these weights.

    2 per step (conditional and unconditional halves), 1 where every example's w is 0.
    `weights` is [steps] or [steps, B].
    """
    weights = np.asarray(weights).reshape(len(weights), -1)
    return int(sum(1 if np.all(step == 0) else 2 for step in weights))
