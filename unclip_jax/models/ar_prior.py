"""The autoregressive prior (the paper's other prior): CLIP image embeddings as
sequences of discrete codes, predicted one by one by a causal Transformer.

The codebook (a "codebook" collection beside the params, fitted on training
embeddings and never trained):
  z_i [D] -> PCA to the top K directions (the paper: 319 of 1,024), each
  coordinate in units of its own standard deviation, quantised uniformly over
  [-code_range, code_range] into num_buckets (1,024) buckets -> codes [K] int.
  Codes back to z_i: bucket centres, through the PCA.
The dot-product token: cos(z_t, z_i) quantised at quantiles of the training
set (num_dot_buckets, equally likely), so "the top half of the distribution"
that sampling conditions on is the upper half of the buckets; one more index
(num_dot_buckets) stands for "no caption" (classifier-free guidance).

The network's sequence is
  [text token encodings (T), z_t, dot-product token, codes 0 .. K-2]
(learned positional embedding, causal attention that also masks padded text
tokens), and the outputs from the dot-product token on predict codes 0 .. K-1.
Its Transformer blocks are the diffusion prior's (models/prior.py).
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import parallel
from unclip_jax.models.prior import MASK_VALUE, TransformerBlocks


@dataclasses.dataclass(frozen=True)
class ARPriorConfig:
  """Architecture and codebook size of the autoregressive prior. Defaults: the paper's codes
  (319 PCA dimensions of ViT-L/14's 768 here, 1,024 buckets) on a 1B-parameter Transformer."""
  clip_dim: int = 768  # z_i and z_t
  text_width: int | None = None  # width of CLIP's token encodings; None = clip_dim
  num_text_tokens: int = 77
  num_codes: int = 319  # PCA dimensions kept: the sequence's codes
  num_buckets: int = 1024  # per code
  num_dot_buckets: int = 64  # quantiles of cos(z_t, z_i)
  code_range: float = 4.0  # the buckets span +- this many standard deviations of each PCA coordinate
  width: int = 2048
  num_layers: int = 20
  num_heads: int = 32
  mlp_ratio: int = 4
  dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  scan_layers: bool = False  # see PriorConfig
  remat: bool = False

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")
    if not 1 <= self.num_codes <= self.clip_dim:
      raise ValueError(f"num_codes {self.num_codes} must be between 1 and clip_dim {self.clip_dim} (PCA "
                       "keeps at most every dimension).")

  @property
  def prefix_len(self) -> int:
    """Text tokens, z_t and the dot-product token."""
    return self.num_text_tokens + 2

  @property
  def seq_len(self) -> int:
    """The prefix and every code but the last (which is only predicted)."""
    return self.prefix_len + self.num_codes - 1


def paper_config() -> ARPriorConfig:
  """The paper's AR prior (1B parameters, Table 3) on ViT-L/14 latents, scanned."""
  return ARPriorConfig(num_layers=20, scan_layers=True)


def attention_bias(key_valid, start, num_queries: int):
  """Additive bias [B, 1, S, K] for queries at positions start .. start + S - 1 over keys 0 .. K - 1:
  causal, and keys that are not valid (padded text tokens) masked. key_valid [B, K] bool."""
  keys = jnp.arange(key_valid.shape[1])
  queries = start + jnp.arange(num_queries)
  visible = key_valid[:, None, :] & (keys[None, None, :] <= queries[None, :, None])  # [B, S, K]
  return jnp.where(visible, 0.0, MASK_VALUE)[:, None].astype(jnp.float32)


class ARPrior(nn.Module):
  """Logits over each code's buckets, given the caption and the codes before it.

  __call__ (training, teacher forcing): tokens [B, T, W], mask [B, T], z_t
  [B, D], dot [B] int, codes [B, K] int -> logits [B, K, num_buckets].
  Sampling (cache_length = seq_len, mutable "cache"): `prefill` runs the
  prefix and returns code 0's logits [B, num_buckets]; each `step(code [B])`
  feeds the next code and returns the logits of the one after it.
  """
  config: ARPriorConfig
  dtype: jnp.dtype = jnp.float32
  cache_length: int = 0

  def setup(self):
    cfg = self.config
    self.text_proj = nn.Dense(cfg.width, dtype=self.dtype)
    self.embedding_proj = nn.Dense(cfg.width, dtype=self.dtype)
    self.dot_embedding = nn.Embed(cfg.num_dot_buckets + 1, cfg.width, dtype=self.dtype)
    self.code_embedding = nn.Embed(cfg.num_buckets, cfg.width, dtype=self.dtype)
    self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.02),
                                           (1, cfg.seq_len, cfg.width))
    self.transformer = TransformerBlocks(cfg, self.dtype, self.cache_length)
    self.norm_out = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype)
    self.to_logits = nn.Dense(cfg.num_buckets, dtype=self.dtype)
    for name, shape in codebook_shapes(cfg).items():  # read by the functions below, never trained
      self.variable("codebook", name, jnp.zeros, shape)

  def _prefix(self, tokens, mask, z_t, dot):
    cfg = self.config
    b = z_t.shape[0]
    if z_t.shape != (b, cfg.clip_dim) or dot.shape != (b,):
      raise ValueError(f"z_t must be [B, {cfg.clip_dim}] and dot [B], got {z_t.shape} and {dot.shape}.")
    if tokens.shape != (b, cfg.num_text_tokens, cfg.text_width or cfg.clip_dim) or mask.shape != tokens.shape[:2]:
      raise ValueError(f"tokens must be [B, {cfg.num_text_tokens}, {cfg.text_width or cfg.clip_dim}] and mask "
                       f"[B, {cfg.num_text_tokens}], got {tokens.shape} and {mask.shape}.")
    h = jnp.concatenate([self.text_proj(tokens), self.embedding_proj(z_t)[:, None],
                         self.dot_embedding(dot)[:, None]], axis=1)  # [B, T + 2, W]
    return h, valid_keys(mask, cfg)

  def _run(self, h, key_valid, start, deterministic: bool):
    """Transformer over h [B, S, W] at positions start .. start + S - 1 -> logits [B, S, num_buckets]."""
    pos = jax.lax.dynamic_slice_in_dim(self.positional_embedding, start, h.shape[1], axis=1)
    h = parallel.constrain_batch(h + pos.astype(self.dtype))
    bias = attention_bias(key_valid, start, h.shape[1])
    h = self.transformer(h, bias, deterministic)
    return self.to_logits(self.norm_out(h)).astype(jnp.float32)

  def __call__(self, tokens, mask, z_t, dot, codes, deterministic: bool = True):
    cfg = self.config
    if codes.shape != (z_t.shape[0], cfg.num_codes):
      raise ValueError(f"codes must be [B, {cfg.num_codes}], got {codes.shape}.")
    prefix, key_valid = self._prefix(tokens, mask, z_t, dot)
    h = jnp.concatenate([prefix, self.code_embedding(codes[:, :-1])], axis=1)  # [B, seq_len, W]
    return self._run(h, key_valid, 0, deterministic)[:, cfg.prefix_len - 1:]  # [B, K, num_buckets]

  def prefill(self, tokens, mask, z_t, dot):
    """Runs the prefix into the cache -> code 0's logits [B, num_buckets]."""
    prefix, key_valid = self._prefix(tokens, mask, z_t, dot)
    return self._run(prefix, key_valid, 0, True)[:, -1]

  def step(self, code, position, key_valid):
    """Feeds code [B] at `position` (prefix_len + its index; the cache holds every position before it)
    -> the next code's logits [B, num_buckets]. key_valid: valid_keys of the prefill's mask."""
    return self._run(self.code_embedding(code)[:, None], key_valid, position, True)[:, 0]


