"""The text conditioning the prior and the decoder share.

A caption reaches both as CLIP's encoding of it, one dict with a leading batch axis:
  {"z_t": [B, D] embedding, "tokens": [B, L, W] per-token encodings, "mask": [B, L] bool}
The unconditional text is the empty caption's encoding, the same dict with a
batch of 1 (broadcast to the batch where it is used). A batch for either stage
adds "z_i": [B, D], the CLIP image embedding.
"""

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("z_t", "tokens", "mask")


def conditioning(encoding) -> dict:
  """clip.TextEncoding (or any (embedding, tokens, mask) triple) -> the conditioning dict."""
  z_t, tokens, mask = encoding
  return {"z_t": z_t, "tokens": tokens, "mask": mask}


def unconditional(clip) -> dict:
  """The empty caption's conditioning (batch 1), on the host."""
  return {k: np.asarray(v) for k, v in conditioning(clip.encode_text([""])).items()}


def check(cond: dict, name: str):
  missing = [k for k in KEYS if k not in cond]
  if missing:
    raise ValueError(f"{name} is missing {missing}; expected keys {KEYS} (see stages/text.py).")


def broadcast_uncond(uncond: dict, cond: dict) -> dict:
  """uncond with batch 1 (broadcast) or the batch of cond, shaped like cond's text."""
  batch = cond["z_t"].shape[0]
  out = {}
  for k in KEYS:
    u, c = jnp.asarray(uncond[k]), cond[k]
    if u.shape[1:] != c.shape[1:] or u.shape[0] not in (1, batch):
      raise ValueError(f"uncond[{k!r}] has shape {u.shape}; expected [1 or {batch}, *{tuple(c.shape[1:])}] "
                       f"to match the conditioning {tuple(c.shape)}.")
    out[k] = jnp.broadcast_to(u, c.shape).astype(c.dtype)
  return out


def drop(rng, cond: dict, uncond: dict, p_uncond: float):
  """Classifier-free-guidance dropout: each example's text replaced by the unconditional one with
  probability p_uncond (all fields together). Returns (the text fields, dropped [B] bool)."""
  batch = cond["z_t"].shape[0]
  uncond = broadcast_uncond(uncond, cond)
  dropped = jax.random.bernoulli(rng, p_uncond, (batch,))
  pick = lambda c, u: jnp.where(dropped.reshape((batch,) + (1,) * (c.ndim - 1)), u, c)
  return {k: pick(jnp.asarray(cond[k]), uncond[k]) for k in KEYS}, dropped


def encode_batch(clip, host_batch) -> dict:
  """Host batch -> {z_t, tokens, mask, z_i}: CLIP run on its captions and images, or a batch of
  precomputed embeddings (data/embeddings.py) passed through, its float16 tokens made float32 as
  CLIP's own are."""
  if "z_i" in host_batch:
    return {"z_t": np.asarray(host_batch["z_t"], np.float32), "tokens": np.asarray(host_batch["tokens"], np.float32),
            "mask": np.asarray(host_batch["mask"], bool), "z_i": np.asarray(host_batch["z_i"], np.float32)}
  encoding = clip.encode_text(list(host_batch["caption"]))
  z_i = clip.encode_image(host_batch["image"], value_range=(0, 255))
  return {"z_t": np.asarray(encoding.embedding), "tokens": np.asarray(encoding.tokens),
          "mask": np.asarray(encoding.mask), "z_i": np.asarray(z_i)}
