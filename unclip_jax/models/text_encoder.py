"""GLIDE's text transformer, the paper's decoder's own text encoder.

Token ids [B, L] -> token embedding plus a learned positional embedding; padded
positions take a learned padding embedding instead (GLIDE's xf_padding, so the
attention needs no mask and the last position, padding for short captions,
reads the whole caption); the diffusion prior's pre-LN blocks with full
(bidirectional) attention; a final LayerNorm. The U-Net uses every position's
output as its attention context and the last one, projected, in its time
embedding (models/unet.py).
"""

import flax.linen as nn
import jax.numpy as jnp

from unclip_jax.models.prior import transformer_blocks
from unclip_jax.models.unet_config import TextEncoderConfig


class TextEncoder(nn.Module):
  """ids [B, L] int, mask [B, L] bool (True on the caption's tokens) -> (outputs [B, L, W], last [B, W])."""
  config: TextEncoderConfig
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, ids, mask, deterministic: bool = True):
    cfg = self.config
    if ids.ndim != 2 or ids.shape[1] != cfg.num_tokens or mask.shape != ids.shape:
      raise ValueError(f"text ids and mask must be [B, {cfg.num_tokens}], got {ids.shape} and {mask.shape}.")
    init = nn.initializers.normal(0.01)
    x = nn.Embed(cfg.vocab_size, cfg.width, dtype=self.dtype, param_dtype=self.param_dtype,
                 name="token_embedding")(ids)  # [B, L, W]
    x = x + self.param("positional_embedding", init, (cfg.num_tokens, cfg.width), self.param_dtype).astype(self.dtype)
    padding = self.param("padding_embedding", init, (cfg.num_tokens, cfg.width), self.param_dtype)
    x = jnp.where(jnp.asarray(mask, bool)[..., None], x, padding.astype(self.dtype)[None])
    no_mask = jnp.zeros((1, 1, cfg.num_tokens, cfg.num_tokens), jnp.float32)  # every position reads every other
    x = transformer_blocks(cfg, self.dtype, x, no_mask, deterministic)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype, name="final_ln")(x)
    return x, x[:, -1]
