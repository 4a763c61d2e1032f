"""Samplers: closed-form Gaussian data, inversion round trips, parity with
diffusers' UnCLIPScheduler, guidance and clipping."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from gaussian_oracle import exact_model_fn
from unclip_oracle import FixedNoise, float64_unclip_scheduler

from unclip_jax.diffusion import progress, samplers, schedules

M = jnp.array([0.6, -0.5, 0.8])
S = jnp.array([0.3, 0.5, 0.1])
FULL_ACP = np.cumprod(1 - schedules.cosine_betas(1000))


def _sample(num_steps, sampler, prediction_type, variance_type="fixed_small", eta=0.0, n=8192, seed=0):
  schedule = schedules.make_schedule("cosine", 1000, num_steps=num_steps)
  model_fn = exact_model_fn(FULL_ACP, M, S, prediction_type)
  run = jax.jit(functools.partial(samplers.sample, model_fn, schedule, shape=(n, 3), sampler=sampler, eta=eta,
                                  prediction_type=prediction_type, variance_type=variance_type))
  return np.asarray(run(jax.random.key(seed)))


def _assert_matches_data(x):
  np.testing.assert_allclose(x.mean(0), M, rtol=0.05, atol=0)
  np.testing.assert_allclose(x.std(0), S, rtol=0.05, atol=0)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_ddpm_1000_steps_recovers_gaussian_data(prediction_type, variance_type):
  _assert_matches_data(_sample(None, "ddpm", prediction_type, variance_type))


def _predicted_std(num_steps, sampler, eta=0.0, variance_type="fixed_small"):
  """Std of a sampler's output for Gaussian data with the exact model, in closed form.

  With Gaussian data every step is affine in x: x' - sqrt(a') m =
  g (x - sqrt(a) m) + sigma z, so the variance follows V' = g^2 V + sigma^2 from
  V = 1 at x_T. The result differs from S by the chain's discretisation error alone.
  """
  c = schedules.chain_constants(FULL_ACP, schedules.respaced_timesteps(1000, num_steps))
  s2 = np.asarray(S, np.float64) ** 2
  var = np.ones_like(s2)
  for i in reversed(range(num_steps)):
    a, a_prev = c["alphas_cumprod"][i], c["alphas_cumprod_prev"][i]
    x0_gain = np.sqrt(a) * s2 / (a * s2 + 1 - a)  # d E[x0 | x_t] / d x_t
    if sampler == "ddim":
      sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
      eps_gain = (1 - np.sqrt(a) * x0_gain) / np.sqrt(1 - a)
      g = np.sqrt(a_prev) * x0_gain + np.sqrt(max(1 - a_prev - sigma ** 2, 0)) * eps_gain
    else:
      g = c["posterior_mean_coef1"][i] * x0_gain + c["posterior_mean_coef2"][i]
      fixed_large = c["betas"][i] if i > 0 else 0.0
      sigma = np.sqrt(c["posterior_variance"][i] if variance_type == "fixed_small" else fixed_large)
    var = g ** 2 * var + sigma ** 2
  return np.sqrt(var)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_matches_closed_form(prediction_type, eta):
  x = _sample(50, "ddim", prediction_type, eta=eta)
  np.testing.assert_allclose(x.mean(0), M, rtol=0.05, atol=0)
  np.testing.assert_allclose(x.std(0), _predicted_std(50, "ddim", eta), rtol=0.02, atol=0)
  if eta == 0.0:  # deterministic DDIM's bias stays within 5% where s is not tiny
    np.testing.assert_allclose(x.std(0)[:2], S[:2], rtol=0.05, atol=0)


@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_large"])
def test_respaced_ddpm_matches_closed_form(variance_type):
  x = _sample(64, "ddpm", "x0", variance_type)
  np.testing.assert_allclose(x.mean(0), M, rtol=0.05, atol=0)
  np.testing.assert_allclose(x.std(0), _predicted_std(64, "ddpm", variance_type=variance_type), rtol=0.02)
  # ... and with all 1000 steps the chain's own bias is gone.
  np.testing.assert_allclose(_predicted_std(1000, "ddpm", variance_type=variance_type), S, rtol=0.025)


def test_samplers_are_deterministic_per_key():
  a = _sample(20, "ddpm", "eps", n=16, seed=1)
  b = _sample(20, "ddpm", "eps", n=16, seed=1)
  c = _sample(20, "ddpm", "eps", n=16, seed=2)
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-2


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_ddim_inversion_round_trip(prediction_type):
  schedule = schedules.make_schedule("cosine", 1000, num_steps=50)
  model_fn = exact_model_fn(FULL_ACP, M, S, prediction_type)
  x0 = M + S * jax.random.normal(jax.random.key(3), (256, 3))

  def round_trip(x0, iters):
    x_T = samplers.ddim_invert(model_fn, schedule, x0, prediction_type=prediction_type, fixed_point_iters=iters)
    return samplers.sample(model_fn, schedule, jax.random.key(0), x_T, sampler="ddim", eta=0.0,
                           prediction_type=prediction_type), x_T

  rec, x_T = jax.jit(round_trip, static_argnums=1)(x0, 8)
  rel = float(jnp.linalg.norm(rec - x0) / jnp.linalg.norm(x0))
  assert rel < 1e-4
  # For Gaussian data deterministic DDIM is an affine map with gain
  # _predicted_std(50) (x_T ~ N(0, 1) -> x_0), so the latent's spread is known.
  np.testing.assert_allclose(np.std(x_T, 0), np.std(x0, 0) / _predicted_std(50, "ddim"), rtol=1e-3)
  rec_plain, _ = jax.jit(round_trip, static_argnums=1)(x0, 0)
  rel_plain = float(jnp.linalg.norm(rec_plain - x0) / jnp.linalg.norm(x0))
  assert rel_plain > 1e-3  # plain inversion is only approximate


def test_ddim_inversion_fixed_point_keeps_its_best_iterate():
  # A model that is no denoiser: its x_0 = x_t / sqrt(abar) moves with x_t, so at
  # the noisy steps the x_0-form iteration diverges (to ~1e18 without the
  # safeguard). Its plain inversion is already exact, and the iterations must
  # not leave it worse.
  schedule = schedules.make_schedule("cosine", 1000, num_steps=50)
  model_fn = lambda x, t: jnp.zeros_like(x)
  x0 = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3), minval=-1.0, maxval=1.0)

  @functools.partial(jax.jit, static_argnums=0)
  def round_trip(iters):
    x_T = samplers.ddim_invert(model_fn, schedule, x0, fixed_point_iters=iters)
    return samplers.sample(model_fn, schedule, jax.random.key(0), x_T, sampler="ddim")

  plain, fixed = float(jnp.abs(round_trip(0) - x0).max()), float(jnp.abs(round_trip(8) - x0).max())
  assert plain < 1e-4 and fixed <= 1.01 * plain  # float32 rounding amplified by 1 / sqrt(abar_T) alone


def _torch_model(x, t):
  """A smooth nonlinear stand-in model in NCHW; mirrored by _jax_model."""
  return torch.tanh(0.7 * x + 0.3 * torch.roll(x, 1, dims=1) + t / 1000.0)


def _jax_model(x, t):  # NHWC
  t = t.reshape((-1,) + (1,) * (x.ndim - 1)).astype(x.dtype)
  return jnp.tanh(0.7 * x + 0.3 * jnp.roll(x, 1, axis=-1) + t / 1000.0)


def _chain_like(ref, num_steps):
  return schedules.schedule_from_alphas_cumprod(ref.alphas_cumprod.numpy(),
                                                schedules.respaced_timesteps(1000, num_steps), 1000)


@pytest.mark.parametrize("variance_type,prediction_type,clip", [
    ("learned_range", "epsilon", 1.0),   # Karlo's decoder
    ("fixed_small_log", "epsilon", 1.0), # Karlo's upsamplers
    ("fixed_small_log", "sample", 5.0),  # Karlo's prior
])
def test_step_matches_unclip_scheduler(variance_type, prediction_type, clip, fixed_unclip_noise):
  num_steps, channels = 7, 3
  ref = float64_unclip_scheduler(num_steps, variance_type=variance_type, prediction_type=prediction_type,
                                  clip_sample_range=clip)
  ours = _chain_like(ref, num_steps)
  out_channels = 2 * channels if variance_type == "learned_range" else channels
  rng = np.random.default_rng(0)
  for k, t in enumerate(ref.timesteps.tolist()):
    prev = None if k + 1 == num_steps else ref.timesteps[k + 1].item()
    x = rng.standard_normal((2, channels, 4, 4)).astype(np.float32) * 2
    out = rng.standard_normal((2, out_channels, 4, 4)).astype(np.float32)
    if variance_type == "learned_range":
      out[:, channels:] = np.tanh(out[:, channels:])
    noise = rng.standard_normal((2, channels, 4, 4))
    expected = ref.step(torch.from_numpy(out).double(), t, torch.from_numpy(x).double(), prev_timestep=prev,
                        generator=FixedNoise(torch.from_numpy(noise))).prev_sample.numpy()
    nhwc = lambda a: jnp.asarray(a.transpose(0, 2, 3, 1), jnp.float32)
    got, _ = samplers.ddpm_step(
        ours, num_steps - 1 - k, nhwc(x), nhwc(out), nhwc(noise),
        prediction_type={"epsilon": "eps", "sample": "x0"}[prediction_type],
        variance_type={"fixed_small_log": "fixed_small"}.get(variance_type, variance_type), clip_range=clip)
    np.testing.assert_allclose(np.asarray(got).transpose(0, 3, 1, 2), expected, rtol=0, atol=1e-5)


def test_guided_respaced_chain_matches_diffusers_loop(fixed_unclip_noise):
  """A whole learned-range, guided, respaced chain against a Python loop over
  UnCLIPScheduler, with the same initial and per-step noise."""
  num_steps, batch, channels, scale = 9, 2, 3, 4.0
  ref = float64_unclip_scheduler(num_steps, variance_type="learned_range", prediction_type="epsilon")
  gen = torch.Generator().manual_seed(0)
  x_T = torch.randn((batch, channels, 4, 4), generator=gen, dtype=torch.float64)
  noises = torch.randn((num_steps, batch, channels, 4, 4), generator=gen, dtype=torch.float64)
  cond = torch.tensor([0.5, -0.2], dtype=torch.float64).reshape(batch, 1, 1, 1)

  def torch_model(x, t, c):
    eps = _torch_model(x + c, t)
    return torch.cat([eps, torch.tanh(x - c)], dim=1)

  x = x_T.clone()
  for k, t in enumerate(ref.timesteps.tolist()):
    both = torch_model(torch.cat([x, x]), t, torch.cat([cond, torch.zeros_like(cond)]))
    cond_out, uncond_out = both.chunk(2)
    guided = uncond_out[:, :channels] + scale * (cond_out[:, :channels] - uncond_out[:, :channels])
    out = torch.cat([guided, cond_out[:, channels:]], dim=1)
    prev = None if k + 1 == num_steps else ref.timesteps[k + 1].item()
    noise_gen = FixedNoise(noises[k])
    x = ref.step(out, t, x, prev_timestep=prev, generator=noise_gen).prev_sample

  def jax_model(x, t, c):
    c = c.reshape(-1, 1, 1, 1)
    return jnp.concatenate([_jax_model(x + c, t), jnp.tanh(x - c)], axis=-1)

  nhwc = lambda a: jnp.asarray(a.numpy().transpose(0, 2, 3, 1), jnp.float32)
  model_fn = samplers.classifier_free_guidance(jax_model, jnp.array([0.5, -0.2]), jnp.zeros(2), scale,
                                               guided_channels=channels)
  ours = _chain_like(ref, num_steps)
  got = jax.jit(lambda: samplers.sample(
      model_fn, ours, jax.random.key(0), nhwc(x_T), sampler="ddpm", variance_type="learned_range",
      clip_range=1.0, step_noise=jnp.stack([nhwc(n) for n in noises])))()
  np.testing.assert_allclose(np.asarray(got), nhwc(x), rtol=0, atol=1e-5)


def test_guidance_equals_separate_calls():
  def model_fn(x, t, cond):
    return jnp.concatenate([jnp.sin(x * cond["a"][:, None]) + t[:, None] / 100, jnp.cos(x)], axis=-1)

  x = jax.random.normal(jax.random.key(0), (3, 2))
  t = jnp.array([5, 6, 7])
  cond, uncond = {"a": jnp.array([1.0, 2.0, 3.0])}, {"a": jnp.zeros(3)}
  scale = jnp.array([1.0, 3.0, 7.5])
  got = samplers.classifier_free_guidance(model_fn, cond, uncond, scale, guided_channels=2)(x, t)
  c, u = model_fn(x, t, cond), model_fn(x, t, uncond)
  expected_mean = u[:, :2] + scale[:, None] * (c[:, :2] - u[:, :2])
  np.testing.assert_allclose(got[:, :2], expected_mean, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got[:, 2:], c[:, 2:], rtol=1e-6)
  # scale 1 is the conditional model
  np.testing.assert_allclose(samplers.classifier_free_guidance(model_fn, cond, uncond, 1.0)(x, t), c,
                             rtol=1e-6, atol=1e-6)


def test_guidance_on_a_device_split_batch_needs_no_communication():
  """Each sample's cond and uncond rows stay on its device: the compiled guided call has no
  collectives (the old [cond; uncond] layout moved half of every model output between devices)."""
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  from unclip_jax import parallel

  mesh = parallel.make_mesh({"data": -1})
  split = NamedSharding(mesh, P(mesh.axis_names))
  n = mesh.devices.size

  def model_fn(x, t, cond):  # a per-sample "network" with a matmul, as the U-Net and prior are
    return jnp.tanh(x @ jnp.ones((4, 4)) * cond["a"][:, None] + t[:, None])

  x = jax.device_put(jax.random.normal(jax.random.key(0), (2 * n, 4)), split)
  t = jax.device_put(jnp.arange(2 * n, dtype=jnp.float32), split)
  cond = {"a": jax.device_put(jnp.linspace(1.0, 2.0, 2 * n), split)}
  uncond = {"a": jax.device_put(jnp.zeros(2 * n), split)}
  guided = jax.jit(lambda x, t, c, u: samplers.classifier_free_guidance(model_fn, c, u, 3.0)(x, t),
                   out_shardings=split)
  hlo = guided.lower(x, t, cond, uncond).compile().as_text()
  for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute", "reduce-scatter"):
    assert collective not in hlo, collective
  c, u = model_fn(x, t, cond), model_fn(x, t, uncond)
  np.testing.assert_allclose(guided(x, t, cond, uncond), u + 3.0 * (c - u), rtol=1e-6, atol=1e-6)


def test_static_clip_and_dynamic_threshold():
  x0 = jax.random.normal(jax.random.key(0), (4, 8, 8, 3)) * jnp.array([0.5, 2.0, 3.0, 0.9])[:, None, None, None]
  np.testing.assert_array_equal(samplers.clip_x0(x0, 1.0), np.clip(np.asarray(x0), -1, 1))
  got = np.asarray(samplers.clip_x0(x0, None, 0.9))
  flat = np.abs(np.asarray(x0).reshape(4, -1))
  s = np.maximum(np.quantile(flat, 0.9, axis=1), 1.0)[:, None, None, None]
  np.testing.assert_allclose(got, np.clip(np.asarray(x0), -s, s) / s, rtol=1e-5, atol=1e-6)
  assert np.abs(got).max() <= 1.0 + 1e-6
  # samples already inside [-1, 1] at the quantile are only clipped, not rescaled
  np.testing.assert_allclose(got[0], np.clip(np.asarray(x0[0]), -1, 1), rtol=1e-6)


@pytest.mark.parametrize("chain", ["ddpm", "dpmpp_3m", "invert"])
def test_chain_in_parts_equals_the_one_loop(chain, capsys):
  """progress.run_chain runs a loop one step per call (samplers.Part), drawing the bar between calls:
  the one loop's result (DDPM's per-step noise and DPM-Solver's history carried between calls), with
  two more programs in all (the start and the step), whatever the number of steps. The model reads a
  committed argument, as the pipeline's do (the prior's z_i): only a step's outputs are committed
  then, and the start's state is committed before the first step (progress.commit)."""
  schedule = schedules.make_schedule("cosine", 1000, num_steps=12)
  model_fn = lambda m: exact_model_fn(FULL_ACP, m, S, "eps")
  if chain == "invert":
    run = jax.jit(lambda x, m, part=None: samplers.ddim_invert(model_fn(m), schedule, x, part=part))
  else:
    run = jax.jit(lambda x, m, part=None: samplers.sample(model_fn(m), schedule, jax.random.key(1), x, sampler=chain,
                                                          finish=lambda x: 2 * x, part=part))
  x, m = jax.random.normal(jax.random.key(0), (4, 3)), jax.device_put(M, jax.devices()[0])
  whole = run(x, m)
  parts = progress.run_chain(lambda part: run(x, m, part=part), 12, "denoise")
  np.testing.assert_allclose(parts, whole, rtol=0, atol=1e-6)
  assert run._cache_size() == 3
  err = capsys.readouterr().err
  assert "denoise" in err and "12/12" in err