def valid_keys(mask, config: ARPriorConfig):
  """Which of the sequence's positions attention may read [B, seq_len]: the text's unpadded tokens
  (mask [B, T]) and every later position (the causal bias hides those not reached yet)."""
  rest = jnp.ones((mask.shape[0], config.seq_len - mask.shape[1]), bool)
  return jnp.concatenate([jnp.asarray(mask, bool), rest], axis=1)


def codebook_shapes(config: ARPriorConfig) -> dict:
  return {"mean": (config.clip_dim,), "components": (config.num_codes, config.clip_dim),
          "scale": (config.num_codes,), "dot_edges": (config.num_dot_buckets - 1,)}


def init_variables(config: ARPriorConfig, rng, dtype=jnp.float32):
  """Random params and an empty codebook (fit_codebook makes the real one) for an AR prior."""
  model = ARPrior(config, dtype)
  text_width = config.text_width or config.clip_dim
  init = jax.jit(lambda r: model.init(
      r, jnp.zeros((1, config.num_text_tokens, text_width)), jnp.ones((1, config.num_text_tokens), bool),
      jnp.zeros((1, config.clip_dim)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, config.num_codes), jnp.int32)))
  return init(rng)


# -- the codebook: z_i <-> codes, z_t . z_i <-> dot-product token ---------------------------------------


