"""DDPM, DDIM and DPM-Solver++ sampling, DDIM inversion and classifier-free guidance.

A model function is `model_fn(x, t) -> output` with x [B, ..., C], t [B] int32
training timesteps, and output [B, ..., C] (or [B, ..., 2C] with a learned
variance, the variance channels last). Samplers are plain functions meant to be
called under one `jax.jit`: the step loop is a `lax.scan`, so a whole chain
compiles once and runs without returning to Python. Given a `Part`, they run
some of the chain's steps instead, so that the host can draw progress between
calls (progress.run_chain).
"""

import functools
from collections.abc import Callable
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from unclip_jax.diffusion import dpm_solver, gaussian
from unclip_jax.diffusion.schedules import Schedule

ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]
SAMPLERS = ("ddpm", "ddim") + tuple(dpm_solver.ORDERS)  # dpmpp_2m, dpmpp_3m


@flax.struct.dataclass
class Part:
  """`count` steps of a chain from scan step `first`, continuing the loop state a previous part
  returned (state None: the chain's start).

  Why: a host callback inside a compiled loop (a progress bar's) keeps JAX's persistent
  compilation cache from storing the program, so every process compiled the loop again. Run in
  parts, the loop needs none: the host draws the bar between calls (progress.run_chain), and
  two programs serve every call, the start (count 0) and a step (count 1, `first` traced).
  """
  state: Any = None  # the scan carry: (x, DPM-Solver history) for sample, x for ddim_invert
  first: Any = 0  # int32 scalar
  count: int = flax.struct.field(pytree_node=False, default=1)


def run_steps(body, start: Callable, num_steps: int, finish: Callable, part: Part | None):
  """The chain's lax.scan of body(state, k) over its steps k = 0 .. K - 1 from start(), then
  finish(state); given a part, over the part's steps only, returning (state, finish(state))."""
  state = start() if part is None or part.state is None else part.state
  steps = jnp.arange(num_steps) if part is None else part.first + jnp.arange(part.count)
  if steps.shape[0]:  # the start (count 0) traces no model
    state, _ = jax.lax.scan(body, state, steps)
  return finish(state) if part is None else (state, finish(state))


def clip_x0(x0, clip_range: float | None = None, dynamic_threshold: float | None = None):
  """Keeps the predicted x_0 in range.

  clip_range: clamp to [-r, r].
  dynamic_threshold: Imagen's dynamic thresholding with this quantile p of |x_0|
    per sample: s = max(quantile_p |x_0|, r), clamp to [-s, s], rescale to r
    (r = clip_range or 1).
  """
  if dynamic_threshold is not None:
    limit = 1.0 if clip_range is None else clip_range
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, dynamic_threshold, axis=1), limit)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1))
    return jnp.clip(x0, -s, s) * (limit / s)
  if clip_range is not None:
    return jnp.clip(x0, -clip_range, clip_range)
  return x0


def _step_index(i, x):
  return jnp.broadcast_to(jnp.asarray(i, jnp.int32), (x.shape[0],))


def predict_x0_eps(schedule: Schedule, i, x_t, model_output, *, prediction_type: str,
                   variance_type: str, clip_range=None, dynamic_threshold=None):
  """(x0, eps, variance output) read from a model output at step index i."""
  i = _step_index(i, x_t)
  mean_out, var_out = gaussian.split_model_output(model_output, x_t.shape[-1], variance_type)
  x0 = gaussian.predict_x0(schedule, x_t, i, mean_out, prediction_type)
  x0 = clip_x0(x0, clip_range, dynamic_threshold)
  eps = gaussian.eps_from_x0(schedule, x_t, i, x0)
  return x0, eps, var_out


def ddpm_step(schedule: Schedule, i, x_t, model_output, noise, *, prediction_type: str = "eps",
              variance_type: str = "fixed_small", clip_range=None, dynamic_threshold=None):
  """One ancestral step x_t -> x_{t-1} ~ p(x_{t-1} | x_t); no noise at i = 0.

  Returns (x_prev, x0_pred).
  """
  idx = _step_index(i, x_t)
  x0, _, var_out = predict_x0_eps(schedule, idx, x_t, model_output, prediction_type=prediction_type,
                                  variance_type=variance_type, clip_range=clip_range,
                                  dynamic_threshold=dynamic_threshold)
  mean, _ = gaussian.q_posterior(schedule, x0, x_t, idx)
  log_var = gaussian.model_log_variance(schedule, idx, x_t.ndim, variance_type, var_out)
  nonzero = (idx > 0).astype(x_t.dtype).reshape((-1,) + (1,) * (x_t.ndim - 1))
  return mean + nonzero * jnp.exp(0.5 * log_var) * noise, x0


