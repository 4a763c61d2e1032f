"""The autoregressive prior stage: cross-entropy over the codes of z_i with
classifier-free-guidance dropout, guided sampling code by code (one compiled
loop with a key/value cache), and the `ARPriorStage` that train.py's shared
loop drives.

Conditioning is the text dict of stages/text.py, as for the diffusion prior; a
training batch adds "z_i". The codebook (models/ar_prior.py: PCA, buckets and
the dot-product token's quantiles) is fitted on the stream's first batches and
kept beside the params, as the diffusion prior keeps its latent stats.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unclip_jax.diffusion import samplers
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.stages import contract, prior, text


def ar_prior_loss(params, batch: dict, rng, *, model: ar_lib.ARPrior, codebook: dict, uncond: dict,
                  p_uncond: float = 0.1):
  """Mean cross-entropy (nats per code) of the codes of batch["z_i"] given the caption, z_t and the pair's
  dot-product token; a dropped caption (probability p_uncond) also drops the dot-product token (to
  its "none" index). Signature (after partial) is the shared `loss_fn(params, batch, rng)`."""
  text.check(batch, "batch")
  cfg = model.config
  drop_rng, dropout_rng = jax.random.split(rng)
  z_i = batch["z_i"].astype(jnp.float32)
  codes = ar_lib.to_codes(codebook, z_i, cfg)  # [B, K]
  dot = ar_lib.dot_bucket(codebook, batch["z_t"], z_i)  # [B]
  cond, dropped = text.drop(drop_rng, batch, uncond, p_uncond)
  dot = jnp.where(dropped, cfg.num_dot_buckets, dot)
  logits = model.apply({"params": params, "codebook": codebook}, cond["tokens"], cond["mask"], cond["z_t"], dot,
                       codes, deterministic=False, rngs={"dropout": dropout_rng})  # [B, K, buckets]
  per_code = optax.softmax_cross_entropy_with_integer_labels(logits, codes)  # [B, K]
  loss = per_code.mean()
  accuracy = jnp.mean(jnp.argmax(logits, -1) == codes)
  return loss, {"loss": loss, "code_accuracy": accuracy, "uncond_fraction": dropped.mean()}


def row_keys(rng, rows: int):
  """One key per row: rng itself if it is [rows] keys (each row's draws its own), else rng split."""
  if rng.ndim == 1:
    if rng.shape[0] != rows:
      raise ValueError(f"{rng.shape[0]} keys for {rows} rows (B * num_candidates).")
    return rng
  return jax.random.split(rng, rows)


def sample_ar_prior(model: ar_lib.ARPrior, variables, cond: dict, uncond: dict, rng, *, guidance_scale: float = 2.0,
                    num_candidates: int = 2, temperature: float = 1.0, dot=None, part: samplers.Part | None = None):
  """CLIP image embeddings z_i [B, D] for text conditioning `cond` (batch B), code by code.

  Each of the B * num_candidates rows (prompt-major; rng: one key, or one
  per row) conditions on a dot-product token drawn from the top half of its
  quantiles (the paper's choice; or `dot` [B * n]) and samples every code
  from softmax(logits / temperature), the logits guided as
  uncond + s * (cond - uncond) (the unconditional run has no caption and the
  "none" dot token). The draw whose z_i has the largest dot product with z_t
  is kept, as for the diffusion prior. `model` must have cache_length =
  config.seq_len. Call under jax.jit; with a `part`: (loop state, z_i).
  """
  text.check(cond, "cond")
  text.check(uncond, "uncond")
  cfg = model.config
  if model.cache_length != cfg.seq_len:
    raise ValueError(f"The sampling model needs cache_length {cfg.seq_len}, got {model.cache_length}.")
  if num_candidates < 1:
    raise ValueError(f"num_candidates must be >= 1, got {num_candidates}.")
  batch = cond["z_t"].shape[0]
  rows = batch * num_candidates
  keys = row_keys(rng, rows)
  dot_keys = jax.vmap(lambda k: jax.random.fold_in(k, cfg.num_codes))(keys)  # a stream no code's draw uses
  if dot is None:
    dot = jax.vmap(lambda k: jax.random.randint(k, (), cfg.num_dot_buckets // 2, cfg.num_dot_buckets))(dot_keys)
  text_n = {k: jnp.repeat(cond[k], num_candidates, axis=0) for k in text.KEYS}  # [rows, ...]
  guided = guidance_scale is not None and guidance_scale != 1.0
  if guided:  # one run over [cond rows; uncond rows]
    uncond_n = text.broadcast_uncond(uncond, text_n)
    text_n = {k: jnp.concatenate([text_n[k], uncond_n[k]]) for k in text.KEYS}
    dot = jnp.concatenate([dot, jnp.full((rows,), cfg.num_dot_buckets, jnp.int32)])
  key_valid = ar_lib.valid_keys(text_n["mask"], cfg)
  params = {"params": variables["params"], "codebook": variables["codebook"]}

  def pick(logits, k):  # logits [rows (x 2)] -> code k of each row [rows]
    if guided:
      logits = logits[rows:] + guidance_scale * (logits[:rows] - logits[rows:])
    draw = lambda key, row: jax.random.categorical(jax.random.fold_in(key, k), row / temperature)
    return jax.vmap(draw)(keys, logits).astype(jnp.int32)

  def feed(code):
    return jnp.concatenate([code, code]) if guided else code

  def start():
    logits, cache = model.apply(params, text_n["tokens"], text_n["mask"], text_n["z_t"], dot, method="prefill",
                                mutable=["cache"])
    return cache["cache"], logits, jnp.zeros((rows, cfg.num_codes), jnp.int32)

  def body(state, k):  # picks code k, feeds it, keeps the logits of code k + 1
    cache, logits, codes = state
    code = pick(logits, k)
    logits, cache = model.apply(dict(params, cache=cache), feed(code), cfg.prefix_len + k, key_valid,
                                method="step", mutable=["cache"])
    return (cache["cache"], logits, codes.at[:, k].set(code)), None

  def finish(state):  # the last code, then z_i and the best of the candidates
    _, logits, codes = state
    codes = codes.at[:, -1].set(pick(logits, cfg.num_codes - 1))
    z_i = ar_lib.from_codes(variables["codebook"], codes, cfg).reshape(batch, num_candidates, -1)
    scores = jnp.einsum("bnd,bd->bn", z_i, cond["z_t"].astype(z_i.dtype))
    return jnp.take_along_axis(z_i, jnp.argmax(scores, axis=1)[:, None, None], axis=1)[:, 0]

  return samplers.run_steps(body, start, cfg.num_codes - 1, finish, part)


def sampling_model(export: contract.ARPriorExport) -> ar_lib.ARPrior:
  """The exported network with a key/value cache for the whole sequence (remat off: no gradients)."""
  config = dataclasses.replace(export.model, remat=False)
  return ar_lib.ARPrior(config, jnp.dtype(export.dtype), cache_length=config.seq_len)


def sampler_from_export(export: contract.ARPriorExport, options: contract.StageOptions, *, num_candidates: int = 2):
  """sample(variables, cond, uncond, rng, part=None) -> z_i [B, D]: the exported AR prior at options'
  guidance_scale (its other fields are the diffusion samplers'), best of num_candidates. Jit it.
  Its chain has num_codes - 1 steps (the pipeline's progress bar counts them)."""
  return functools.partial(sample_ar_prior, sampling_model(export), guidance_scale=options.guidance_scale,
                           num_candidates=num_candidates)


class ARPriorStage(prior.PriorStageBase):
  """Trains the AR prior on (caption, image) pairs encoded by a frozen CLIP, or on precomputed
  embeddings (data kind "embeddings")."""

  def __init__(self, config: ml_collections.ConfigDict, clip, first_batches):
    """first_batches: encoded batches from the stream's start, for the codebook (its PCA needs more
    embeddings than it keeps dimensions; to fit all of CLIP's well, many more)."""
    self.config = config
    self.clip = clip
    self.export_config = contract.ARPriorExport(ar_lib.ARPriorConfig(
        clip_dim=clip.embed_dim, text_width=clip.text_width, num_text_tokens=clip.max_length,
        **config.model.to_dict()))
    self.model_config = self.export_config.model
    self.model = ar_lib.ARPrior(self.model_config, jnp.dtype(config.get("compute_dtype", "float32")))
    self.uncond = text.unconditional(clip)
    # How the AOT tool's sampling loop runs it (sample.py: the checkpoint's options): its guidance.
    self.sampling = contract.StageOptions(self.model_config.num_codes - 1,
                                          guidance_scale=config.get("guidance_scale", 2.0))
    z_i = np.concatenate([b["z_i"] for b in first_batches])
    z_t = np.concatenate([b["z_t"] for b in first_batches])
    if len(z_i) <= self.model_config.num_codes:
      raise ValueError(f"The AR prior's codebook needs more than num_codes = {self.model_config.num_codes} "
                       f"embeddings for its PCA, got {len(z_i)}: raise config.stats_batches.")
    self.codebook = ar_lib.fit_codebook(self.model_config, z_i, z_t)
    self._loss = functools.partial(ar_prior_loss, model=self.model, uncond=self.uncond,
                                   p_uncond=config.get("p_uncond", 0.1))

  def init_params(self, rng):
    return ar_lib.init_variables(self.model_config, rng)["params"]

  def adopt_stats(self, codebook: dict):
    """Code with this codebook from now on, in the loss and the export: an AR prior fine-tuned from an
    export keeps the codes its network learned (init_from.py)."""
    self.codebook = jax.tree.map(jnp.asarray, codebook)

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng, codebook=self.codebook)

  def sampling_variables(self, params) -> dict:
    """What the sampler reads: the network's params and the codebook."""
    return {"params": params, "codebook": self.codebook}
