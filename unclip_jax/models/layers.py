"""Building blocks shared by the prior and the U-Nets."""

import math

import flax.linen as nn
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
