"""Multistep DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): the deterministic
probability-flow ODE solved on the model's x_0 prediction.

Why: in log-SNR time lambda = log(alpha / sigma) the ODE's linear part integrates
exactly, leaving an integral of the x_0 prediction; extrapolating that
prediction from the last one or two steps (an Adams-type multistep rule) makes
the solver second or third order at one model call per step, so 10-20 steps
land where DDIM needs far more. First order it is DDIM with eta = 0.

`samplers.sample(..., sampler="dpmpp_2m" | "dpmpp_3m")` runs it inside its one
`lax.scan`; this module holds the per-step coefficients and the update. Step k
of the scan (k = 0 the noisiest) is at chain index i = K - 1 - k and moves from
(alpha_s, sigma_s) = sqrt(abar_i), sqrt(1 - abar_i) to the chain's previous
state, abar_prev_i (1 after the last step: the update returns the x_0 estimate).
The per-step order follows diffusers' DPMSolverMultistepScheduler defaults
(lower_order_final, final sigma zero): first order at the first step and the
last, and for fewer than 15 steps at most second order at the last but one.

A chain that starts at t = 0 (this repository's linspace, stride and logsnr respacing)
reads the model once more at t = 0, where sigma is ~0.006 (cosine): there the
solver proper ends at t = 0 and its last step, the one into t = 0, is the
first-order final step (diffusers' final_sigmas_type="sigma_min" with
euler_at_final), followed by a first-order read-out of x_0. Run as a second-order
step, the jump into t = 0 (several times the previous step in lambda)
extrapolates the x_0 trend too far: on Gaussian data at 10 steps the output
std overshot by 29-36% where DDIM undershoots by 16-22% (first order: 6-15%).
"""

import jax.numpy as jnp
import numpy as np

from unclip_jax.diffusion.schedules import Schedule

ORDERS = {"dpmpp_2m": 2, "dpmpp_3m": 3}


def step_orders(num_steps: int, order: int, reads_out_at_zero: bool = False) -> np.ndarray:
  """[K] order of each scan step: warm-up from 1, then diffusers' lower_order_final.

  reads_out_at_zero: the chain's last step goes from t = 0 to x_0; the solver's
  final step is then the one before it.
  """
  solver_steps = num_steps - 1 if reads_out_at_zero else num_steps
  orders = np.minimum(order, np.arange(num_steps) + 1)  # no history yet at the first steps
  # Into the final level a multistep rule extrapolates furthest (into sigma = 0 it would divide by h = inf).
  orders[max(solver_steps - 1, 0):] = 1
  if 2 <= solver_steps < 15:  # few steps: their sizes vary too much for order 3 at the end
    orders[solver_steps - 2] = min(orders[solver_steps - 2], 2)
  return orders


def multistep_coefficients(schedule: Schedule, order: int) -> dict:
  """Per-step constants of the multistep update, each [K] and indexed by scan step k.

  x_next = a x + b m0 + c1 D1 + c2 D2 with m0 the current x_0 estimate and the
  divided differences D1, D2 of the earlier ones (see `multistep_update`);
  r0, r1 are the previous step sizes over this one, w mixes D1 for order 3.
  Coefficients a step's order does not use are 0, the unused ratios 1, so no
  step multiplies or divides by an infinity (the last step's h is infinite).
  """
  num_steps = schedule.num_steps
  orders = jnp.where(schedule.timesteps[0] == 0, step_orders(num_steps, order, reads_out_at_zero=True),
                     step_orders(num_steps, order))  # [K]; the schedule may be traced
  # [K] by scan step. The schedule's roots come from float64: sqrt(1 - abar) formed in float32
  # would lose ~1e-3 of sigma near t = 0.
  alpha = schedule.sqrt_alphas_cumprod[::-1]
  sigma = schedule.sqrt_one_minus_alphas_cumprod[::-1]
  alpha_t = jnp.concatenate([alpha[1:], jnp.ones((1,), alpha.dtype)])  # the step's target, abar_prev
  sigma_t = jnp.concatenate([sigma[1:], jnp.zeros((1,), sigma.dtype)])
  lam = jnp.log(alpha) - jnp.log(sigma)  # [K] half log-SNR at each step's start
  # The step size in lambda; infinite into sigma = 0, where only the first-order terms are used.
  h = jnp.concatenate([lam[1:] - lam[:-1], jnp.full((1,), jnp.inf, lam.dtype)])
  h_safe = jnp.concatenate([h[:-1], jnp.ones((1,), lam.dtype)])
  a = sigma_t / sigma
  b = -alpha_t * jnp.expm1(-h)  # alpha_t (1 - e^-h); alpha_t = 1 at the last step
  h0 = jnp.concatenate([jnp.ones((1,), lam.dtype), h[:-1]])  # the previous step's size (filler at k = 0)
  h1 = jnp.concatenate([jnp.ones((1,), lam.dtype), h0[:-1]])  # the one before
  r0 = jnp.where(orders >= 2, h0 / h_safe, 1.0)
  r1 = jnp.where(orders >= 3, h1 / h_safe, 1.0)
  c1 = jnp.where(orders == 2, 0.5 * b, jnp.where(orders == 3, alpha_t - b / h_safe, 0.0))
  c2 = jnp.where(orders == 3, -alpha_t * ((jnp.expm1(-h_safe) + h_safe) / h_safe ** 2 - 0.5), 0.0)
  w = jnp.where(orders == 3, r0 / (r0 + r1), 0.0)
  return dict(a=a, b=b, c1=c1, c2=c2, r0=r0, r1=r1, w=w)


def init_history(x_T, order: int, dtype) -> tuple:
  """The scan carry's earlier x_0 estimates (order - 1 of them, most recent first)."""
  return tuple(jnp.zeros(x_T.shape, dtype) for _ in range(order - 1))


def multistep_update(coefficients: dict, k, x, x0, history: tuple):
  """One DPM-Solver++ step from x with x_0 estimate x0; returns (x_next, history).

  history: the x_0 estimates of the previous 1 (2M) or 2 (3M) steps, most recent
  first; at the first steps they are zeros that the step's coefficients ignore.
  Divided differences as in diffusers (midpoint form for 2M):
  D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
  D1 = D1_0 + w (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1).
  """
  c = {name: v[k] for name, v in coefficients.items()}
  if not history:  # order 1: DDIM
    return (c["a"] * x + c["b"] * x0).astype(x.dtype), ()
  m0 = x0.astype(history[0].dtype)
  d1 = (m0 - history[0]) / c["r0"]
  x_next = c["a"] * x + c["b"] * m0
  if len(history) == 2:
    d1_prev = (history[0] - history[1]) / c["r1"]
    d2 = (d1 - d1_prev) / (c["r0"] + c["r1"])
    x_next = x_next + c["c1"] * (d1 + c["w"] * (d1 - d1_prev)) + c["c2"] * d2
  else:
    x_next = x_next + c["c1"] * d1
  return x_next.astype(x.dtype), (m0,) + history[:-1]
