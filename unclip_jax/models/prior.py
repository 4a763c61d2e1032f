"""The diffusion prior: a decoder-only causal Transformer that predicts the
unnoised, normalised CLIP image embedding x_0 from a noised one.

The token sequence is the paper's (and Karlo's / diffusers' PriorTransformer's)
  [text token encodings (77), z_t, timestep embedding, noised z_i, final query],
each token projected to `width`, plus a learned positional embedding. Attention
is causal and additionally masks padded text tokens; the output at the final
("prd") query, after a last LayerNorm, is projected back to the CLIP dimension.

The latent lives in a normalised space x = (z_i - clip_mean) / clip_std. The
two statistics are variables of a separate "stats" collection: they are data
statistics (Karlo ships them with its weights), never trained.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from unclip_jax import parallel
from unclip_jax.models.layers import TimestepMLP, timestep_embedding

# diffusers' additive mask value; kept (not -inf) so that our logits match its.
MASK_VALUE = -10000.0


@dataclasses.dataclass(frozen=True)
class PriorConfig:
  """Architecture of the prior. Defaults are Karlo's released 1B prior."""
  clip_dim: int = 768  # z_i, z_t and the prediction
  text_width: int | None = None  # width of CLIP's token encodings; None = clip_dim (ViT-L/14: 768)
  num_text_tokens: int = 77
  width: int = 2048
  num_layers: int = 20
  num_heads: int = 32
  time_embed_dim: int | None = None  # hidden width of the timestep MLP; None = width
  prd_token: bool = True  # the learned final query whose output is the prediction
  norm_in: bool = False  # LayerNorm on the tokens before the first block
  embedding_proj_norm: bool = False  # LayerNorm on z_t before its projection
  mlp_ratio: int = 4
  dropout: float = 0.0
  layer_norm_eps: float = 1e-5
  scan_layers: bool = False  # one nn.scan over the blocks (params "blocks/..." stacked [num_layers, ...])
  remat: bool = False  # recompute each block's activations in the backward pass (memory for FLOPs)

  def __post_init__(self):
    if self.width % self.num_heads:
      raise ValueError(f"width {self.width} is not divisible by num_heads {self.num_heads}.")

  @property
  def num_extra_tokens(self) -> int:
    """z_t, timestep, noised z_i and (optionally) the final query: diffusers' additional_embeddings."""
    return 3 + int(self.prd_token)

  @property
  def seq_len(self) -> int:
    return self.num_text_tokens + self.num_extra_tokens


def karlo_config() -> PriorConfig:
  """Karlo v1 alpha: width 2048, 20 layers, 32 heads, ViT-L/14 latents."""
  return PriorConfig()


def paper_config() -> PriorConfig:
  """The paper's 1B diffusion prior: width 2048, 24 layers, scanned (see scan_layers)."""
  return PriorConfig(num_layers=24, scan_layers=True)


def attention_bias(mask, num_extra_tokens: int):
  """Additive bias [B, 1, L, L]: causal, plus padded text keys masked (as diffusers)."""
  pad = (1.0 - mask.astype(jnp.float32)) * MASK_VALUE  # [B, T]
  pad = jnp.pad(pad, ((0, 0), (0, num_extra_tokens)))  # [B, L]
  length = pad.shape[-1]
  causal = jnp.triu(jnp.full((length, length), MASK_VALUE, jnp.float32), k=1)  # [L, L]
  return (pad[:, None, :] + causal[None])[:, None]  # [B, 1, L, L]