def cosine(z_t, z_i):
  """cos(z_t, z_i) per row of [N, D] arrays."""
  unit = lambda z: z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
  return jnp.sum(unit(jnp.asarray(z_t, jnp.float32)) * unit(jnp.asarray(z_i, jnp.float32)), axis=-1)


def fit_codebook(config: ARPriorConfig, z_i, z_t) -> dict:
  """The codebook of training embeddings z_i, z_t [N, D]: PCA of z_i (mean [D], components [K, D]
  in order of decreasing variance, scale [K] their standard deviations) and the dot-product
  token's bucket edges [num_dot_buckets - 1] at quantiles of cos(z_t, z_i)."""
  z_i = np.asarray(z_i, np.float64)
  if len(z_i) < 2:
    raise ValueError(f"The codebook needs at least 2 embeddings, got {len(z_i)}.")
  mean = z_i.mean(0)
  variance, directions = np.linalg.eigh(np.cov(z_i - mean, rowvar=False))  # ascending
  order = np.argsort(variance)[::-1][:config.num_codes]
  components = directions[:, order].T  # [K, D]
  # Each direction's sign fixed (largest entry positive): the same data always gives the same codes.
  components *= np.sign(components[np.arange(len(order)), np.abs(components).argmax(1)])[:, None]
  scale = np.sqrt(np.maximum(variance[order], 1e-12))
  cos = np.asarray(cosine(z_t, z_i), np.float64)
  edges = np.quantile(cos, np.arange(1, config.num_dot_buckets) / config.num_dot_buckets)
  return {"mean": jnp.asarray(mean, jnp.float32), "components": jnp.asarray(components, jnp.float32),
          "scale": jnp.asarray(scale, jnp.float32), "dot_edges": jnp.asarray(edges, jnp.float32)}


def to_codes(codebook: dict, z_i, config: ARPriorConfig):
  """z_i [N, D] -> codes [N, K] int32."""
  y = (jnp.asarray(z_i, jnp.float32) - codebook["mean"]) @ codebook["components"].T / codebook["scale"]
  r, n = config.code_range, config.num_buckets
  return jnp.clip(jnp.floor((y + r) / (2 * r) * n), 0, n - 1).astype(jnp.int32)


def from_codes(codebook: dict, codes, config: ARPriorConfig):
  """codes [N, K] -> z_i [N, D]: each bucket's centre, back through the PCA."""
  r, n = config.code_range, config.num_buckets
  y = (codes.astype(jnp.float32) + 0.5) / n * (2 * r) - r
  return codebook["mean"] + (y * codebook["scale"]) @ codebook["components"]


def dot_bucket(codebook: dict, z_t, z_i):
  """The dot-product token [N] of each (z_t, z_i) pair: the quantile bucket of their cosine."""
  return jnp.searchsorted(codebook["dot_edges"], cosine(z_t, z_i)).astype(jnp.int32)
