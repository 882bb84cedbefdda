"""Discrete DDPM schedules as continuous log-SNR time (distill_jax/diffusion/discrete.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import discrete, gmm
from distill_jax.diffusion.parameterisation import xhat_from_output
from distill_jax.diffusion.schedule import alpha_sigma

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "diffusers", "schedules.npz")
SCHEDULES = {
    "linear": dict(beta_start=0.0001, beta_end=0.02),
    "scaled_linear": dict(beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_start=0.0001, beta_end=0.02),
}


def _table(name: str) -> np.ndarray:
    return discrete.logsnr_table(name, num_timesteps=1000, **SCHEDULES[name])


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_alphas_cumprod_equal_diffusers(name):
    golden = np.load(GOLDEN)[f"alphas_cumprod/{name}"]
    betas = discrete.discrete_betas(name, num_timesteps=1000, **SCHEDULES[name])
    np.testing.assert_allclose(discrete.alphas_cumprod(betas), golden, rtol=2e-6, atol=1e-9)


def test_ddim_timesteps_equal_diffusers():
    golden = np.load(GOLDEN)
    names = [n for n in golden.files if n.startswith("timesteps/")]
    assert len(names) == 36
    for name in names:
        _, spacing, offset, steps = name.split("/")
        ours = discrete.scheduler_timesteps(
            int(steps), num_timesteps=1000, spacing=spacing, steps_offset=int(offset)
        )
        np.testing.assert_array_equal(ours, golden[name], err_msg=name)


def _discrete_network(mixture, table, prediction_type):
    """The exact denoiser written as a discrete teacher: timestep k in, a prediction out."""

    def network(z, timestep, labels):
        logsnr = discrete.logsnr_from_timestep(timestep, table)
        x = gmm.gmm_xhat_at_logsnr(mixture, z, logsnr, labels)
        alpha, sigma = alpha_sigma(logsnr)
        eps = (z - alpha[:, None] * x) / sigma[:, None]
        return {
            "epsilon": eps,
            "v_prediction": alpha[:, None] * eps - sigma[:, None] * x,
            "sample": x,
        }[prediction_type]

    return network


@pytest.mark.parametrize("prediction_type", sorted(discrete.PREDICTION_TYPES))
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_exact_gmm_round_trip(name, prediction_type):
    """Through the conversion, a discrete exact denoiser gives the exact x-hat, on and
    between grid points, in float64."""
    with jax.enable_x64(True):
        table = _table(name)
        mixture = gmm.make_gmm(num_classes=4, dim=3, std=0.3)
        lo, hi = discrete.trained_logsnr_range(table)
        between = (table[:-1] + table[1:]) / 2
        logsnr = jnp.asarray(
            np.concatenate(
                [table[[0, 1, 500, 998, 999]], between[[0, 37, 600, 998]], np.linspace(lo, hi, 7)]
            ),
            jnp.float64,
        )
        batch = logsnr.shape[0]
        key_x, key_e = jax.random.split(jax.random.PRNGKey(0))
        labels = jnp.arange(batch) % 5  # 4 is the null class
        x = jax.random.normal(key_x, (batch, 3), jnp.float64)
        alpha, sigma = alpha_sigma(logsnr)
        z = alpha[:, None] * x + sigma[:, None] * jax.random.normal(key_e, (batch, 3), jnp.float64)
        network = _discrete_network(mixture, table, prediction_type)
        timestep = discrete.timestep_from_logsnr(logsnr, table)
        assert timestep.dtype == jnp.float64
        xhat = xhat_from_output(
            network(z, timestep, labels),
            z,
            logsnr,
            parameterisation=discrete.parameterisation_of(prediction_type),
        )
        exact = gmm.gmm_xhat_at_logsnr(mixture, z, logsnr, labels)
        assert xhat.dtype == jnp.float64
        np.testing.assert_allclose(xhat, exact, atol=1e-6, rtol=0)
        # Rounding to the nearest trained timestep instead is not exact between grid points.
        rounded = xhat_from_output(
            network(z, jnp.round(timestep), labels),
            z,
            logsnr,
            parameterisation=discrete.parameterisation_of(prediction_type),
        )
        if prediction_type != "sample":
            assert float(jnp.max(jnp.abs(rounded - exact))) > 1e-5


def test_timestep_interpolation_is_monotone_and_clipped():
    table = _table("linear")
    logsnr = jnp.linspace(table[-1] - 3, table[0] + 3, 1001)
    k = np.asarray(discrete.timestep_from_logsnr(logsnr, table))
    assert np.all(np.diff(k) <= 0) and k[0] == 999 and k[-1] == 0
    np.testing.assert_allclose(
        discrete.timestep_from_logsnr(table[[0, 10, 999]], table), [0, 10, 999], atol=2e-3
    )


def test_times_of_timesteps_visit_the_grid():
    table = _table("scaled_linear")
    lo, hi = discrete.trained_logsnr_range(table)
    steps = discrete.scheduler_timesteps(10, num_timesteps=1000, steps_offset=1)
    times = discrete.times_of_timesteps(steps, table, logsnr_min=lo, logsnr_max=hi)
    assert times.shape == (11,) and times[0] == 0 and np.all(np.diff(times) > 0)
    from distill_jax.diffusion.schedule import logsnr_schedule_cosine

    back = discrete.timestep_from_logsnr(
        logsnr_schedule_cosine(times[1:], logsnr_min=lo, logsnr_max=hi), table
    )
    np.testing.assert_allclose(back, steps[::-1], atol=0.02)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(beta_schedule="sigmoid"), "beta_schedule='sigmoid' is not supported"),
        (dict(beta_schedule="linear", beta_end=1.5), "no finite, strictly falling log-SNR"),
    ],
)
def test_bad_schedules_refused(kwargs, message):
    kwargs = {"beta_start": 0.0001, "beta_end": 0.02, "num_timesteps": 1000, **kwargs}
    name = kwargs.pop("beta_schedule")
    with pytest.raises(ValueError, match=message):
        discrete.logsnr_table(name, **kwargs)
