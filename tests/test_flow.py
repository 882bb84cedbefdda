"""Flow-matching teachers as this library's VP process (distill_jax/diffusion/flow.py)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax.diffusion import flow, gmm, guidance, samplers
from distill_jax.diffusion.parameterisation import network_input, xhat_from_output
from distill_jax.diffusion.schedule import alpha_sigma, logsnr_schedule_cosine

GOLDEN = os.path.join(os.path.dirname(__file__), "data", "diffusers", "flow_schedules.npz")
K = 1000


def test_static_shift_sigmas_equal_diffusers():
    golden = np.load(GOLDEN)
    for shift in (1.0, 3.0):
        np.testing.assert_allclose(
            flow.training_sigmas(K, shift), golden[f"train/static/{shift}"], rtol=1e-6
        )
        for n in (1, 2, 4, 28, 50):
            sigmas = flow.scheduler_sigmas(n, num_train_timesteps=K, shift=shift)
            np.testing.assert_allclose(sigmas, golden[f"sigmas/static/{shift}/{n}"], rtol=1e-6)
            np.testing.assert_allclose(
                sigmas[:-1] * K, golden[f"timesteps/static/{shift}/{n}"], rtol=1e-6
            )


@pytest.mark.parametrize("kind", flow.TIME_SHIFT_TYPES)
def test_dynamic_shift_sigmas_equal_diffusers(kind):
    golden = np.load(GOLDEN)
    for tokens in (256, 1024, 4096):
        mu = flow.dynamic_shift_mu(
            tokens, base_image_seq_len=256, max_image_seq_len=4096, base_shift=0.5, max_shift=1.15
        )
        assert mu == pytest.approx(float(golden[f"mu/{tokens}"]), abs=1e-12)
        for n in (1, 4, 28):
            sigmas = flow.scheduler_sigmas(n, num_train_timesteps=K, mu=mu, time_shift_type=kind)
            np.testing.assert_allclose(sigmas, golden[f"sigmas/{kind}/{tokens}/{n}"], rtol=1e-6)


def _velocity_network(mixture):
    """The exact GMM denoiser written as a flow teacher: (z_fm, K s, labels) -> eps - x."""

    def network(z_fm, timestep, labels):
        s = timestep / K
        logsnr = flow.logsnr_from_flow_sigma(s)
        alpha, sigma = alpha_sigma(logsnr)
        z = z_fm * (alpha + sigma)[:, None]  # z_fm / r is the VP z
        x = gmm.gmm_xhat_at_logsnr(mixture, z, logsnr, labels)
        eps = (z_fm - (1 - s)[:, None] * x) / s[:, None]
        return eps - x

    return network


def test_exact_gmm_velocity_gives_exact_xhat():
    """Through the conversion, an exact velocity teacher gives the exact x-hat (float64)."""
    with jax.enable_x64(True):
        mixture = gmm.make_gmm(num_classes=4, dim=3, std=0.3)
        logsnr = jnp.asarray([-19.0, -6.0, -1.0, 0.0, 0.7, 3.0, 9.0, 15.0], jnp.float64)
        batch = logsnr.shape[0]
        key_x, key_e = jax.random.split(jax.random.PRNGKey(0))
        labels = jnp.arange(batch) % 5  # 4 is the null class
        x = jax.random.normal(key_x, (batch, 3), jnp.float64)
        alpha, sigma = alpha_sigma(logsnr)
        z = alpha[:, None] * x + sigma[:, None] * jax.random.normal(key_e, (batch, 3), jnp.float64)
        network = _velocity_network(mixture)
        velocity = network(
            network_input(z, logsnr, parameterisation="flow"), flow.flow_timestep(logsnr, K), labels
        )
        xhat = xhat_from_output(velocity, z, logsnr, parameterisation="flow")
        exact = gmm.gmm_xhat_at_logsnr(mixture, z, logsnr, labels)
        np.testing.assert_allclose(xhat, exact, atol=1e-10, rtol=0)
        # The noise levels invert exactly, and a wrong input scale is not exact.
        s = flow.flow_sigma_from_logsnr(logsnr)
        np.testing.assert_allclose(flow.logsnr_from_flow_sigma(s), logsnr, rtol=1e-12)
        unscaled = xhat_from_output(
            network(z, flow.flow_timestep(logsnr, K), labels), z, logsnr, parameterisation="flow"
        )
        assert float(jnp.max(jnp.abs(unscaled - exact))) > 1e-3


def _euler(network, noise, labels, guidance_scale, sigmas):
    """diffusers' guided flow Euler loop (StableDiffusion3Pipeline's body) in flow coordinates."""
    z = noise
    null = jnp.full_like(labels, 4)
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        timestep = jnp.full((z.shape[0],), s * K, z.dtype)
        v_u, v_c = network(z, timestep, null), network(z, timestep, labels)
        z = z + (s_next - s) * (v_u + guidance_scale * (v_c - v_u))
    return z


@pytest.mark.parametrize("steps, shift", [(1, 3.0), (4, 3.0), (12, 1.0)])
def test_ddim_on_flow_times_is_the_euler_loop(steps, shift):
    """Guided DDIM on `times_of_flow_sigmas` reproduces the flow teacher's own Euler loop."""
    mixture = gmm.make_gmm(num_classes=4, dim=3, std=0.3)
    network = _velocity_network(mixture)
    bounds = dict(logsnr_min=-30.0, logsnr_max=flow.trained_logsnr_max(K, shift))

    def cond_fn(z, t, labels):
        logsnr = logsnr_schedule_cosine(t, **bounds)
        net_z = network_input(z, logsnr, parameterisation="flow")
        output = network(net_z, flow.flow_timestep(logsnr, K), labels)
        return xhat_from_output(output, z, logsnr, parameterisation="flow")

    denoise = guidance.make_guided_denoise_fn(jax.tree_util.Partial(cond_fn), null_condition=4)
    sigmas = flow.scheduler_sigmas(steps, num_train_timesteps=K, shift=shift)
    times = flow.times_of_flow_sigmas(sigmas, **bounds)
    # The least noisy sigma is the top of the trained range, the clipped schedule's t = 0 (as
    # a discrete teacher's timestep 0): the grid visits t = 0 before its last step.
    assert times[0] == 0 and times[-1] == 1 and np.all(np.diff(times[1:]) > 0)
    noise = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    labels = jnp.arange(6) % 4
    for w in (0.0, 1.0, 4.0):
        ours = samplers.run_sampler(
            "ddim", denoise, noise, labels, w, steps=steps, times=times, **bounds
        )
        theirs = _euler(network, noise, labels, 1.0 + w, sigmas)
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=f"w={w}")  # 1.4e-6 measured


def test_times_of_flow_sigmas_map_the_ends():
    sigmas = np.asarray([1.0, 0.5, 0.0], np.float32)
    times = flow.times_of_flow_sigmas(sigmas, logsnr_min=-20.0, logsnr_max=20.0)
    np.testing.assert_allclose(times, [0.0, 0.5, 1.0], atol=1e-6)  # s = 1/2 is lambda = 0


def test_bad_time_shift_refused():
    with pytest.raises(ValueError, match="time_shift_type='cubic' is not supported"):
        flow.time_shift(np.asarray([0.5]), 1.0, "cubic")
