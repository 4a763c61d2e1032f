"""The Gaussian diffusion process: q(x_t | x_0), its posterior, and how a model's
output is read as a prediction of x_0 and a reverse-process variance.

All functions take a `Schedule` and per-example step indices `i` ([B] int) into
it, and broadcast the per-step constants over the trailing dimensions of x.
"""

import jax.numpy as jnp

from unclip_jax.diffusion.schedules import Schedule

PREDICTION_TYPES = ("eps", "x0", "v")
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")


def extract(values: jnp.ndarray, i: jnp.ndarray, ndim: int) -> jnp.ndarray:
  """values[i] shaped [B, 1, ..., 1] to broadcast against a rank-`ndim` array."""
  out = values[i]
  return out.reshape(out.shape + (1,) * (ndim - out.ndim))


def q_sample(schedule: Schedule, x0, i, noise):
  """x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps."""
  return (extract(schedule.sqrt_alphas_cumprod, i, x0.ndim) * x0 +
          extract(schedule.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * noise)


def q_posterior(schedule: Schedule, x0, x_t, i):
  """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
  mean = (extract(schedule.posterior_mean_coef1, i, x_t.ndim) * x0 +
          extract(schedule.posterior_mean_coef2, i, x_t.ndim) * x_t)
  log_var = extract(schedule.posterior_log_variance_clipped, i, x_t.ndim)
  return mean, log_var


def x0_from_eps(schedule: Schedule, x_t, i, eps):
  abar = extract(schedule.alphas_cumprod, i, x_t.ndim)
  return (x_t - jnp.sqrt(1.0 - abar) * eps) / jnp.sqrt(abar)


def eps_from_x0(schedule: Schedule, x_t, i, x0):
  abar = extract(schedule.alphas_cumprod, i, x_t.ndim)
  return (x_t - jnp.sqrt(abar) * x0) / jnp.sqrt(1.0 - abar)


def v_target(schedule: Schedule, x0, i, noise):
  """v = sqrt(abar) eps - sqrt(1 - abar) x_0 (Salimans & Ho, 2022)."""
  return (extract(schedule.sqrt_alphas_cumprod, i, x0.ndim) * noise -
          extract(schedule.sqrt_one_minus_alphas_cumprod, i, x0.ndim) * x0)


def predict_x0(schedule: Schedule, x_t, i, prediction, prediction_type: str):
  """Reads the model's mean output as an estimate of x_0."""
  if prediction_type == "eps":
    return x0_from_eps(schedule, x_t, i, prediction)
  if prediction_type == "x0":
    return prediction
  if prediction_type == "v":
    return (extract(schedule.sqrt_alphas_cumprod, i, x_t.ndim) * x_t -
            extract(schedule.sqrt_one_minus_alphas_cumprod, i, x_t.ndim) * prediction)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def training_target(schedule: Schedule, x0, i, noise, prediction_type: str):
  if prediction_type == "eps":
    return noise
  if prediction_type == "x0":
    return x0
  if prediction_type == "v":
    return v_target(schedule, x0, i, noise)
  raise ValueError(f"Unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}.")


def split_model_output(output, channels: int, variance_type: str):
  """Splits [..., 2C] learned-variance output into (mean part, variance part)."""
  if variance_type == "learned_range":
    if output.shape[-1] != 2 * channels:
      raise ValueError(f"learned_range variance needs {2 * channels} output channels "
                       f"(mean and variance), got {output.shape[-1]}.")
    return output[..., :channels], output[..., channels:]
  if output.shape[-1] != channels:
    raise ValueError(f"Model output has {output.shape[-1]} channels, expected {channels}.")
  return output, None


def model_log_variance(schedule: Schedule, i, ndim: int, variance_type: str, var_output=None):
  """log sigma_t^2 of the reverse step p(x_{t-1} | x_t)."""
  if variance_type == "fixed_small":
    return extract(schedule.posterior_log_variance_clipped, i, ndim)
  if variance_type == "fixed_large":
    # beta_t, except at the first step where beta_0 would be too small to be
    # consistent with the rest of the chain (improved DDPM).
    log_large = jnp.concatenate([schedule.posterior_log_variance_clipped[1:2], schedule.log_betas[1:]])
    return extract(log_large, i, ndim)
  if variance_type == "learned_range":
    # Improved DDPM eq. 15: interpolate between log beta_t and log beta~_t.
    frac = (var_output + 1.0) / 2.0
    min_log = extract(schedule.posterior_log_variance_clipped, i, ndim)
    max_log = extract(schedule.log_betas, i, ndim)
    return frac * max_log + (1.0 - frac) * min_log
  raise ValueError(f"Unknown variance_type {variance_type!r}; expected one of {VARIANCE_TYPES}.")
