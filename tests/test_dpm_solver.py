"""DPM-Solver++ (samplers.sample with sampler="dpmpp_2m" / "dpmpp_3m"): the
trajectory of diffusers' DPMSolverMultistepScheduler around a fixed model, and
the closed-form moments on Gaussian data against DDIM at the same step count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from gaussian_oracle import exact_model_fn

from unclip_jax.diffusion import dpm_solver, progress, samplers, schedules

BETAS = schedules.cosine_betas(1000)
FULL_ACP = np.cumprod(1 - BETAS)
SQRT_ACP, SQRT_1M_ACP = np.sqrt(FULL_ACP), np.sqrt(1 - FULL_ACP)
PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}


def _torch_model(x, t, prediction_type, c=0.0):
  """A fixed nonlinear stand-in in NCHW whose x_0 estimate stays bounded (alpha x - sigma g):
  a raw eps output would be amplified 2e4-fold at t = 999. Mirrored by _jax_model."""
  g = torch.tanh(0.7 * (x + c) + 0.3 * torch.roll(x + c, 1, dims=1) + t / 1000.0)
  if prediction_type != "epsilon":
    return g
  return SQRT_1M_ACP[int(t)] * x + SQRT_ACP[int(t)] * g


def _jax_model(prediction_type, c=0.0):
  def model_fn(x, t):  # NHWC, in x's precision
    sqrt_acp, sqrt_1m = jnp.asarray(SQRT_ACP, x.dtype), jnp.asarray(SQRT_1M_ACP, x.dtype)
    col = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))
    g = jnp.tanh(0.7 * (x + c) + 0.3 * jnp.roll(x + c, 1, axis=-1) + col(t).astype(x.dtype) / 1000.0)
    return g if prediction_type != "epsilon" else col(sqrt_1m[t]) * x + col(sqrt_acp[t]) * g

  return model_fn


def _float64_scheduler(order, prediction_type, num_steps=None, timesteps=None, **config):
  """diffusers' DPM-Solver++ on our betas, with its sigmas in float64.

  It stores sigmas in float32, which near t = 0 loses ~1e-3 of sigma to the
  rounding of 1 - abar; in float64 it is an exact reference for the algorithm.
  """
  ref = DPMSolverMultistepScheduler(trained_betas=BETAS, algorithm_type="dpmsolver++", solver_order=order,
                                    prediction_type=prediction_type, **config)
  ref.set_timesteps(num_steps, timesteps=timesteps)
  t = ref.timesteps.numpy()
  final = 0.0 if ref.config.final_sigmas_type == "zero" else np.sqrt((1 - FULL_ACP[0]) / FULL_ACP[0])
  ref.sigmas = torch.from_numpy(np.concatenate([np.sqrt((1 - FULL_ACP[t]) / FULL_ACP[t]), [final]]))
  return ref


def _ours(timesteps, model_fn, x_T, sampler, prediction_type, dtype=jnp.float32, **kwargs):
  """Our chain over `timesteps` (ascending) from x_T (NCHW torch), in NHWC and `dtype`."""
  with jax.enable_x64(dtype == jnp.float64):
    schedule = schedules.schedule_from_alphas_cumprod(FULL_ACP, timesteps, 1000, dtype=dtype)
    # The schedule goes in as a jit argument: the step-order choice must work on traced timesteps.
    run = jax.jit(lambda sch, x: samplers.sample(model_fn, sch, jax.random.key(0), x, sampler=sampler,
                                                 prediction_type=prediction_type, **kwargs))
    return np.asarray(run(schedule, _nhwc(x_T, dtype)))


def _nhwc_np(a):  # float64 NCHW torch -> NHWC numpy
  return a.numpy().transpose(0, 2, 3, 1)


def _nhwc(a, dtype=jnp.float32):
  return jnp.asarray(_nhwc_np(a), dtype)


def _x_T():
  return torch.randn((2, 3, 4, 4), generator=torch.Generator().manual_seed(0), dtype=torch.float64)


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("spacing,num_steps", [("diffusers", 20), ("ours", 10)])
def test_trajectory_matches_diffusers(order, prediction_type, spacing, num_steps):
  """spacing "diffusers": its default linspace timesteps (999, 949, ..., 50; no t = 0) as our
  chain, with every scheduler default. "ours": our linspace respacing (999, 888, ..., 111, 0),
  which reads the model at t = 0: diffusers over the timesteps above 0 down to sigma(t = 0)
  (final_sigmas_type="sigma_min", euler_at_final), then its x_0 estimate at t = 0.

  An eps model's x_0 = (x - sigma eps) / alpha at t = 999 (alpha = 5e-5) turns float32's
  rounding of x into ~1e-3 in x_0 and ~3e-4 in the result, in any implementation (diffusers in
  float32 included): eps is compared in float64 to 1e-5, and in float32 to that limit.
  """
  ours_timesteps = schedules.respaced_timesteps(1000, num_steps)
  if spacing == "diffusers":
    ref = _float64_scheduler(order, prediction_type, num_steps)
    ours_timesteps = ref.timesteps.numpy()[::-1]
  else:
    ref = _float64_scheduler(order, prediction_type, timesteps=ours_timesteps[:0:-1].tolist(),
                             final_sigmas_type="sigma_min", euler_at_final=True)
    np.testing.assert_array_equal(ours_timesteps, [0] + ref.timesteps.tolist()[::-1])
  x_T = _x_T()
  x = x_T.clone()
  for t in ref.timesteps:
    x = ref.step(_torch_model(x, t, prediction_type), t, x).prev_sample
  if spacing == "ours":
    x = ref.convert_model_output(_torch_model(x, torch.tensor(0), prediction_type), sample=x)
  run = lambda dtype: _ours(ours_timesteps, _jax_model(prediction_type), x_T, f"dpmpp_{order}m",
                            PREDICTION[prediction_type], dtype=dtype)
  expected = _nhwc_np(x)
  if prediction_type == "epsilon":
    np.testing.assert_allclose(run(jnp.float64), expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(run(jnp.float32), expected, rtol=0, atol=5e-4)
  else:
    np.testing.assert_allclose(run(jnp.float32), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_guided_learned_variance_thresholded_matches_diffusers(order):
  """Karlo's decoder case: a classifier-free guided eps model with learned-variance channels
  (dropped) and dynamic thresholding of x_0 (diffusers' thresholding with its upper cap off)."""
  num_steps, scale, cond = 8, 3.0, [0.5, -0.2]
  ref = _float64_scheduler(order, "epsilon", num_steps, variance_type="learned_range", thresholding=True,
                           dynamic_thresholding_ratio=0.9, sample_max_value=1e6)
  c = torch.tensor(cond, dtype=torch.float64).reshape(2, 1, 1, 1)

  def torch_guided(x, t):
    out_c, out_u = _torch_model(x, t, "epsilon", c), _torch_model(x, t, "epsilon", 0.0)
    return torch.cat([out_u + scale * (out_c - out_u), torch.tanh(x - c)], dim=1)

  x_T = _x_T() * 1.5
  x = x_T.clone()
  for t in ref.timesteps:
    x = ref.step(torch_guided(x, t), t, x).prev_sample
  assert bool((x.abs() == 1.0).any())  # the threshold is at work: it clamps the last x_0 to s, rescaled to 1

  def jax_model(x, t, cond):
    cond = cond.reshape(-1, 1, 1, 1)
    return jnp.concatenate([_jax_model("epsilon", cond)(x, t), jnp.tanh(x - cond)], axis=-1)

  guided = samplers.classifier_free_guidance(jax_model, np.array(cond), np.zeros(2), scale, guided_channels=3)
  got = _ours(ref.timesteps.numpy()[::-1], guided, x_T, f"dpmpp_{order}m", "eps", variance_type="learned_range",
              dynamic_threshold=0.9, dtype=jnp.float64)  # float64: eps at t = 999, as above
  np.testing.assert_allclose(got, _nhwc_np(x), rtol=0, atol=1e-5)


M = np.array([0.6, -0.5, 0.8])
S = np.array([0.3, 0.5, 0.1])


def _gaussian_affine_map(timesteps, order):
  """(G, C): the chain's output is G x_T + C per dimension, in closed form (float64).

  With Gaussian data the exact model's x_0 estimate is affine in x_t, so every
  step is: tracking (gain on x_T, offset) through the update of diffusers'
  scheduler (written out here in lambda) gives the output's law N(C, G^2) for
  x_T ~ N(0, 1), discretisation bias included. Order 1 is DDIM with eta = 0.
  """
  acp = FULL_ACP[np.asarray(timesteps)[::-1]]  # by scan step, noisiest first
  alpha, sigma = np.sqrt(acp), np.sqrt(1 - acp)
  alpha_t, sigma_t = np.append(alpha[1:], 1.0), np.append(sigma[1:], 0.0)
  lam = np.log(alpha / sigma)
  orders = dpm_solver.step_orders(len(acp), order, reads_out_at_zero=timesteps[0] == 0)
  x = np.stack([np.ones(3), np.zeros(3)])  # rows: gain on x_T, offset
  history = []
  for k in range(len(acp)):
    var = alpha[k] ** 2 * S ** 2 + sigma[k] ** 2
    m0 = alpha[k] * S ** 2 / var * x + np.stack([np.zeros(3), M * sigma[k] ** 2 / var])  # E[x_0 | x_t]
    history = [m0] + history[:2]
    if sigma_t[k] == 0:
      x = m0
      continue
    h = np.log(alpha_t[k] / sigma_t[k]) - lam[k]
    phi = -np.expm1(-h)  # 1 - e^-h
    x = sigma_t[k] / sigma[k] * x + alpha_t[k] * phi * m0
    if orders[k] == 2:
      x = x + 0.5 * alpha_t[k] * phi * (m0 - history[1]) * h / (lam[k] - lam[k - 1])
    elif orders[k] == 3:
      r0, r1 = (lam[k] - lam[k - 1]) / h, (lam[k - 1] - lam[k - 2]) / h
      d1_0, d1_1 = (m0 - history[1]) / r0, (history[1] - history[2]) / r1
      d1, d2 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1), (d1_0 - d1_1) / (r0 + r1)
      x = x + alpha_t[k] * (1 - phi / h) * d1 - alpha_t[k] * ((h - phi) / h ** 2 - 0.5) * d2
  return x[0], x[1]


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "ddim"])
def test_gaussian_data_follows_the_closed_form(sampler, prediction_type):
  """Sampled with the exact model of Gaussian data, each output is G x_T + C of the closed form."""
  num_steps = 10
  order = {"ddim": 1, **dpm_solver.ORDERS}[sampler]
  schedule = schedules.make_schedule("cosine", 1000, num_steps=num_steps)
  model_fn = exact_model_fn(FULL_ACP, jnp.asarray(M, jnp.float32), jnp.asarray(S, jnp.float32), prediction_type)
  x_T = jax.random.normal(jax.random.key(0), (4096, 3))
  x = jax.jit(lambda x_T: samplers.sample(model_fn, schedule, jax.random.key(0), x_T, sampler=sampler,
                                          prediction_type=prediction_type))(x_T)
  gain, offset = _gaussian_affine_map(np.asarray(schedule.timesteps), order)
  # float32: eps at t = 999 costs ~1e-4 (see test_trajectory_matches_diffusers)
  atol = 5e-4 if prediction_type == "eps" else 1e-5
  np.testing.assert_allclose(np.asarray(x), gain * np.asarray(x_T) + offset, rtol=0, atol=atol)


