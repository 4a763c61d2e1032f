"""Schedules against diffusers' schedulers, and respacing invariants."""

import math

import numpy as np
import pytest
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, UnCLIPScheduler

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


def _cosine_half_log_snr(t):
  """lambda at training steps t of the cosine schedule in closed form: abar_t = f(t + 1) / f(0), the
  betas' product telescoping, but abar_999 = abar_998 (1 - 0.999) (its one capped beta)."""
  f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
  abar = np.array([f(u + 1) / f(0) if u < 999 else f(999) / f(0) * 1e-3 for u in t])
  return 0.5 * np.log(abar / (1 - abar))


@pytest.mark.parametrize("num_steps", [2, 5, 8])
def test_logsnr_spacing_is_uniform_in_lambda(num_steps):
  """Every timestep is the training step nearest its target in lambda, the targets uniform from
  lambda(0) to lambda(999) (closed form). Up to 8 steps no two targets share a nearest step."""
  acp = np.cumprod(1 - schedules.cosine_betas(1000))
  t = schedules.respaced_timesteps(1000, num_steps, "logsnr", acp)
  assert t.dtype == np.int64 and t[0] == 0 and t[-1] == 999 and np.all(np.diff(t) > 0)
  lam = _cosine_half_log_snr(np.arange(1000))
  np.testing.assert_allclose(schedules.half_log_snr(acp), lam, rtol=0, atol=1e-9)
  target = np.linspace(lam[0], lam[-1], num_steps)
  miss = np.abs(lam[t] - target)
  for neighbour in (np.maximum(t - 1, 0), np.minimum(t + 1, 999)):
    assert np.all(miss <= np.abs(lam[neighbour] - target))


@pytest.mark.parametrize("num_steps", [9, 10, 25, 250, 999, 1000])
def test_logsnr_spacing_with_shared_nearest_steps_stays_strictly_increasing(num_steps):
  """From 9 steps on, the cosine schedule's capped last step (lambda -6.5 to -9.9 in one step) draws
  two targets onto 998; many steps crowd t = 0 as well: the chain still visits distinct steps."""
  acp = np.cumprod(1 - schedules.cosine_betas(1000))
  t = schedules.respaced_timesteps(1000, num_steps, "logsnr", acp)
  assert len(t) == num_steps and t[0] == 0 and t[-1] == 999 and np.all(np.diff(t) > 0)
  if num_steps == 1000:
    np.testing.assert_array_equal(t, np.arange(1000))
  schedule = schedules.make_schedule("cosine", 1000, num_steps, spacing="logsnr")
  np.testing.assert_array_equal(np.asarray(schedule.timesteps), t if num_steps < 1000 else np.arange(1000))


@pytest.mark.parametrize("name,diffusers_name,steps", [("linear", "linear", [2, 5, 10, 20, 25]),
                                                       ("cosine", "squaredcos_cap_v2", [3, 5, 8])])
def test_logsnr_spacing_matches_diffusers_lu_lambdas(name, diffusers_name, steps):
  """diffusers' DPMSolverMultistepScheduler(use_lu_lambdas=True) spaces lambda uniformly between the
  same ends and interpolates a timestep linearly in log sigma. For the linear schedule it rounds
  that (nearest in lambda): the same timesteps. For the cosine schedule it keeps the exact sigmas
  for its solver and truncates the timestep the network reads; this chain's constants are its
  integer timesteps' own, so it takes the nearest: the rounding of diffusers' interpolated
  timesteps, one above its truncation or equal."""
  acp = np.cumprod(1 - schedules.make_betas(name, 1000))
  for num_steps in steps:
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule=diffusers_name,
                                      algorithm_type="dpmsolver++", use_lu_lambdas=True)
    ref.set_timesteps(num_steps)
    ours = schedules.respaced_timesteps(1000, num_steps, "logsnr", acp)
    theirs = ref.timesteps.numpy()[::-1]
    if name == "linear":
      np.testing.assert_array_equal(ours, theirs)
    else:
      log_sigmas = np.log(((1 - ref.alphas_cumprod.numpy()) / ref.alphas_cumprod.numpy()) ** 0.5)
      interpolated = np.array([ref._sigma_to_t(s, log_sigmas) for s in ref.sigmas.numpy()[:-1]])[::-1]
      np.testing.assert_array_equal(ours, np.round(interpolated))
      assert set(ours - theirs) <= {0, 1} and np.any(ours != theirs)


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
  with pytest.raises(ValueError, match="alphas_cumprod"):
    schedules.respaced_timesteps(1000, 10, "logsnr")
