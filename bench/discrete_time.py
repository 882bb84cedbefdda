"""What the fractional-timestep choice of `diffusion/discrete.py` costs, and what rounding would.

A discrete teacher was trained at integer timesteps k only; our samplers and losses call it at
any log-SNR, which `timestep_from_logsnr` turns into a fractional k (linear in log-SNR between
the two trained neighbours). Two figures at random (z, t, label) of a run's training
distribution, each the mean |difference| in x-hat relative to the mean |x-hat|:
- exact GMM teacher (an exact denoiser written as a discrete epsilon network): the error of
  rounding k to the nearest trained timestep. Interpolation has none (tests/test_discrete.py);
- a real imported network (--teacher_dir, a diffusers DiT folder): how far its x-hat at the
  fractional k is from the linear interpolation of its x-hats at the two trained neighbours
  (the choice's departure from "trained behaviour"), and how far rounding would move it.

Usage: python bench/discrete_time.py [--teacher_dir tests/data/diffusers/dit_digits]
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.diffusion import discrete, gmm
from distill_jax.diffusion.parameterisation import xhat_from_output
from distill_jax.diffusion.schedule import alpha_sigma
from distill_jax.interop import core
from distill_jax.interop import dit as reader
from distill_jax.models import denoiser
from distill_jax.models.dit import DiT


def _relative(a, b, scale) -> float:
    return float(jnp.mean(jnp.abs(a - b)) / jnp.mean(jnp.abs(scale)))


def _gmm_rounding(mixture, name: str, kwargs: dict, num: int) -> None:
    table = discrete.logsnr_table(name, num_timesteps=1000, **kwargs)
    key_l, key_z, key_c = jax.random.split(jax.random.PRNGKey(0), 3)
    logsnr = jax.random.uniform(key_l, (num,), minval=table[-1], maxval=table[0])
    labels = jax.random.randint(key_c, (num,), 0, 5)
    z = jax.random.normal(key_z, (num, 2))
    k = discrete.timestep_from_logsnr(logsnr, table)

    def xhat(step):
        lam = discrete.logsnr_from_timestep(step, table)
        x = gmm.gmm_xhat_at_logsnr(mixture, z, lam, labels)
        alpha, sigma = alpha_sigma(lam)
        eps = (z - alpha[:, None] * x) / sigma[:, None]
        return xhat_from_output(eps, z, logsnr, parameterisation="eps")

    exact = gmm.gmm_xhat_at_logsnr(mixture, z, logsnr, labels)
    print(
        f"exact GMM, {name} betas: interpolated {_relative(xhat(k), exact, exact):.2e}, "
        f"rounded {_relative(xhat(jnp.round(k)), exact, exact):.2e}"
    )


def exact_gmm(num: int) -> None:
    """Rounding error of an exact discrete epsilon teacher, per beta schedule."""
    mixture = gmm.make_gmm(num_classes=4, dim=2)
    for name, kwargs in (
        ("linear", dict(beta_start=1e-4, beta_end=0.02)),
        ("scaled_linear", dict(beta_start=0.00085, beta_end=0.012)),
    ):
        _gmm_rounding(mixture, name, kwargs, num)


def network(folder: str, num: int) -> None:
    """A real DiT between its trained timesteps."""
    imported = reader.read_dit_folder(folder)
    model = denoiser.build_model(
        core.model_config(imported.model),
        data_shape=imported.data_shape,
        num_classes=imported.num_classes,
        use_guidance=False,
    )
    table = np.asarray(model.timestep_logsnrs)
    key_l, key_z, key_c = jax.random.split(jax.random.PRNGKey(1), 3)
    logsnr = jax.random.uniform(key_l, (num,), minval=table[-1], maxval=table[0])
    labels = jax.random.randint(key_c, (num,), 0, imported.num_classes + 1)
    z = jax.random.normal(key_z, (num, *imported.data_shape))
    k = discrete.timestep_from_logsnr(logsnr, table)
    parameterisation = imported.model["parameterisation"]

    def xhat(step):
        out = model.apply({"params": imported.params}, z, step, labels, method=DiT.on_timesteps)
        return xhat_from_output(out, z, logsnr, parameterisation=parameterisation)

    low, high = jnp.floor(k), jnp.ceil(k)
    frac = (k - low).reshape(-1, *([1] * len(imported.data_shape)))
    lerp = (1 - frac) * xhat(low) + frac * xhat(high)
    at_k = xhat(k)
    print(
        f"{folder}: x-hat at fractional k vs the lerp of its neighbours "
        f"{_relative(at_k, lerp, at_k):.2e}; rounding k would move it "
        f"{_relative(xhat(jnp.round(k)), at_k, at_k):.2e}"
    )


def main() -> None:
    """Print both figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher_dir", default="tests/data/diffusers/dit_digits")
    parser.add_argument("--num", type=int, default=4096)
    args = parser.parse_args()
    exact_gmm(args.num)
    network(args.teacher_dir, min(args.num, 1024))


if __name__ == "__main__":
    main()