def test_per_sample_keys_make_samples_independent_of_the_batch():
  """With one key per sample, sample b depends on keys[b] alone: a batch of 4
  equals 4 single runs, and it holds for DDPM's per-step noise too."""
  schedule = schedules.make_schedule("cosine", 1000, num_steps=8)
  model_fn = exact_model_fn(FULL_ACP, M, S, "eps")
  keys = jax.random.split(jax.random.key(0), 4)
  run = jax.jit(lambda k: samplers.sample(model_fn, schedule, k, shape=(k.shape[0], 3), sampler="ddpm"))
  batch = run(keys)
  singles = jnp.concatenate([run(keys[b:b + 1]) for b in range(4)])
  np.testing.assert_allclose(batch, singles, rtol=1e-6, atol=1e-6)
  assert float(jnp.abs(batch[0] - batch[1]).max()) > 1e-3
  with pytest.raises(ValueError, match="3 per-sample keys for a batch of 4"):
    samplers.normal(keys[:3], (4, 3))
  # Legacy raw keys: one PRNGKey is one key for the batch, a stack of them one per sample.
  raw = jax.random.PRNGKey(3)
  assert samplers.normal(raw, (4, 3)).shape == (4, 3)
  raw_keys = jnp.stack([jax.random.PRNGKey(s) for s in range(4)])
  np.testing.assert_array_equal(samplers.normal(raw_keys, (4, 3))[2], jax.random.normal(raw_keys[2], (3,)))


