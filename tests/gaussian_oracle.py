"""The exact denoiser for Gaussian data x_0 ~ N(m, s^2), a closed-form oracle
for samplers: used as the model, a correct sampler must reproduce N(m, s^2)."""

import jax.numpy as jnp


def exact_model_fn(alphas_cumprod, m, s, prediction_type):
  """model_fn(x, t) predicting E[eps | x_t], E[x_0 | x_t] or E[v | x_t]."""
  acp = jnp.asarray(alphas_cumprod, jnp.float32)

  def model_fn(x, t):
    a = acp[t].reshape((-1,) + (1,) * (x.ndim - 1))
    var_t = a * s ** 2 + 1.0 - a
    centred = x - jnp.sqrt(a) * m
    x0 = m + jnp.sqrt(a) * s ** 2 * centred / var_t
    eps = jnp.sqrt(1.0 - a) * centred / var_t
    if prediction_type == "eps":
      return eps
    if prediction_type == "x0":
      return x0
    return jnp.sqrt(a) * eps - jnp.sqrt(1.0 - a) * x0

  return model_fn
