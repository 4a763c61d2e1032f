"""Noise schedules and the per-step coefficients of a Gaussian diffusion chain.

Everything is derived in float64 NumPy and cast once, so that the long cumulative
products and the small differences near t = 0 keep their precision in float32.

A `Schedule` describes the chain a model is trained or sampled on. Index `i`
runs over the chain's steps from the least noisy (i = 0) to the noisiest
(i = K - 1); `timesteps[i]` is the training timestep the model is given at that
step. The full training chain has `timesteps = arange(T)`; a respaced chain keeps
K of the T steps and re-derives its betas so that the marginals q(x_t | x_0) are
unchanged (improved DDPM, section 4).
"""

import math

import flax.struct
import jax.numpy as jnp
import numpy as np


def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
  """Improved DDPM's cosine schedule (diffusers' "squaredcos_cap_v2")."""
  def alpha_bar(t):
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2

  return np.array([
      min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
      for i in range(num_timesteps)
  ], dtype=np.float64)


def linear_betas(num_timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
  """DDPM's linear schedule (the paper's 256 -> 1024 upsampler uses it)."""
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def make_betas(name: str, num_timesteps: int) -> np.ndarray:
  if name in ("cosine", "squaredcos_cap_v2"):
    return cosine_betas(num_timesteps)
  if name == "linear":
    return linear_betas(num_timesteps)
  raise ValueError(f"Unknown noise schedule {name!r}; expected 'cosine' or 'linear'.")


SPACINGS = ("linspace", "stride", "logsnr")


def respaced_timesteps(num_timesteps: int, num_steps: int, spacing: str = "linspace",
                       alphas_cumprod=None) -> np.ndarray:
  """The K training timesteps a K-step sampler visits, ascending.

  "linspace": round(i * (T - 1) / (K - 1)), the first and last step included; this
    is improved DDPM's single-section spacing and diffusers' UnCLIPScheduler's.
  "stride": 0, T // K, 2 T // K, ... (DDIM's "ddimK" spacing).
  "logsnr": uniform in half log-SNR between the schedule's ends (`logsnr_timesteps`;
    needs the schedule's alphas_cumprod [T]).
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}.")
  if spacing == "linspace":
    if num_steps == 1:
      return np.array([num_timesteps - 1])
    ratio = (num_timesteps - 1) / (num_steps - 1)
    return np.round(np.arange(num_steps) * ratio).astype(np.int64)
  if spacing == "stride":
    return np.arange(0, num_timesteps, num_timesteps // num_steps)[:num_steps].astype(np.int64)
  if spacing == "logsnr":
    if alphas_cumprod is None or len(alphas_cumprod) != num_timesteps:
      raise ValueError(f"logsnr spacing needs the schedule's {num_timesteps} alphas_cumprod.")
    return logsnr_timesteps(alphas_cumprod, num_steps)
  raise ValueError(f"Unknown spacing {spacing!r}; expected one of {SPACINGS}.")


def half_log_snr(alphas_cumprod) -> np.ndarray:
  """lambda = log(alpha / sigma) = log(abar / (1 - abar)) / 2 (float64), the time of DPM-Solver's ODE."""
  acp = np.asarray(alphas_cumprod, np.float64)
  return 0.5 * (np.log(acp) - np.log1p(-acp))


def logsnr_timesteps(alphas_cumprod, num_steps: int) -> np.ndarray:
  """K ascending timesteps whose lambdas are uniform from lambda(0) to lambda(T - 1), each the
  training timestep nearest its target in lambda.

  Why: DPM-Solver's error per step grows with the step's size in lambda, its
  ODE's time; equal steps there (DPM-Solver's skip_type="logSNR", diffusers'
  use_lu_lambdas) spend few-step budgets where x_0's estimate changes, near
  t = 0, rather than in equal steps of t. Nearest in lambda is diffusers'
  rounding of its interpolated timestep (linear in log sigma between training
  steps); its cosine schedule instead truncates, as its solver uses the exact
  lambdas and only the network reads the truncated t, while this chain's every
  constant is the integer timestep's own. Where several targets round to one
  timestep (a steep end of the schedule, or many steps) they take consecutive
  timesteps instead, the first staying 0 and the last T - 1.
  """
  lam = half_log_snr(alphas_cumprod)  # [T], decreasing in t
  num_timesteps = len(lam)
  if num_steps == 1:
    return np.array([num_timesteps - 1])
  target = np.linspace(lam[0], lam[-1], num_steps)  # [K]
  t = np.abs(lam[None, :] - target[:, None]).argmin(axis=1)  # [K]
  k = np.arange(num_steps)
  t = np.minimum(t, num_timesteps - num_steps + k)  # leaves room above for the steps still to come
  return (np.maximum.accumulate(t - k) + k).astype(np.int64)  # strictly increasing


@flax.struct.dataclass
class Schedule:
  """Per-step constants of one diffusion chain; every array is [K]."""
  timesteps: jnp.ndarray  # int32 model timesteps, ascending
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  alphas_cumprod_prev: jnp.ndarray  # 1 before the first step
  sqrt_alphas_cumprod: jnp.ndarray
  sqrt_one_minus_alphas_cumprod: jnp.ndarray
  posterior_variance: jnp.ndarray
  # log of the posterior variance, whose first entry (0) is replaced by the
  # second, as improved DDPM does: only a learned-range interpolation and the
  # t = 0 decoder term ever read it, and log(0) would poison both.
  posterior_log_variance_clipped: jnp.ndarray
  posterior_mean_coef1: jnp.ndarray  # multiplies x_0
  posterior_mean_coef2: jnp.ndarray  # multiplies x_t
  log_betas: jnp.ndarray
  num_train_timesteps: int = flax.struct.field(pytree_node=False, default=1000)

  @property
  def num_steps(self) -> int:
    return self.timesteps.shape[0]


def chain_constants(alphas_cumprod, timesteps) -> dict[str, np.ndarray]:
  """Float64 per-step constants of the chain visiting `timesteps` (ascending)."""
  acp_all = np.asarray(alphas_cumprod, dtype=np.float64)
  timesteps = np.asarray(timesteps, dtype=np.int64)
  if np.any(np.diff(timesteps) <= 0):
    raise ValueError("timesteps must be strictly increasing.")
  acp = acp_all[timesteps]
  acp_prev = np.concatenate([[1.0], acp[:-1]])
  betas = 1.0 - acp / acp_prev
  post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
  clipped = np.concatenate([post_var[1:2], post_var[1:]]) if len(post_var) > 1 else post_var
  return dict(
      betas=betas,
      alphas_cumprod=acp,
      alphas_cumprod_prev=acp_prev,
      sqrt_alphas_cumprod=np.sqrt(acp),
      sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - acp),
      posterior_variance=post_var,
      posterior_log_variance_clipped=np.log(np.maximum(clipped, 1e-20)),
      posterior_mean_coef1=betas * np.sqrt(acp_prev) / (1.0 - acp),
      posterior_mean_coef2=(1.0 - acp_prev) * np.sqrt(1.0 - betas) / (1.0 - acp),
      log_betas=np.log(betas),
  )


