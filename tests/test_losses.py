"""Losses and the learned variance against a float64 NumPy/SciPy reference."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from unclip_jax.diffusion import gaussian, losses, schedules

BETAS = schedules.cosine_betas(1000)
ACP = np.cumprod(1 - BETAS)


def _reference_chain(t):
  """Float64 constants of the full chain at timesteps t, written out directly."""
  acp_prev = np.where(t > 0, ACP[np.maximum(t - 1, 0)], 1.0)
  beta = BETAS[t]
  post_var = beta * (1 - acp_prev) / (1 - ACP[t])
  post_var_1 = BETAS[1] * (1 - ACP[0]) / (1 - ACP[1])
  post_log_var = np.log(np.where(t == 0, post_var_1, post_var))
  coef_x0 = beta * np.sqrt(acp_prev) / (1 - ACP[t])
  coef_xt = (1 - acp_prev) * np.sqrt(1 - beta) / (1 - ACP[t])
  return dict(acp=ACP[t], beta=beta, post_log_var=post_log_var, coef_x0=coef_x0, coef_xt=coef_xt)


def _random_inputs(seed, t):
  rng = np.random.default_rng(seed)
  shape = (len(t), 4, 4, 3)
  x0 = np.clip(np.round(rng.uniform(-1.05, 1.05, shape) * 127.5) / 127.5, -1, 1)  # on the 8-bit grid
  x_t = rng.standard_normal(shape)
  eps_out = rng.standard_normal(shape)
  var_out = rng.uniform(-1, 1, shape)
  return x0, x_t, eps_out, var_out


def _ref_learned_log_var(t, var_out):
  c = _reference_chain(t)
  frac = (var_out + 1) / 2
  b = lambda a: a.reshape(-1, 1, 1, 1)
  return frac * np.log(b(c["beta"])) + (1 - frac) * b(c["post_log_var"])


def test_learned_range_variance_matches_float64_reference():
  t = np.array([0, 1, 2, 17, 500, 998, 999])
  *_, var_out = _random_inputs(0, t)
  schedule = schedules.make_schedule("cosine", 1000)
  ours = gaussian.model_log_variance(schedule, jnp.asarray(t), 4, "learned_range", jnp.asarray(var_out, jnp.float32))
  np.testing.assert_allclose(np.asarray(ours), _ref_learned_log_var(t, var_out), rtol=1e-5, atol=1e-5)


def _ref_vlb(t, x0, x_t, eps_out, var_out):
  c = _reference_chain(t)
  b = lambda a: a.reshape(-1, 1, 1, 1)
  pred_x0 = (x_t - np.sqrt(1 - b(c["acp"])) * eps_out) / np.sqrt(b(c["acp"]))
  model_mean = b(c["coef_x0"]) * pred_x0 + b(c["coef_xt"]) * x_t
  true_mean = b(c["coef_x0"]) * x0 + b(c["coef_xt"]) * x_t
  model_log_var = _ref_learned_log_var(t, var_out)
  true_log_var = b(c["post_log_var"])
  kl = 0.5 * (-1 + model_log_var - true_log_var + np.exp(true_log_var - model_log_var)
              + (true_mean - model_mean) ** 2 * np.exp(-model_log_var))
  std = np.exp(0.5 * model_log_var)
  upper = np.where(x0 > 0.999, np.inf, x0 + 1 / 255)
  lower = np.where(x0 < -0.999, -np.inf, x0 - 1 / 255)
  prob = stats.norm.cdf(upper, model_mean, std) - stats.norm.cdf(lower, model_mean, std)
  nll = -np.log(np.maximum(prob, 1e-12))
  per_dim = np.where(b(t) == 0, nll, kl) / math.log(2)
  return per_dim.reshape(len(t), -1).mean(1)


def test_vlb_term_matches_float64_reference():
  t = np.array([0, 0, 1, 5, 250, 750, 999])
  x0, x_t, eps_out, var_out = _random_inputs(1, t)
  schedule = schedules.make_schedule("cosine", 1000)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  ours = losses.vlb_term(schedule, f32(x0), f32(x_t), jnp.asarray(t), f32(eps_out), f32(var_out),
                         prediction_type="eps")
  np.testing.assert_allclose(np.asarray(ours), _ref_vlb(t, x0, x_t, eps_out, var_out), rtol=2e-4)


def test_hybrid_loss_finite_with_finite_gradients_at_every_t():
  schedule = schedules.make_schedule("cosine", 1000)
  t = jnp.arange(1000)
  key = jax.random.key(0)
  x0 = jnp.clip(jax.random.normal(key, (1000, 2, 2, 3)), -1, 1)
  noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  out = jax.random.normal(jax.random.fold_in(key, 2), (1000, 2, 2, 6)) * 3  # far from the truth

  def loss(out):
    per_example, parts = losses.diffusion_loss(schedule, out, x0, x_t, t, noise, variance_type="learned_range")
    return per_example.mean(), (per_example, parts)

  (value, (per_example, parts)), grad = jax.value_and_grad(loss, has_aux=True)(out)
  assert np.all(np.isfinite(per_example)) and np.all(np.isfinite(grad))
  assert np.all(parts["vlb"] > 0)
  # The VLB reaches only the variance channels' gradient: the mean's comes from the MSE alone.
  mse_grad = jax.grad(lambda o: losses.diffusion_loss(schedule, o, x0, x_t, t, noise)[0].mean())(out[..., :3])
  np.testing.assert_allclose(grad[..., :3], mse_grad, rtol=1e-5, atol=1e-9)
  assert float(jnp.abs(grad[..., 3:]).max()) > 0
  np.testing.assert_allclose(per_example, parts["mse"] + 0.001 * 1000 * parts["vlb"], rtol=1e-6)


def test_vlb_is_minimised_by_the_true_posterior():
  """With the exact x_0 and the true posterior variance the KL terms vanish."""
  schedule = schedules.make_schedule("cosine", 1000)
  t = jnp.array([3, 100, 600, 999])
  key = jax.random.key(1)
  x0 = jax.random.uniform(key, (4, 3, 3, 3), minval=-0.9, maxval=0.9)
  noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  # learned_range output -1 selects exactly the (clipped) posterior log variance.
  vlb = losses.vlb_term(schedule, x0, x_t, t, noise, -jnp.ones_like(x0), prediction_type="eps")
  np.testing.assert_allclose(np.asarray(vlb), 0.0, atol=2e-3)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_targets_invert_to_x0(prediction_type):
  """The training target, read back by the sampler's predict_x0, is x_0 itself."""
  schedule = schedules.make_schedule("cosine", 1000)
  t = jnp.array([0, 10, 400, 900])
  key = jax.random.key(2)
  x0 = jax.random.normal(key, (4, 5))
  noise = jax.random.normal(jax.random.fold_in(key, 1), (4, 5))
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  target = gaussian.training_target(schedule, x0, t, noise, prediction_type)
  np.testing.assert_allclose(gaussian.predict_x0(schedule, x_t, t, target, prediction_type), x0, atol=2e-3)
  loss, _ = losses.diffusion_loss(schedule, target, x0, x_t, t, noise, prediction_type=prediction_type)
  np.testing.assert_allclose(loss, 0.0, atol=1e-12)