def ddim_step(schedule: Schedule, i, x_t, model_output, noise, *, eta: float = 0.0,
              prediction_type: str = "eps", variance_type: str = "fixed_small", clip_range=None,
              dynamic_threshold=None):
  """One DDIM step (Song et al. 2021, eq. 12); eta = 1 matches DDPM's posterior
  variance, eta = 0 is deterministic. Returns (x_prev, x0_pred)."""
  idx = _step_index(i, x_t)
  x0, eps, _ = predict_x0_eps(schedule, idx, x_t, model_output, prediction_type=prediction_type,
                              variance_type=variance_type, clip_range=clip_range,
                              dynamic_threshold=dynamic_threshold)
  abar = gaussian.extract(schedule.alphas_cumprod, idx, x_t.ndim)
  abar_prev = gaussian.extract(schedule.alphas_cumprod_prev, idx, x_t.ndim)
  sigma = eta * jnp.sqrt((1.0 - abar_prev) / (1.0 - abar) * (1.0 - abar / abar_prev))
  mean = jnp.sqrt(abar_prev) * x0 + jnp.sqrt(jnp.maximum(1.0 - abar_prev - sigma ** 2, 0.0)) * eps
  return mean + sigma * noise, x0


def sample(model_fn: ModelFn, schedule: Schedule, rng, x_T=None, *, shape=None, sampler: str = "ddpm",
           eta: float = 0.0, prediction_type: str = "eps", variance_type: str = "fixed_small",
           clip_range: float | None = None, dynamic_threshold: float | None = None,
           step_noise=None, finish: Callable | None = None, part: Part | None = None, known=None,
           resample_steps: int = 1):
  """Runs the reverse chain from x_T (or fresh noise of `shape`) to x_0; returns finish(x_0)
  (default x_0), or with a `part` (state, finish(x)) after the part's steps.

  Per-step noise is drawn from fold_in(rng, step), so it does not depend on how
  many steps ran before. `rng` is one key for the batch, or one key per sample
  ([B] keys): then every sample's noise depends on its own key alone, so a
  sample is the same whatever batch (or device) it is drawn in. `step_noise`
  [K, *x.shape] replaces the draws (k-th step taken uses step_noise[k]), for
  exact comparison with other implementations.

  sampler "dpmpp_2m" / "dpmpp_3m" is multistep DPM-Solver++ (`dpm_solver`):
  deterministic like DDIM with eta = 0 (no draws; eta and step_noise unused),
  second / third order on the clamped x_0 prediction, for fewer steps.

  known = (x0_known, keep) inpaints (RePaint, Lugmayr et al. 2022): keep [B, ..., 1] (or x's shape)
  is 1 where x0_known [B, ...] is kept, 0 where the chain paints. After every step the kept part of
  x_{t-1} is x0_known noised to the step's level (q(x_{t-1} | x_0), fresh noise), so the chain ends
  on x0_known exactly there; resample_steps = U > 1 takes each step U times, going back to its
  noise level (q(x_t | x_{t-1}), fresh noise) between takes, so the painted part agrees with the
  kept one (RePaint's jump length 1). DDPM and DDIM only: DPM-Solver++'s multistep history would
  not follow the replaced pixels.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"Unknown sampler {sampler!r}; expected one of {SAMPLERS}.")
  if known is not None and sampler in dpm_solver.ORDERS:
    raise ValueError(f"Inpainting samples with ddpm or ddim, not {sampler}.")
  if resample_steps < 1 or (resample_steps > 1 and known is None):
    raise ValueError(f"resample_steps is for inpainting (known=...) and at least 1, got {resample_steps}.")
  _, step_rng = _split(rng)
  if x_T is None and shape is None:
    raise ValueError("Pass x_T or shape.")
  num_steps = schedule.num_steps
  deterministic = sampler == "ddim" and isinstance(eta, (int, float)) and eta == 0
  kwargs = dict(prediction_type=prediction_type, variance_type=variance_type,
                clip_range=clip_range, dynamic_threshold=dynamic_threshold)
  order = dpm_solver.ORDERS.get(sampler)
  if order is not None:
    coefficients = dpm_solver.multistep_coefficients(schedule, order)  # [K] each

  def start():
    x = initial_noise(rng, shape) if x_T is None else x_T
    if order is None:
      return x, ()
    # Earlier x_0 estimates ride in the carry, in the schedule's precision at least.
    return x, dpm_solver.init_history(x, order, jnp.result_type(x.dtype, schedule.alphas_cumprod.dtype))

  def take(x, i, noise, known_noise):
    """One step x_t -> x_{t-1} at index i, the kept part replaced by x0_known at x_{t-1}'s level."""
    out = model_fn(x, jnp.broadcast_to(schedule.timesteps[i], (x.shape[0],)))
    step = ddpm_step if sampler == "ddpm" else functools.partial(ddim_step, eta=eta)
    x, _ = step(schedule, i, x, out, noise, **kwargs)
    x0_known, keep = known
    abar_prev = gaussian.extract(schedule.alphas_cumprod_prev, _step_index(i, x), x.ndim)
    noised = jnp.sqrt(abar_prev) * x0_known + jnp.sqrt(1.0 - abar_prev) * known_noise
    return keep * noised + (1 - keep) * x

  def repaint(x, k):
    """Step index i taken resample_steps times, back to its level between takes."""
    i = num_steps - 1 - k
    base = _fold_in(step_rng, k)
    abar = gaussian.extract(schedule.alphas_cumprod, _step_index(i, x), x.ndim)
    abar_prev = gaussian.extract(schedule.alphas_cumprod_prev, _step_index(i, x), x.ndim)

    def one(x, u):
      draw = lambda purpose: normal(_fold_in(base, 3 * u + purpose), x.shape, x.dtype)
      x_prev = take(x, i, draw(0), draw(1))
      back = jnp.sqrt(abar / abar_prev) * x_prev + jnp.sqrt(1.0 - abar / abar_prev) * draw(2)
      return jnp.where(u < resample_steps - 1, back, x_prev), None

    x, _ = jax.lax.scan(one, x, jnp.arange(resample_steps))
    return x

  def body(carry, k):
    x, history = carry
    if known is not None:
      return (repaint(x, k), history), None
    i = num_steps - 1 - k
    t = jnp.broadcast_to(schedule.timesteps[i], (x.shape[0],))
    out = model_fn(x, t)
    if order is not None:
      x0, _, _ = predict_x0_eps(schedule, i, x, out, **kwargs)
      x, history = dpm_solver.multistep_update(coefficients, k, x, x0, history)
    else:
      if step_noise is not None:
        noise = step_noise[k].astype(x.dtype)
      elif deterministic:
        noise = jnp.zeros((), x.dtype)  # no draw: random bits cost more than the step itself
      else:
        noise = normal(_fold_in(step_rng, k), x.shape, x.dtype)
      if sampler == "ddpm":
        x, _ = ddpm_step(schedule, i, x, out, noise, **kwargs)
      else:
        x, _ = ddim_step(schedule, i, x, out, noise, eta=eta, **kwargs)
    return (x, history), None

  finish = finish or (lambda x: x)
  return run_steps(body, start, num_steps, lambda state: finish(state[0]), part)