def schedule_from_alphas_cumprod(alphas_cumprod, timesteps, num_train_timesteps,
                                 dtype=jnp.float32) -> Schedule:
  """The chain visiting `timesteps` of a process with these alphas_cumprod."""
  constants = chain_constants(alphas_cumprod, timesteps)
  return Schedule(
      timesteps=jnp.asarray(timesteps, dtype=jnp.int32),
      num_train_timesteps=int(num_train_timesteps),
      **{k: jnp.asarray(v, dtype=dtype) for k, v in constants.items()})


def chain_timesteps(num_timesteps: int, num_steps: int | None = None, spacing: str = "linspace",
                    alphas_cumprod=None):
  if num_steps is None or num_steps == num_timesteps:
    return np.arange(num_timesteps)
  return respaced_timesteps(num_timesteps, num_steps, spacing, alphas_cumprod)


def make_schedule(name: str = "cosine", num_timesteps: int = 1000, num_steps: int | None = None,
                  spacing: str = "linspace", dtype=jnp.float32) -> Schedule:
  """The training chain (num_steps None) or a respaced sampling chain."""
  alphas_cumprod = np.cumprod(1.0 - make_betas(name, num_timesteps))
  timesteps = chain_timesteps(num_timesteps, num_steps, spacing, alphas_cumprod)
  return schedule_from_alphas_cumprod(alphas_cumprod, timesteps, num_timesteps, dtype)
