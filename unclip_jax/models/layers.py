"""Building blocks shared by the prior and the U-Nets."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def timestep_embedding(t, dim: int, *, flip_sin_to_cos: bool = True, downscale_freq_shift: float = 0.0,
                       max_period: float = 10000.0):
  """Sinusoidal embedding of (possibly fractional) timesteps t [B] -> [B, dim].

  flip_sin_to_cos puts cos first (GLIDE / guided-diffusion order); the defaults
  are those of Karlo's prior and decoder as diffusers configures them.
  """
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - downscale_freq_shift)
  args = t.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepMLP(nn.Module):
  """Linear -> SiLU -> Linear on a timestep embedding (diffusers' TimestepEmbedding)."""
  features: int
  out_features: int | None = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, emb):
    h = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(emb)
    h = nn.silu(h)
    return nn.Dense(self.out_features or self.features, dtype=self.dtype, name="linear_2")(h)


class GroupNorm(nn.Module):
  """GroupNorm over NHWC (or [B, ..., C]) inputs, statistics in float32 with a
  two-pass variance (closer to torch's GroupNorm than E[x^2] - E[x]^2).

  Same parameters ("scale", "bias" [C]) and function as flax's nn.GroupNorm,
  but the statistics are reductions over the spatial axes per channel first,
  then over each group's channels: XLA's CPU backend runs flax's grouped
  reduction (over a reshaped [B, HW, G, C/G]) 4-5x slower at the decoder's
  64 px levels (benchmarks/vs_diffusers.py).
  """
  num_groups: int = 32
  epsilon: float = 1e-5
  dtype: jnp.dtype | None = None  # output dtype; None: the input's
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x [B, ..., C]
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible into {self.num_groups} groups.")
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    b, per_group = x.shape[0], c // self.num_groups
    xf = x.reshape(b, -1, c).astype(jnp.float32)  # [B, P, C]
    count = xf.shape[1] * per_group

    def group_mean(channel_sums):  # [B, C] sums over P -> [B, 1, C] mean of each channel's group
      groups = channel_sums.reshape(b, self.num_groups, per_group).sum(-1) / count  # [B, G]
      return jnp.repeat(groups, per_group, axis=1)[:, None, :]

    centred = xf - group_mean(xf.sum(1))
    inv_std = jax.lax.rsqrt(group_mean(jnp.square(centred).sum(1)) + self.epsilon)
    y = centred * (inv_std * scale.astype(jnp.float32)) + bias.astype(jnp.float32)
    return y.reshape(x.shape).astype(self.dtype or x.dtype)


def dot_product_attention(q, k, v, mask=None, implementation: str | None = None, query_block: int = 256):
  """Softmax attention, q [B, T, N, D], k and v [B, S, N, D], mask broadcastable to [B, N, T, S].

  implementation: "blocked" runs the queries in blocks of `query_block` (a
  loop over [B, N, block, S] logits that stay in cache); "xla" and "cudnn" are
  jax.nn.dot_product_attention's; None picks "blocked" on CPU, where it is
  ~3x faster than the one-shot softmax at the decoder's 32 x 32 level (1024
  pixel queries), and jax.nn.dot_product_attention's default elsewhere.
  """
  if implementation is None and jax.default_backend() == "cpu":
    implementation = "blocked"
  if implementation != "blocked":
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)
  b, t, n, d = q.shape
  block = math.gcd(t, query_block)  # a divisor of T: every block is full
  q = (q * (1.0 / math.sqrt(d))).astype(q.dtype)
  qt, kt, vt = (jnp.swapaxes(y, 1, 2) for y in (q, k, v))  # [B, N, T|S, D]
  # [B, N, T, X] -> [T/block, B, N, block, X]
  to_blocks = lambda y: jnp.moveaxis(y.reshape(b, n, t // block, block, -1), 2, 0)
  q_blocks = to_blocks(qt)
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  per_query_mask = mask is not None and mask.shape[2] != 1
  if per_query_mask:  # split along T with the queries; a key-only mask [.., 1, S] serves every block
    blocks = (q_blocks, to_blocks(jnp.broadcast_to(mask, (b, n, t, k.shape[1]))))
  else:
    blocks = q_blocks

  def attend(block_inputs):
    qb, mb = block_inputs if per_query_mask else (block_inputs, mask)
    logits = jnp.einsum("bntd,bnsd->bnts", qb, kt, preferred_element_type=jnp.float32)
    if mb is not None:
      logits = jnp.where(mb, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(vt.dtype)
    return jnp.einsum("bnts,bnsd->bntd", weights, vt)  # [B, N, block, D]

  out = jax.lax.map(attend, blocks)  # [T/block, B, N, block, D]
  return jnp.moveaxis(out, 0, 2).reshape(b, n, t, d).swapaxes(1, 2)  # [B, T, N, D]
