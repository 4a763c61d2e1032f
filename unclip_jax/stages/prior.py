"""The prior stage: x0-MSE loss with classifier-free-guidance dropout, guided,
respaced sampling with best-of-n selection, and the `PriorStage` that
train.py's shared loop drives (its train step is unclip_jax.training's).

Conditioning is a dict of CLIP text outputs, each with a leading batch axis:
  {"z_t": [B, D], "tokens": [B, T, W], "mask": [B, T] bool}
and the unconditional text (CLIP's encoding of the empty prompt) has the same
keys with a batch of 1. A training batch adds "z_i": [B, D], the CLIP image
embedding. Latents are normalised with the prior's stats (clip_mean,
clip_std), which are kept outside the params and never trained.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import checkpoints
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


class PriorStage:
  """Trains the prior on (caption, image) pairs encoded by a frozen CLIP, or on
  precomputed embeddings (data kind "embeddings")."""

  def __init__(self, config: ml_collections.ConfigDict, clip, first_batches):
    """first_batches: encoded batches from the stream's start, for clip_mean / clip_std."""
    self.config = config
    self.clip = clip
    # The CLIP fixes the latent and token shapes; the config sets the Transformer's size.
    self.model_config = prior_lib.PriorConfig(clip_dim=clip.embed_dim, text_width=clip.text_width,
                                              num_text_tokens=clip.max_length, **config.model.to_dict())
    self.model = prior_lib.DiffusionPrior(self.model_config, jnp.dtype(config.get("compute_dtype", "float32")))
    self.schedule = schedules.make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    self.uncond = {k: np.asarray(v) for k, v in text_conditioning(clip.encode_text([""])).items()}
    z_i = np.concatenate([b["z_i"] for b in first_batches])
    self.stats = latent_stats(z_i)
    self._loss = functools.partial(prior_loss, model=self.model, stats=self.stats, schedule=self.schedule,
                                   uncond=self.uncond, p_uncond=config.get("p_uncond", 0.1))

  def init_params(self, rng):
    return prior_lib.init_variables(self.model_config, rng)["params"]

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng)

  def encode_batch(self, host_batch):
    return encode_for_prior(self.clip, host_batch)

  def sample_images(self, params, rng):
    return None  # the prior makes embeddings; the decoder's grids show them

  def inference_config(self):
    return {"stage": "prior", "model": dataclasses.asdict(self.model_config),
            "diffusion": self.config.diffusion.to_dict()}

  def export(self, params, export_dir: str):
    checkpoints.export_inference(export_dir, {"params": params, "stats": self.stats}, self.inference_config())


def encode_for_prior(clip, host_batch) -> dict:
  """Host batch -> {z_t, tokens, mask, z_i}; batches of precomputed embeddings (data/embeddings.py)
  pass through, their float16 tokens [B, L, W] made float32 as CLIP's own are."""
  if "z_i" in host_batch:
    return {"z_t": np.asarray(host_batch["z_t"], np.float32), "tokens": np.asarray(host_batch["tokens"], np.float32),
            "mask": np.asarray(host_batch["mask"], bool), "z_i": np.asarray(host_batch["z_i"], np.float32)}
  text = clip.encode_text(list(host_batch["caption"]))
  return {"z_t": np.asarray(text.embedding), "tokens": np.asarray(text.tokens), "mask": np.asarray(text.mask),
          "z_i": np.asarray(clip.encode_image(host_batch["image"], value_range=(0, 255)))}