class SelfAttention(nn.Module):
  """Multi-head self-attention with biased q/k/v/out projections.

  cache_length > 0 keeps every position's keys and values in a "cache"
  collection ([B, cache_length, H, Dh], written at its "index"), so that a
  sequence can be run a few positions per call (the autoregressive prior's
  sampling); bias [B, 1, S, K] then covers the cache's keys. 0: none.
  """
  num_heads: int
  dtype: jnp.dtype = jnp.float32
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, bias):
    b, length, width = x.shape
    head_dim = width // self.num_heads
    dense = lambda name: nn.Dense(width, dtype=self.dtype, name=name)
    split = lambda h: h.reshape(b, length, self.num_heads, head_dim)  # [B, S, H, Dh]
    q, k, v = split(dense("to_q")(x)), split(dense("to_k")(x)), split(dense("to_v")(x))
    if self.cache_length:
      shape = (b, self.cache_length, self.num_heads, head_dim)
      cached_k = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
      cached_v = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      start = (0, index.value, 0, 0)
      cached_k.value = jax.lax.dynamic_update_slice(cached_k.value, k.astype(cached_k.value.dtype), start)
      cached_v.value = jax.lax.dynamic_update_slice(cached_v.value, v.astype(cached_v.value.dtype), start)
      index.value = index.value + length
      k, v = cached_k.value, cached_v.value  # [B, K, H, Dh]: every position so far (later ones masked by bias)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * head_dim ** -0.5
    weights = jax.nn.softmax(logits + bias, axis=-1).astype(self.dtype)  # [B, H, L, L]
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, length, width)
    return dense("to_out")(out)


class Block(nn.Module):
  """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with exact GELU.

  With scanned=True it is an nn.scan step: returns (x, None). cache_length: see SelfAttention.
  """
  config: PriorConfig
  dtype: jnp.dtype = jnp.float32
  scanned: bool = False
  cache_length: int = 0

  @nn.compact
  def __call__(self, x, bias, deterministic: bool = True):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    drop = nn.Dropout(cfg.dropout, deterministic=deterministic)
    x = x + drop(SelfAttention(cfg.num_heads, self.dtype, self.cache_length, name="attn1")(norm("norm1")(x), bias))
    h = nn.Dense(cfg.mlp_ratio * cfg.width, dtype=self.dtype, name="ff_in")(norm("norm3")(x))
    h = drop(nn.gelu(h, approximate=False))
    x = parallel.constrain_batch(x + drop(nn.Dense(cfg.width, dtype=self.dtype, name="ff_out")(h)))
    return (x, None) if self.scanned else x


def transformer_blocks(cfg, dtype, h, bias, deterministic: bool, cache_length: int = 0):
  """cfg.num_layers Blocks over h [B, S, W], as submodules of the calling (compact) module: "blocks"
  (scanned, params stacked [num_layers, ...]) or "block_0" ... (cfg: a config with PriorConfig's
  Transformer fields and scan_layers, remat)."""
  # `deterministic` (argument 3, counting self) is a Python bool: static under remat.
  block = nn.remat(Block, static_argnums=(3,), prevent_cse=not cfg.scan_layers) if cfg.remat else Block
  if cfg.scan_layers:  # one traced block instead of num_layers: a program (and compile time) 1/L the size
    blocks = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                     in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers)
    h, _ = blocks(cfg, dtype, scanned=True, cache_length=cache_length, name="blocks")(h, bias, deterministic)
    return h
  for i in range(cfg.num_layers):
    h = block(cfg, dtype, cache_length=cache_length, name=f"block_{i}")(h, bias, deterministic)
  return h


class TransformerBlocks(nn.Module):
  """transformer_blocks as a submodule of its own, for modules built in setup()."""
  config: object
  dtype: jnp.dtype = jnp.float32
  cache_length: int = 0

  @nn.compact
  def __call__(self, h, bias, deterministic: bool = True):
    return transformer_blocks(self.config, self.dtype, h, bias, deterministic, self.cache_length)