def _correlated_model_fn(alphas_cumprod, rho):
  """E[eps | x_t] for 2-d data x_0 ~ N(0, C), C = [[1, rho], [rho, 1]]: E[x_0 | x_t] = sqrt(a) C (a C +
  (1 - a) I)^-1 x_t."""
  acp = jnp.asarray(alphas_cumprod, jnp.float32)
  cov = jnp.array([[1.0, rho], [rho, 1.0]])

  def model_fn(x, t):
    a = acp[t][:, None, None]
    gain = jnp.sqrt(a) * cov @ jnp.linalg.inv(a * cov + (1 - a) * jnp.eye(2))  # [B, 2, 2]
    x0 = jnp.einsum("bij,bj->bi", gain, x)
    return (x - jnp.sqrt(a[:, :, 0]) * x0) / jnp.sqrt(1 - a[:, :, 0])

  return model_fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_repaint_samples_the_conditional_of_correlated_gaussian_data(sampler):
  """Inpainting (known=..., RePaint): x_0 ~ N(0, [[1, rho], [rho, 1]]) with x_0[0] = c kept, the painted
  x_0[1] must follow N(rho c, 1 - rho^2). The kept coordinate ends exactly at c; replacement alone
  (resample_steps=1) is biased towards the prior's 0 (measured: mean 0.92 for 1.35), resampling each
  step 10 times removes most of it (1.32). DDPM with the large variance also gets the spread (0.441
  for 0.436 at 50 steps); DDIM with eta = 1 has the small variance's narrower one (0.37)."""
  rho, c, n = 0.9, 1.5, 4096
  schedule = schedules.make_schedule("cosine", 1000, num_steps=50)
  known = (jnp.tile(jnp.array([c, 0.0]), (n, 1)), jnp.tile(jnp.array([1.0, 0.0]), (n, 1)))
  painted = {}
  for resample_steps in (1, 10):
    run = jax.jit(functools.partial(samplers.sample, _correlated_model_fn(FULL_ACP, rho), schedule, shape=(n, 2),
                                    sampler=sampler, eta=1.0, variance_type="fixed_large", known=known,
                                    resample_steps=resample_steps))
    x = np.asarray(run(jax.random.key(0)))
    np.testing.assert_allclose(x[:, 0], c, rtol=0, atol=1e-6)
    painted[resample_steps] = x[:, 1]
  mean, std = rho * c, np.sqrt(1 - rho ** 2)
  assert abs(painted[10].mean() - mean) < 0.05 and abs(painted[1].mean() - mean) > 0.3
  if sampler == "ddpm":
    assert abs(painted[10].std() - std) < 0.05 * std
  with pytest.raises(ValueError, match="ddpm or ddim"):
    samplers.sample(_correlated_model_fn(FULL_ACP, rho), schedule, jax.random.key(0), shape=(n, 2),
                    sampler="dpmpp_2m", known=known)