def initial_noise(rng, shape, dtype=jnp.float32):
  """The x_T that `sample` draws from `rng` when it is given no x_T."""
  return normal(_split(rng)[0], shape, dtype)


def _per_sample(rng) -> bool:
  """An array of keys, one per sample: typed keys [B], or raw uint32 key data [B, 2]."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def _split(rng):
  if _per_sample(rng):
    pair = jax.vmap(jax.random.split)(rng)  # [B, 2]
    return pair[:, 0], pair[:, 1]
  return tuple(jax.random.split(rng))


def _fold_in(rng, data):
  return jax.vmap(lambda r: jax.random.fold_in(r, data))(rng) if _per_sample(rng) else jax.random.fold_in(rng, data)


def normal(rng, shape, dtype=jnp.float32):
  """N(0, 1) of `shape`, from one key, or from one key per sample (rng [B], shape[0] == B)."""
  if _per_sample(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} per-sample keys for a batch of {shape[0]}.")
    return jax.vmap(lambda r: jax.random.normal(r, shape[1:], dtype))(rng)
  return jax.random.normal(rng, shape, dtype)


def ddim_invert(model_fn: ModelFn, schedule: Schedule, x0, *, prediction_type: str = "eps",
                variance_type: str = "fixed_small", clip_range: float | None = None,
                dynamic_threshold: float | None = None, fixed_point_iters: int = 0, part: Part | None = None):
  """Deterministic DDIM encoding x_0 -> x_T (the state at the chain's last step); with a `part`,
  (x, x) after the part's steps (as `sample`).

  Plain inversion (fixed_point_iters=0) reads the model at the previous, less
  noisy state, so a DDIM decode only approximately retraces it. Each fixed-point
  iteration instead solves DDIM(x_k) = x_{k-1} for x_k with the model read at
  x_k itself, as the decoder will read it, so decode(invert(x)) converges to x.
  The equation is iterated in the form that contracts: through the predicted
  noise where the signal dominates (abar > 1/2) and through the predicted x_0
  where the noise does, since each prediction barely moves with x there. Where
  an iteration does not contract (a model that is no denoiser), the iterate
  that came closest (smallest |DDIM(x_k) - x_{k-1}| per sample) is kept, so the
  iterations never leave a step worse than the first, plain estimate. A step
  reads the model fixed_point_iters + 2 times (plain: once).

  clip_range / dynamic_threshold: the x_0 clamp of the DDIM decode to be
  retraced (pass the decode's own; the fixed point then solves the clamped
  step exactly, as the eps and x_0 forms are both exact given the prediction).
  """
  num_steps = schedule.num_steps
  kwargs = dict(prediction_type=prediction_type, variance_type=variance_type, clip_range=clip_range,
                dynamic_threshold=dynamic_threshold)

  def step(x_prev, k):
    t = jnp.broadcast_to(schedule.timesteps[k], (x_prev.shape[0],))
    abar, abar_prev = schedule.alphas_cumprod[k], schedule.alphas_cumprod_prev[k]

    def predict(x):
      x0_pred, eps, _ = predict_x0_eps(schedule, k, x, model_fn(x, t), **kwargs)
      return x0_pred, eps

    def solve_through_eps(eps):  # x_k whose DDIM step with this eps lands on x_prev
      x0_hat = (x_prev - jnp.sqrt(1.0 - abar_prev) * eps) / jnp.sqrt(abar_prev)
      return jnp.sqrt(abar) * x0_hat + jnp.sqrt(1.0 - abar) * eps

    def solve_through_x0(x0_pred):  # the same, given x0 (needs abar_prev < 1)
      ratio = jnp.sqrt((1.0 - abar) / jnp.maximum(1.0 - abar_prev, 1e-20))
      return ratio * (x_prev - jnp.sqrt(abar_prev) * x0_pred) + jnp.sqrt(abar) * x0_pred

    def residual(x0_pred, eps):  # per sample: how far DDIM(x) lands from x_prev
      miss = jnp.sqrt(abar_prev) * x0_pred + jnp.sqrt(1.0 - abar_prev) * eps - x_prev
      return jnp.sqrt(jnp.sum(jnp.square(miss).reshape(miss.shape[0], -1), axis=1))

    def keep(mask, new, old):
      return jnp.where(mask.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    def update(x0_pred, eps):
      return jnp.where(abar > 0.5, solve_through_eps(eps), solve_through_x0(x0_pred))

    def refine(_, carry):
      x0_pred, eps, best_x, best_r = carry
      x = update(x0_pred, eps)
      x0_pred, eps = predict(x)
      r = residual(x0_pred, eps)
      better = r <= best_r  # False for NaN
      return x0_pred, eps, keep(better, x, best_x), jnp.where(better, r, best_r)

    x_next = solve_through_eps(predict(x_prev)[1])
    if fixed_point_iters:
      # Each iterate is read once more to measure its residual, and the closest is
      # kept: a safeguard for models on which the iteration does not contract (an
      # untrained network is no denoiser); it never returns worse than the plain estimate.
      x0_pred, eps = predict(x_next)
      carry = (x0_pred, eps, x_next, residual(x0_pred, eps))
      x_next = jax.lax.fori_loop(0, fixed_point_iters, refine, carry)[2]
    return x_next, None

  return run_steps(step, lambda: x0, num_steps, lambda x: x, part)


def classifier_free_guidance(model_fn: Callable, cond, uncond, scale, *, guided_channels: int | None = None
                             ) -> ModelFn:
  """A model function that evaluates cond and uncond in one batched call and
  returns uncond + scale * (cond - uncond).

  model_fn(x, t, conditioning) takes any pytree of [B, ...] conditioning arrays.
  scale is a scalar or [B] (one guidance scale per sample). guided_channels
  limits guidance to the first channels (the mean of a learned-variance model);
  the remaining channels come from the conditional branch, as in GLIDE.

  The doubled batch interleaves them (row 2i is sample i's cond, 2i + 1 its
  uncond), so when the batch is split over devices each sample's two halves
  stay on its device and guidance needs no communication.
  """
  def pair(c, u):  # [B, ...] twice -> [2B, ...]
    return jnp.stack([c, u], axis=1).reshape((-1,) + c.shape[1:])

  both = jax.tree.map(pair, cond, uncond)

  def guided(x, t):
    batch = x.shape[0]
    out = model_fn(pair(x, x), pair(t, t), both)
    out_cond, out_uncond = jnp.moveaxis(out.reshape((batch, 2) + out.shape[1:]), 1, 0)
    s = jnp.asarray(scale, out.dtype)
    s = jnp.broadcast_to(s, (batch,)).reshape((batch,) + (1,) * (out.ndim - 1))
    n = out.shape[-1] if guided_channels is None else guided_channels
    mixed = out_uncond[..., :n] + s * (out_cond[..., :n] - out_uncond[..., :n])
    return jnp.concatenate([mixed, out_cond[..., n:]], axis=-1)

  return guided