class DiffusionPrior(nn.Module):
  """x_t [B, D], t [B], z_t [B, D], tokens [B, T, W], mask [B, T] -> x_0 [B, D].

  x_t and the prediction are in the normalised latent space; z_t and the
  token encodings are CLIP's raw outputs.
  """
  config: PriorConfig
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x_t, t, z_t, tokens, mask, deterministic: bool = True):
    cfg = self.config
    text_width = cfg.text_width or cfg.clip_dim
    b = x_t.shape[0]
    if x_t.shape != (b, cfg.clip_dim) or z_t.shape != (b, cfg.clip_dim):
      raise ValueError(f"x_t and z_t must be [B, {cfg.clip_dim}], got {x_t.shape} and {z_t.shape}.")
    if tokens.shape != (b, cfg.num_text_tokens, text_width):
      raise ValueError(f"tokens must be [B, {cfg.num_text_tokens}, {text_width}], got {tokens.shape}.")
    if mask.shape != (b, cfg.num_text_tokens):
      raise ValueError(f"mask must be [B, {cfg.num_text_tokens}], got {mask.shape}.")
    t = jnp.broadcast_to(jnp.asarray(t), (b,))
    # Data statistics of the latent; read by normalize() / denormalize(), never trained.
    self.variable("stats", "clip_mean", jnp.zeros, (cfg.clip_dim,))
    self.variable("stats", "clip_std", jnp.ones, (cfg.clip_dim,))
    dense = lambda name: nn.Dense(cfg.width, dtype=self.dtype, name=name)
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)

    time = TimestepMLP(cfg.time_embed_dim or cfg.width, cfg.width, dtype=self.dtype, name="time_embedding")(
        timestep_embedding(t, cfg.width))  # [B, W]
    if cfg.embedding_proj_norm:
      z_t = norm("embedding_proj_norm")(z_t)
    seq = [dense("encoder_hidden_states_proj")(tokens),  # [B, T, W]
           dense("embedding_proj")(z_t)[:, None],
           time[:, None].astype(self.dtype),
           dense("proj_in")(x_t)[:, None]]
    if cfg.prd_token:
      prd = self.param("prd_embedding", nn.initializers.normal(0.02), (1, 1, cfg.width))
      seq.append(jnp.broadcast_to(prd, (b, 1, cfg.width)).astype(self.dtype))
    h = jnp.concatenate(seq, axis=1)  # [B, L, W]
    pos = self.param("positional_embedding", nn.initializers.normal(0.02), (1, cfg.seq_len, cfg.width))
    h = h + pos.astype(self.dtype)
    if cfg.norm_in:
      h = norm("norm_in")(h)
    bias = attention_bias(mask, cfg.num_extra_tokens)
    h = parallel.constrain_batch(h)  # the residual stream stays split over the batch (FSDP)
    h = norm("norm_out")(transformer_blocks(cfg, self.dtype, h, bias, deterministic))
    # The final query reads the whole sequence; without it, the noised-latent token does.
    out = parallel.constrain_batch(h[:, -1] if cfg.prd_token else h[:, cfg.num_text_tokens + 2])  # [B, W]
    return nn.Dense(cfg.clip_dim, dtype=self.dtype, name="proj_to_clip_embeddings")(out).astype(jnp.float32)


def init_variables(config: PriorConfig, rng, dtype=jnp.float32):
  """Random params and unit stats (clip_mean 0, clip_std 1) for a prior."""
  model = DiffusionPrior(config, dtype)
  b, text_width = 1, config.text_width or config.clip_dim
  init = jax.jit(lambda r: model.init(
      r, jnp.zeros((b, config.clip_dim)), jnp.zeros((b,), jnp.int32), jnp.zeros((b, config.clip_dim)),
      jnp.zeros((b, config.num_text_tokens, text_width)), jnp.ones((b, config.num_text_tokens), bool)))
  return init(rng)  # one compiled program: eager init dispatches hundreds of small ops


def normalize(variables, z):
  """CLIP image embedding -> normalised latent, with the prior's stats."""
  stats = variables["stats"]
  return (z - stats["clip_mean"]) / stats["clip_std"]


def denormalize(variables, x):
  """Normalised latent -> CLIP image embedding (diffusers' post_process_latents)."""
  stats = variables["stats"]
  return x * stats["clip_std"] + stats["clip_mean"]
