"""Training losses: the simple MSE on the model's target, and improved DDPM's
hybrid loss that also trains a learned reverse-process variance through the
variational bound (VLB) with the mean's gradient stopped."""

import math

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian
from unclip_jax.diffusion.schedules import Schedule


def mean_flat(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def normal_kl(mean1, logvar1, mean2, logvar2):
  """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
  return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) +
                (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def _standard_normal_cdf(x):
  return 0.5 * (1.0 + jax.scipy.special.erf(x / math.sqrt(2.0)))


def discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins: int = 256):
  """log p(x) of data in [-1, 1] quantised to `num_bins` levels under
  N(mean, e^(2 log_scale)), the edge bins extended to +-inf (DDPM's decoder)."""
  half_bin = 1.0 / (num_bins - 1)
  inv_std = jnp.exp(-log_scale)
  cdf_plus = _standard_normal_cdf(inv_std * (x - mean + half_bin))
  cdf_min = _standard_normal_cdf(inv_std * (x - mean - half_bin))
  tiny = 1e-12
  log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, tiny))
  log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, tiny))
  log_mid = jnp.log(jnp.maximum(cdf_plus - cdf_min, tiny))
  edge = 1.0 - 1e-3
  return jnp.where(x < -edge, log_cdf_plus, jnp.where(x > edge, log_one_minus_cdf_min, log_mid))


def vlb_term(schedule: Schedule, x0, x_t, i, mean_output, var_output, *, prediction_type: str,
             variance_type: str = "learned_range"):
  """L_t of the variational bound in bits per dimension, per example [B].

  t > 0: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)); t = 0: the discretised
  decoder's negative log-likelihood of x_0, which stays finite where the KL's
  true posterior variance is zero.
  """
  true_mean, true_log_var = gaussian.q_posterior(schedule, x0, x_t, i)
  x0_pred = gaussian.predict_x0(schedule, x_t, i, mean_output, prediction_type)
  model_mean, _ = gaussian.q_posterior(schedule, x0_pred, x_t, i)
  model_log_var = gaussian.model_log_variance(schedule, i, x_t.ndim, variance_type, var_output)
  kl = mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
  nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var)) / math.log(2.0)
  return jnp.where(i == 0, nll, kl)


def min_snr_weight(schedule: Schedule, i, gamma: float, prediction_type: str):
  """Min-SNR-gamma weights [B] (Hang et al. 2023) on the squared error of the model's target: they make
  the loss min(SNR_t, gamma) * |x0 - x0_hat|^2 whatever the network predicts, so the low-noise steps,
  whose x0 errors are tiny and whose gradients fight the others', stop dominating. The target's error
  is the x0 error times sqrt(SNR) (eps), sqrt(SNR + 1) (v) or 1 (x0)."""
  acp = schedule.alphas_cumprod[i].astype(jnp.float32)
  snr = acp / (1.0 - acp)
  if prediction_type == "eps":
    return jnp.minimum(1.0, gamma / snr)  # min(SNR, gamma) / SNR, and 1 where SNR is 0
  if prediction_type == "v":
    return jnp.minimum(snr, gamma) / (snr + 1.0)
  if prediction_type == "x0":
    return jnp.minimum(snr, gamma)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}")


def diffusion_loss(schedule: Schedule, model_output, x0, x_t, i, noise, *, prediction_type: str = "eps",
                   variance_type: str = "fixed_small", vlb_weight: float = 0.001, min_snr_gamma: float | None = None):
  """Per-example loss [B] and its parts.

  With a learned variance this is improved DDPM's L_hybrid = L_simple + lambda L_vlb.
  L_vlb = T E_t[L_t] is estimated by T * L_t at the sampled t, so the weight on
  L_t is lambda * T (= 1 for the usual lambda = 0.001, T = 1000). The VLB sees
  the mean through stop_gradient: it trains only the variance. min_snr_gamma weights
  the MSE by min_snr_weight (parts["mse"] stays the unweighted one, comparable across runs).
  """
  mean_output, var_output = gaussian.split_model_output(model_output, x0.shape[-1], variance_type)
  target = gaussian.training_target(schedule, x0, i, noise, prediction_type)
  mse = mean_flat((mean_output.astype(jnp.float32) - target) ** 2)
  parts = {"mse": mse}
  loss = mse if min_snr_gamma is None else min_snr_weight(schedule, i, min_snr_gamma, prediction_type) * mse
  if variance_type == "learned_range":
    vlb = vlb_term(schedule, x0, x_t, i, jax.lax.stop_gradient(mean_output.astype(jnp.float32)),
                   var_output.astype(jnp.float32), prediction_type=prediction_type,
                   variance_type=variance_type)
    parts["vlb"] = vlb
    loss = loss + vlb_weight * schedule.num_train_timesteps * vlb
  return loss, parts
