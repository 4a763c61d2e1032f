"""The prior stage: x0-MSE loss with classifier-free-guidance dropout, a train
step, and guided, respaced sampling with best-of-n selection.

Conditioning is a dict of CLIP text outputs, each with a leading batch axis:
  {"z_t": [B, D], "tokens": [B, T, W], "mask": [B, T] bool}
and the unconditional text (CLIP's encoding of the empty prompt) has the same
keys with a batch of 1. A training batch adds "z_i": [B, D], the CLIP image
embedding. Latents are normalised with the prior's stats (clip_mean,
clip_std), which are kept outside the params and never trained.
"""

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from unclip_jax import optim
from unclip_jax.diffusion import gaussian, losses, samplers, schedules
from unclip_jax.models import prior as prior_lib

COND_KEYS = ("z_t", "tokens", "mask")


def text_conditioning(encoding) -> dict:
  """clip.TextEncoding (or any (embedding, tokens, mask) triple) -> conditioning dict."""
  z_t, tokens, mask = encoding
  return {"z_t": z_t, "tokens": tokens, "mask": mask}


def latent_stats(z_i) -> dict:
  """clip_mean / clip_std of a sample of CLIP image embeddings [N, D], per dimension."""
  z_i = np.asarray(z_i, np.float64)
  return {"clip_mean": jnp.asarray(z_i.mean(0), jnp.float32),
          "clip_std": jnp.asarray(np.maximum(z_i.std(0), 1e-6), jnp.float32)}


def _check_cond(cond: dict, name: str):
  missing = [k for k in COND_KEYS if k not in cond]
  if missing:
    raise ValueError(f"{name} is missing {missing}; expected keys {COND_KEYS} (see text_conditioning).")


def _uncond_like(uncond: dict, cond: dict) -> dict:
  """uncond with batch 1 (broadcast) or the batch of cond, shaped like cond."""
  batch = cond["z_t"].shape[0]
  out = {}
  for k in COND_KEYS:
    u, c = jnp.asarray(uncond[k]), cond[k]
    if u.shape[1:] != c.shape[1:] or u.shape[0] not in (1, batch):
      raise ValueError(f"uncond[{k!r}] has shape {u.shape}; expected [1 or {batch}, *{tuple(c.shape[1:])}] "
                       f"to match the conditioning {tuple(c.shape)}.")
    out[k] = jnp.broadcast_to(u, c.shape).astype(c.dtype)
  return out


def cfg_dropout(cond: dict, uncond: dict, rng, p_uncond: float):
  """Replaces each example's text conditioning by the unconditional one with
  probability p_uncond (the paper drops it 10% of the time). Returns (cond, dropped [B])."""
  batch = cond["z_t"].shape[0]
  uncond = _uncond_like(uncond, cond)
  dropped = jax.random.bernoulli(rng, p_uncond, (batch,))
  pick = lambda c, u: jnp.where(dropped.reshape((batch,) + (1,) * (c.ndim - 1)), u, c)
  return {k: pick(cond[k], uncond[k]) for k in COND_KEYS}, dropped


def prior_loss(params, batch: dict, rng, *, model: prior_lib.DiffusionPrior, stats: dict,
               schedule: schedules.Schedule, uncond: dict, p_uncond: float = 0.1):
  """Mean over the batch of ||x0_pred - x0||^2 (per-dimension mean), x0 = normalised z_i.

  Signature (after partial) is the shared `loss_fn(params, batch, rng)`.
  """
  _check_cond(batch, "batch")
  _check_cond(uncond, "uncond")
  variables = {"params": params, "stats": stats}
  t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  x0 = prior_lib.normalize(variables, batch["z_i"].astype(jnp.float32))  # [B, D]
  i = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = gaussian.q_sample(schedule, x0, i, noise)
  cond, dropped = cfg_dropout(batch, uncond, drop_rng, p_uncond)
  pred = model.apply(variables, x_t, schedule.timesteps[i], cond["z_t"], cond["tokens"], cond["mask"],
                     deterministic=False, rngs={"dropout": dropout_rng})
  per_example, _ = losses.diffusion_loss(schedule, pred, x0, x_t, i, noise, prediction_type="x0")
  loss = per_example.mean()
  return loss, {"loss": loss, "uncond_fraction": dropped.mean()}