@pytest.mark.parametrize("num_steps", [10, 15])
def test_dpmpp_gets_gaussian_moments_closer_than_ddim(num_steps):
  """The closed-form law N(C, G^2) of the output against the data's N(M, S^2).

  On our linspace respacing, at 10 steps dpmpp_2m's std is within 16% of S
  where S >= 0.3 (DDIM: 23%), at 15 steps within 7% (DDIM: 15%); every mean is
  within 1e-4 for all three. Where S = 0.1 all miss by a third to a half: its
  x_0 estimate changes around lambda = 2.3, inside the chain's one step from
  t = 111 (or 71) to t = 0, first order in both. dpmpp_3m: a little closer.
  """
  timesteps = schedules.respaced_timesteps(1000, num_steps)
  ddim_gain, ddim_offset = _gaussian_affine_map(timesteps, 1)
  ddim_error = np.abs(ddim_gain / S - 1)
  for order in (2, 3):
    gain, offset = _gaussian_affine_map(timesteps, order)
    error = np.abs(gain / S - 1)
    assert np.all(error <= ddim_error), (order, error, ddim_error)
    assert np.all(error[:2] <= {10: 0.16, 15: 0.07}[num_steps]), (order, error)
    np.testing.assert_allclose(offset, M, rtol=1e-4)
  np.testing.assert_allclose(ddim_offset, M, rtol=1e-4)