@pytest.mark.parametrize("prediction_type", ["eps", "x0", "v"])
def test_min_snr_loss_is_min_snr_gamma_times_the_x0_error(prediction_type):
  """Whatever the network predicts, the min-SNR-gamma loss of an arbitrary output is
  min(SNR_t, gamma) |x0 - x0_hat|^2 (Hang et al. 2023, eq. 9), with x0_hat read the sampler's way, and
  the unweighted MSE is reported beside it; steps on both sides of SNR = gamma are drawn."""
  schedule = schedules.make_schedule("cosine", 1000)
  t = jnp.array([0, 50, 200, 500, 900, 999])
  acp = np.asarray(schedule.alphas_cumprod, np.float64)[np.asarray(t)]
  snr, gamma = acp / (1 - acp), 5.0
  assert snr.min() < gamma < snr.max()
  key = jax.random.key(3)
  x0 = jax.random.uniform(key, (6, 4, 4, 3), minval=-1, maxval=1)
  noise = jax.random.normal(jax.random.fold_in(key, 1), x0.shape)
  output = jax.random.normal(jax.random.fold_in(key, 2), x0.shape)  # a network's arbitrary guess
  x_t = gaussian.q_sample(schedule, x0, t, noise)
  loss, parts = losses.diffusion_loss(schedule, output, x0, x_t, t, noise, prediction_type=prediction_type,
                                      min_snr_gamma=gamma)
  x0_error = np.mean((np.asarray(gaussian.predict_x0(schedule, x_t, t, output, prediction_type)) -
                      np.asarray(x0)) ** 2, axis=(1, 2, 3))
  np.testing.assert_allclose(loss, np.minimum(snr, gamma) * x0_error, rtol=2e-3)
  unweighted, _ = losses.diffusion_loss(schedule, output, x0, x_t, t, noise, prediction_type=prediction_type)
  np.testing.assert_allclose(parts["mse"], unweighted, rtol=1e-6)


def test_wrong_output_channels_is_a_clear_error():
  schedule = schedules.make_schedule("cosine", 1000)
  x = jnp.zeros((2, 4, 4, 3))
  with pytest.raises(ValueError, match="learned_range variance needs 6 output channels"):
    losses.diffusion_loss(schedule, x, x, x, jnp.array([1, 2]), x, variance_type="learned_range")