@flax.struct.dataclass
class PriorTrainState:
  """What training updates; CLIP's params and the latent stats stay outside."""
  step: jnp.ndarray
  params: Any
  opt_state: Any
  ema_params: Any


def create_train_state(params, tx: optax.GradientTransformation) -> PriorTrainState:
  return PriorTrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                         ema_params=jax.tree.map(jnp.copy, params))


def train_step(state: PriorTrainState, batch: dict, rng, *, model, stats, schedule, uncond,
               tx: optax.GradientTransformation, p_uncond: float = 0.1, ema_decay: float = 0.9999):
  """One AdamW step on prior_loss, then the EMA update. jit with model/tx/p_uncond/ema_decay bound."""
  loss_fn = functools.partial(prior_loss, model=model, stats=stats, schedule=schedule, uncond=uncond,
                              p_uncond=p_uncond)
  grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, jax.random.fold_in(rng, state.step))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = optim.ema_update(state.ema_params, params, ema_decay)
  metrics["grad_norm"] = optax.global_norm(grads)
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics


def make_paper_train_step(model, stats, schedule, uncond, *, learning_rate=None, p_uncond: float = 0.1,
                          **adamw_overrides):
  """(tx, jitted step(state, batch, rng)) with the paper's prior AdamW (Table 3)."""
  tx = optim.paper_adamw("prior", learning_rate, **adamw_overrides)
  ema_decay = optim.PAPER_HPARAMS["prior"]["ema_decay"]
  step = jax.jit(functools.partial(train_step, model=model, schedule=schedule, tx=tx, p_uncond=p_uncond,
                                   ema_decay=ema_decay))
  return tx, lambda state, batch, rng: step(state, batch, rng, stats=stats, uncond=uncond)


def sample_prior(model: prior_lib.DiffusionPrior, variables, cond: dict, uncond: dict, rng, *,
                 num_steps: int = 25, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 4.0,
                 clip_range: float | None = 5.0, num_candidates: int = 2, noise_schedule: str = "cosine",
                 num_train_timesteps: int = 1000, x_T=None, step_noise=None, progress_desc: str | None = None):
  """CLIP image embeddings z_i [B, D] for text conditioning `cond` (batch B).

  Runs the respaced chain (Karlo: 25 DDPM steps, guidance 4, x0 clamped to
  +-5 in normalised space, fixed-small variance; the paper: 64 steps) for
  num_candidates draws per prompt and keeps the draw whose z_i has the largest
  dot product with z_t (the paper uses 2). x_T [B * n, D] and step_noise
  [K, B * n, D] (prompt-major: prompt b's draws at rows b*n .. b*n+n-1) fix the
  noise for comparisons. Call under jax.jit with the static arguments bound.
  """
  _check_cond(cond, "cond")
  _check_cond(uncond, "uncond")
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
  batch, dim = cond["z_t"].shape
  rows = batch * num_candidates
  cond_n = {k: jnp.repeat(cond[k], num_candidates, axis=0) for k in COND_KEYS}  # [B * n, ...]
  schedule = schedules.make_schedule(noise_schedule, num_train_timesteps, num_steps)

  def model_fn(x, t, c):
    return model.apply(variables, x, t, c["z_t"], c["tokens"], c["mask"])

  if guidance_scale is None or guidance_scale == 1.0:
    guided = functools.partial(model_fn, c=cond_n)
  else:
    uncond = _uncond_like(uncond, cond)
    uncond_n = {k: jnp.repeat(uncond[k], num_candidates, axis=0) for k in COND_KEYS}
    guided = samplers.classifier_free_guidance(model_fn, cond_n, uncond_n, guidance_scale)
  if x_T is not None and x_T.shape != (rows, dim):
    raise ValueError(f"x_T must be [B * num_candidates, D] = {(rows, dim)}, got {x_T.shape}.")
  x0 = samplers.sample(guided, schedule, rng, x_T, shape=(rows, dim), sampler=sampler, eta=eta,
                       prediction_type="x0", variance_type="fixed_small", clip_range=clip_range,
                       step_noise=step_noise, progress_desc=progress_desc)
  z_i = prior_lib.denormalize(variables, x0).reshape(batch, num_candidates, dim)
  scores = jnp.einsum("bnd,bd->bn", z_i, cond["z_t"].astype(z_i.dtype))
  best = jnp.argmax(scores, axis=1)
  return jnp.take_along_axis(z_i, best[:, None, None], axis=1)[:, 0]  # [B, D]