@pytest.mark.parametrize("num_steps", [8, 10, 15, 20])
def test_logsnr_spacing_gets_gaussian_std_closer_at_few_steps(num_steps):
  """The closed-form output std against S, worst of the three dimensions, on log-SNR spacing
  (schedules.logsnr_timesteps) against our linspace and diffusers' default spacing (999, ..., 100).
  10 steps, std error in %, S = 0.3 / 0.5 / 0.1:
    dpmpp_2m: logsnr -10.2 / -7.3 / -20.3, linspace -15.4 / -6.1 / -48.4, diffusers -13.8 / -5.0 / -50.2
    dpmpp_3m: logsnr +0.2 / +10.8 / -18.7, linspace -14.7 / -5.1 / -48.3, diffusers -13.1 / -4.2 / -50.1
  The narrow S = 0.1 gains most: its x_0 estimate turns near lambda = 2.3, where log-SNR spacing has
  steps and the others one long first-order step. DDIM (first order) gains nothing: the cosine
  schedule's capped last step spans lambda -9.9 to -6.5, so some of the few steps go to t >= 994.
  The compiled sampler follows the closed form on log-SNR chains too."""
  spacings = {"logsnr": schedules.respaced_timesteps(1000, num_steps, "logsnr", FULL_ACP),
              "linspace": schedules.respaced_timesteps(1000, num_steps),
              "diffusers": np.linspace(0, 999, num_steps + 1).round()[1:].astype(np.int64)}
  for order in (2, 3):
    worst = {name: np.abs(_gaussian_affine_map(t, order)[0] / S - 1).max() for name, t in spacings.items()}
    assert worst["logsnr"] < min(worst["linspace"], worst["diffusers"]), (order, worst)
  schedule = schedules.make_schedule("cosine", 1000, num_steps=num_steps, spacing="logsnr")
  np.testing.assert_array_equal(schedule.timesteps, spacings["logsnr"])
  model_fn = exact_model_fn(FULL_ACP, jnp.asarray(M, jnp.float32), jnp.asarray(S, jnp.float32), "v")
  x_T = jax.random.normal(jax.random.key(0), (256, 3))
  x = jax.jit(lambda x_T: samplers.sample(model_fn, schedule, jax.random.key(0), x_T, sampler="dpmpp_2m",
                                          prediction_type="v"))(x_T)
  gain, offset = _gaussian_affine_map(spacings["logsnr"], 2)
  np.testing.assert_allclose(np.asarray(x), gain * np.asarray(x_T) + offset, rtol=0, atol=1e-5)


def test_dpmpp_draws_no_noise_and_keeps_the_loop_machinery():
  """Deterministic: from a given x_T the key does not matter (one key or one per sample); run a
  step per call (the progress bar's way, samplers.Part) it is the one loop's chain."""
  schedule = schedules.make_schedule("cosine", 1000, num_steps=6)
  model_fn = exact_model_fn(FULL_ACP, jnp.asarray(M, jnp.float32), jnp.asarray(S, jnp.float32), "v")
  run = jax.jit(lambda key, x_T, part=None: samplers.sample(model_fn, schedule, key, x_T, sampler="dpmpp_2m",
                                                            prediction_type="v", part=part))
  x_T = jax.random.normal(jax.random.key(1), (4, 3))
  a = run(jax.random.key(0), x_T)
  b = run(jax.random.split(jax.random.key(5), 4), x_T)
  np.testing.assert_array_equal(a, b)
  parts = progress.run_chain(lambda part: run(jax.random.key(0), x_T, part=part), 6, "dpm")
  np.testing.assert_allclose(parts, a, rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="dpmpp_2m"):
    samplers.sample(model_fn, schedule, jax.random.key(0), x_T, sampler="dpmpp_9m")
