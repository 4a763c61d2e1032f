"""Schedules against diffusers' schedulers, and respacing invariants."""

import numpy as np
import pytest
from diffusers import DDPMScheduler, UnCLIPScheduler

from unclip_jax.diffusion import schedules


@pytest.mark.parametrize("name,diffusers_name", [("cosine", "squaredcos_cap_v2"), ("linear", "linear")])
def test_schedule_matches_diffusers_ddpm(name, diffusers_name):
  ours = schedules.make_schedule(name, 1000)
  ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name)
  np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)


def test_cosine_schedule_matches_unclip_scheduler():
  ours = schedules.make_schedule("cosine", 1000)
  ref = UnCLIPScheduler(num_train_timesteps=1000)
  np.testing.assert_allclose(np.asarray(ours.betas), ref.betas.numpy(), rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ours.alphas_cumprod), ref.alphas_cumprod.numpy(), rtol=0, atol=1e-6)
  assert schedules.cosine_betas(1000).max() <= 0.999


@pytest.mark.parametrize("num_steps", [2, 7, 25, 64, 250])
def test_linspace_spacing_is_unclip_schedulers(num_steps):
  ref = UnCLIPScheduler(num_train_timesteps=1000)
  ref.set_timesteps(num_steps)
  ours = schedules.respaced_timesteps(1000, num_steps, "linspace")
  np.testing.assert_array_equal(ours[::-1], ref.timesteps.numpy())


def test_stride_spacing():
  np.testing.assert_array_equal(schedules.respaced_timesteps(1000, 50, "stride"), np.arange(0, 1000, 20))


@pytest.mark.parametrize("name", ["cosine", "linear"])
def test_respacing_preserves_marginals(name):
  acp = np.cumprod(1 - schedules.make_betas(name, 1000))
  full = schedules.chain_constants(acp, np.arange(1000))
  t = schedules.respaced_timesteps(1000, 27)
  spaced = schedules.chain_constants(acp, t)
  # q(x_t | x_0) is unchanged at every kept timestep ...
  np.testing.assert_allclose(spaced["alphas_cumprod"], full["alphas_cumprod"][t], rtol=1e-12)
  # ... and the re-derived betas compose to it.
  np.testing.assert_allclose(np.cumprod(1 - spaced["betas"]), spaced["alphas_cumprod"],
                             rtol=1e-10)
  # Each respaced step spans several training steps, so it adds more noise.
  assert spaced["betas"][0] == full["betas"][0]
  assert np.all(spaced["betas"][1:] > full["betas"][t][1:])


def test_posterior_matches_bayes_rule_float64():
  """q(x_{t-1} | x_t, x_0) from the schedule equals the Gaussian conditioning formula."""
  s = schedules.chain_constants(np.cumprod(1 - schedules.cosine_betas(1000)),
                                schedules.respaced_timesteps(1000, 40))
  acp, acp_prev = s["alphas_cumprod"], s["alphas_cumprod_prev"]
  # x_{t-1} = sqrt(acp_prev) x0 + sqrt(1-acp_prev) e1 ; x_t = sqrt(a) x_{t-1} + sqrt(1-a) e2, a = acp/acp_prev.
  a = acp / acp_prev
  prior_var = 1 - acp_prev
  post_var = 1 / (1 / prior_var[1:] + a[1:] / (1 - a[1:]))
  coef_xt = post_var * np.sqrt(a[1:]) / (1 - a[1:])
  coef_x0 = post_var * np.sqrt(acp_prev[1:]) / prior_var[1:]
  np.testing.assert_allclose(s["posterior_variance"][1:], post_var, rtol=1e-9)
  np.testing.assert_allclose(s["posterior_mean_coef2"][1:], coef_xt, rtol=1e-9)
  np.testing.assert_allclose(s["posterior_mean_coef1"][1:], coef_x0, rtol=1e-9)
  assert np.all(np.isfinite(s["posterior_log_variance_clipped"]))


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match="Unknown noise schedule"):
    schedules.make_schedule("quadratic")
  with pytest.raises(ValueError, match="num_steps"):
    schedules.make_schedule("cosine", 1000, num_steps=0)
  with pytest.raises(ValueError, match="spacing"):
    schedules.respaced_timesteps(1000, 10, "uniform")
