"""Golden files for distill_jax's flow-matching schedule (distill_jax/diffusion/flow.py).

Needs PyTorch and diffusers (`pip install -e .[diffusers]`); CI never runs it. Writes
tests/data/diffusers/flow_schedules.npz: for diffusers' FlowMatchEulerDiscreteScheduler with
a static shift (1, SD3's 3.0) and with use_dynamic_shifting (FLUX's base_shift 0.5, max_shift
1.15 at several token counts, both time_shift_types), its training sigmas and the sigmas and
timesteps that set_timesteps(N) gives for several N.

Run: python scripts/golden_flow.py [--out tests/data/diffusers]
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

STEPS = (1, 2, 4, 28, 50)


def main() -> None:
    """Write flow_schedules.npz into --out."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tests/data/diffusers")
    out = parser.parse_args().out
    arrays = {}
    for shift in (1.0, 3.0):
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        arrays[f"train/static/{shift}"] = scheduler.sigmas.numpy()
        for n in STEPS:
            scheduler.set_timesteps(n)
            arrays[f"sigmas/static/{shift}/{n}"] = scheduler.sigmas.numpy()
            arrays[f"timesteps/static/{shift}/{n}"] = scheduler.timesteps.numpy()
    for kind in ("exponential", "linear"):
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type=kind
        )
        for tokens in (256, 1024, 4096):
            mu = calculate_shift(tokens, 256, 4096, 0.5, 1.15)
            arrays[f"mu/{tokens}"] = np.float64(mu)
            for n in STEPS:
                scheduler.set_timesteps(n, mu=mu)
                arrays[f"sigmas/{kind}/{tokens}/{n}"] = scheduler.sigmas.numpy()
    path = os.path.join(out, "flow_schedules.npz")
    np.savez(path, **arrays)
    print(f"wrote {len(arrays)} arrays to {path}")


if __name__ == "__main__":
    main()
