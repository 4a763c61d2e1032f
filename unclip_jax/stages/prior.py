"""The prior stage: x0-MSE loss with classifier-free-guidance dropout, guided,
respaced sampling with best-of-n selection, and the `PriorStage` that
train.py's shared loop drives (its train step is unclip_jax.training's).

Conditioning is the text dict of stages/text.py ({"z_t", "tokens", "mask"},
the unconditional text with a batch of 1); a training batch adds "z_i": [B, D],
the CLIP image embedding. Latents are normalised with the prior's stats
(clip_mean, clip_std), which are kept outside the params and never trained.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax import checkpoints
from unclip_jax.diffusion import gaussian, losses, samplers, schedules
from unclip_jax.models import prior as prior_lib
from unclip_jax.stages import contract, text


def latent_stats(z_i) -> dict:
  """clip_mean / clip_std of a sample of CLIP image embeddings [N, D], per dimension."""
  z_i = np.asarray(z_i, np.float64)
  return {"clip_mean": jnp.asarray(z_i.mean(0), jnp.float32),
          "clip_std": jnp.asarray(np.maximum(z_i.std(0), 1e-6), jnp.float32)}


def prior_loss(params, batch: dict, rng, *, model: prior_lib.DiffusionPrior, stats: dict,
               schedule: schedules.Schedule, uncond: dict, p_uncond: float = 0.1, prediction_type: str = "x0",
               min_snr_gamma: float | None = None):
  """Mean over the batch of ||pred - target||^2 (per-dimension mean) in the space of x0 = normalised z_i:
  the target is x0 itself (the paper's choice), or eps or v.

  Signature (after partial) is the shared `loss_fn(params, batch, rng)`.
  """
  text.check(batch, "batch")
  text.check(uncond, "uncond")
  variables = {"params": params, "stats": stats}
  t_rng, noise_rng, drop_rng, dropout_rng = jax.random.split(rng, 4)
  x0 = prior_lib.normalize(variables, batch["z_i"].astype(jnp.float32))  # [B, D]
  i = jax.random.randint(t_rng, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(noise_rng, x0.shape, x0.dtype)
  x_t = gaussian.q_sample(schedule, x0, i, noise)
  cond, dropped = text.drop(drop_rng, batch, uncond, p_uncond)
  pred = model.apply(variables, x_t, schedule.timesteps[i], cond["z_t"], cond["tokens"], cond["mask"],
                     deterministic=False, rngs={"dropout": dropout_rng})
  per_example, _ = losses.diffusion_loss(schedule, pred, x0, x_t, i, noise, prediction_type=prediction_type,
                                         min_snr_gamma=min_snr_gamma)
  loss = per_example.mean()
  return loss, {"loss": loss, "uncond_fraction": dropped.mean()}


def sample_prior(model: prior_lib.DiffusionPrior, variables, cond: dict, uncond: dict, rng, *,
                 num_steps: int = 25, sampler: str = "ddpm", eta: float = 0.0, guidance_scale: float = 4.0,
                 clip_range: float | None = 5.0, num_candidates: int = 2, noise_schedule: str = "cosine",
                 num_train_timesteps: int = 1000, spacing: str = "linspace", prediction_type: str = "x0",
                 variance_type: str = "fixed_small",
                 x_T=None, step_noise=None, part: samplers.Part | None = None):
  """CLIP image embeddings z_i [B, D] for text conditioning `cond` (batch B).

  Runs the respaced chain (Karlo: 25 DDPM steps, guidance 4, x0 clamped to
  +-5 in normalised space, fixed-small variance; the paper: 64 steps) for
  num_candidates draws per prompt and keeps the draw whose z_i has the largest
  dot product with z_t (the paper uses 2). x_T [B * n, D] and step_noise
  [K, B * n, D] (prompt-major: prompt b's draws at rows b*n .. b*n+n-1) fix the
  noise for comparisons. Call under jax.jit with the static arguments bound.
  With a `part` (samplers.Part): (loop state, z_i) after the part's steps.
  """
  text.check(cond, "cond")
  text.check(uncond, "uncond")
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
  batch, dim = cond["z_t"].shape
  rows = batch * num_candidates
  cond_n = {k: jnp.repeat(cond[k], num_candidates, axis=0) for k in text.KEYS}  # [B * n, ...]
  schedule = schedules.make_schedule(noise_schedule, num_train_timesteps, num_steps, spacing)

  def model_fn(x, t, c):
    return model.apply(variables, x, t, c["z_t"], c["tokens"], c["mask"])

  if guidance_scale is None or guidance_scale == 1.0:
    guided = functools.partial(model_fn, c=cond_n)
  else:
    uncond = text.broadcast_uncond(uncond, cond)
    uncond_n = {k: jnp.repeat(uncond[k], num_candidates, axis=0) for k in text.KEYS}
    guided = samplers.classifier_free_guidance(model_fn, cond_n, uncond_n, guidance_scale)
  if x_T is not None and x_T.shape != (rows, dim):
    raise ValueError(f"x_T must be [B * num_candidates, D] = {(rows, dim)}, got {x_T.shape}.")

  def best_of_candidates(x0):  # [B * n, D] -> z_i [B, D]
    z_i = prior_lib.denormalize(variables, x0).reshape(batch, num_candidates, dim)
    scores = jnp.einsum("bnd,bd->bn", z_i, cond["z_t"].astype(z_i.dtype))
    best = jnp.argmax(scores, axis=1)
    return jnp.take_along_axis(z_i, best[:, None, None], axis=1)[:, 0]

  return samplers.sample(guided, schedule, rng, x_T, shape=(rows, dim), sampler=sampler, eta=eta,
                         prediction_type=prediction_type, variance_type=variance_type, clip_range=clip_range,
                         step_noise=step_noise, finish=best_of_candidates, part=part)


def sampler_from_export(export: contract.PriorExport, options: contract.StageOptions, *, num_candidates: int = 2):
  """sample(variables, cond, uncond, rng, part=None) -> z_i [B, D]: the exported prior sampled as `options` say
  (its dynamic_threshold is for images and not used), best of num_candidates. Jit it."""
  d = export.diffusion
  return functools.partial(
      sample_prior, prior_lib.DiffusionPrior(export.model, jnp.dtype(export.dtype)), num_steps=options.num_steps,
      sampler=options.sampler, eta=options.eta, guidance_scale=options.guidance_scale, clip_range=options.clip_range,
      num_candidates=num_candidates, noise_schedule=d.schedule, num_train_timesteps=d.num_timesteps,
      spacing=options.spacing, prediction_type=d.prediction_type, variance_type=d.variance_type)


def sampling_options(config) -> contract.StageOptions:
  """How a training config samples its prior (the AOT tool's sampling loop): its sample_steps,
  sampler, sample_spacing, guidance_scale and clip_range, or the paper's."""
  return contract.StageOptions(config.get("sample_steps", 64), config.get("sampler", "ddpm"),
                               guidance_scale=config.get("guidance_scale", 4.0),
                               clip_range=config.get("clip_range", 5.0),
                               spacing=config.get("sample_spacing", "linspace"))


class PriorStageBase:
  """What both priors' stages share: CLIP-encoded batches, no image grids, an export of the params with
  the data statistics sampling_variables adds (subclasses set clip, export_config)."""

  def encode_batch(self, host_batch):
    return text.encode_batch(self.clip, host_batch)

  def sample_images(self, params, rng):
    return None  # the prior makes embeddings; the decoder's grids show them

  def inference_config(self):
    return self.export_config.to_json()

  def sampling_variables(self, params) -> dict:
    raise NotImplementedError

  def export(self, params, export_dir: str):
    checkpoints.export_inference(export_dir, self.sampling_variables(params), self.inference_config())


class PriorStage(PriorStageBase):
  """Trains the prior on (caption, image) pairs encoded by a frozen CLIP, or on
  precomputed embeddings (data kind "embeddings")."""

  def __init__(self, config: ml_collections.ConfigDict, clip, first_batches):
    """first_batches: encoded batches from the stream's start, for clip_mean / clip_std."""
    self.config = config
    self.clip = clip
    # The CLIP fixes the latent and token shapes; the config sets the Transformer's size.
    self.export_config = contract.PriorExport(
        prior_lib.PriorConfig(clip_dim=clip.embed_dim, text_width=clip.text_width, num_text_tokens=clip.max_length,
                              **config.model.to_dict()),
        contract.Diffusion.from_config(config.diffusion, prediction_type="x0"))
    self.model_config = self.export_config.model
    self.model = prior_lib.DiffusionPrior(self.model_config, jnp.dtype(config.get("compute_dtype", "float32")))
    self.schedule = self.export_config.diffusion.make_schedule()
    self.sampling = sampling_options(config)
    self.uncond = text.unconditional(clip)
    z_i = np.concatenate([b["z_i"] for b in first_batches])
    self.stats = latent_stats(z_i)
    self._loss = functools.partial(prior_loss, model=self.model, schedule=self.schedule,
                                   uncond=self.uncond, p_uncond=config.get("p_uncond", 0.1),
                                   prediction_type=self.export_config.diffusion.prediction_type,
                                   min_snr_gamma=config.get("min_snr_gamma") or None)

  def init_params(self, rng):
    return prior_lib.init_variables(self.model_config, rng)["params"]

  def adopt_stats(self, stats: dict):
    """Normalise with these latent stats (clip_mean, clip_std) from now on, in the loss and the export:
    a prior fine-tuned from an export keeps the latent space its network learned (init_from.py)."""
    self.stats = jax.tree.map(jnp.asarray, stats)

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng, stats=self.stats)

  def sampling_variables(self, params) -> dict:
    """What the sampler reads: the network's params and the latent stats."""
    return {"params": params, "stats": self.stats}
