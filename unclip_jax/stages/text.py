"""The text conditioning the prior and the decoder share.

A caption reaches both as CLIP's encoding of it, one dict with a leading batch axis:
  {"z_t": [B, D] embedding, "tokens": [B, L, W] per-token encodings, "mask": [B, L] bool,
   "ids": [B, L] int32 token ids (optional: what a decoder with its own text encoder reads)}
The unconditional text is the empty caption's encoding, the same dict with a
batch of 1 (broadcast to the batch where it is used). A batch for either stage
adds "z_i": [B, D], the CLIP image embedding.
"""

import jax
import jax.numpy as jnp
import numpy as np

KEYS = ("z_t", "tokens", "mask")  # every text dict has them
IDS = "ids"


def fields(cond: dict) -> tuple[str, ...]:
  """The text fields cond holds: KEYS, and the token ids if present."""
  return KEYS + ((IDS,) if IDS in cond else ())


def conditioning(encoding) -> dict:
  """clip.TextEncoding (or any (embedding, tokens, mask[, ids]) tuple) -> the conditioning dict."""
  z_t, tokens, mask, *ids = encoding
  cond = {"z_t": z_t, "tokens": tokens, "mask": mask}
  if ids and ids[0] is not None:
    cond[IDS] = ids[0]
  return cond


def unconditional(clip) -> dict:
  """The empty caption's conditioning (batch 1), on the host."""
  return {k: np.asarray(v) for k, v in conditioning(clip.encode_text([""])).items()}


def check(cond: dict, name: str):
  missing = [k for k in KEYS if k not in cond]
  if missing:
    raise ValueError(f"{name} is missing {missing}; expected keys {KEYS} (see stages/text.py).")


def broadcast_uncond(uncond: dict, cond: dict) -> dict:
  """uncond with batch 1 (broadcast) or the batch of cond, shaped like cond's text (each of its fields)."""
  batch = cond["z_t"].shape[0]
  out = {}
  for k in fields(cond):
    if k not in uncond:
      raise ValueError(f"uncond has no {k!r}, which the conditioning has (encode both with the same CLIP).")
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
  return {k: pick(jnp.asarray(cond[k]), uncond[k]) for k in fields(cond)}, dropped


def encode_batch(clip, host_batch) -> dict:
  """Host batch -> {z_t, tokens, mask, ids, z_i}: CLIP run on its captions and images, or a batch of
  precomputed embeddings (data/embeddings.py) passed through, its float16 tokens made float32 as
  CLIP's own are, and its captions' token ids from CLIP's tokenizer."""
  if "z_i" in host_batch:
    out = {"z_t": np.asarray(host_batch["z_t"], np.float32), "tokens": np.asarray(host_batch["tokens"], np.float32),
           "mask": np.asarray(host_batch["mask"], bool), "z_i": np.asarray(host_batch["z_i"], np.float32)}
    if "caption" in host_batch and hasattr(clip, "tokenize"):
      out[IDS] = np.asarray(clip.tokenize([str(c) for c in host_batch["caption"]])[0])
    return out
  encoding = clip.encode_text(list(host_batch["caption"]))
  z_i = clip.encode_image(host_batch["image"], value_range=(0, 255))
  return dict({k: np.asarray(v) for k, v in conditioning(encoding).items()}, z_i=np.asarray(z_i))
