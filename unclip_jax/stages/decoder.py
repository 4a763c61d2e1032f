"""Decoder training and sampling: the 64 px U-Net conditioned on z_i and the caption.

Training (paper, section 2.1): eps prediction with improved DDPM's hybrid loss
for the learned variance; z_i is swapped for the learned null embedding 10% of
the time and the caption for the empty prompt's encodings 50% of the time, so
one network serves both halves of classifier-free guidance.
"""

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian, losses, samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib

TEXT_KEYS = ("text_embed", "text_tokens", "text_mask")


def variance_type(cfg: unet_lib.UNetConfig) -> str:
  """6 output channels for 3 input channels means a learned variance range."""
  return "learned_range" if cfg.out_channels == 2 * cfg.in_channels else "fixed_small"


def drop_conditioning(rng, batch: dict, uncond: dict, *, p_drop_image: float = 0.1, p_drop_text: float = 0.5):
  """Per example: drop_image [B] bool (use the learned null z_i) and the text
  fields replaced by the empty prompt's encodings with probability p_drop_text.

  uncond holds unbatched text_embed [D], text_tokens [L, W], text_mask [L].
  """
  missing = [k for k in ("image",) + TEXT_KEYS if k not in batch]
  if missing:
    raise ValueError(f"The decoder batch lacks {missing}; it needs image, image_embed and {TEXT_KEYS}.")
  b = batch["image"].shape[0]
  k_img, k_txt = jax.random.split(rng)
  drop_image = jax.random.bernoulli(k_img, p_drop_image, (b,))
  drop_text = jax.random.bernoulli(k_txt, p_drop_text, (b,))
  out = dict(batch)
  for key in TEXT_KEYS:
    if key not in uncond:
      raise ValueError(f"uncond must hold the empty prompt's {key} (unbatched).")
    cond = jnp.asarray(batch[key])
    null = jnp.broadcast_to(jnp.asarray(uncond[key], cond.dtype), cond.shape)
    out[key] = jnp.where(drop_text.reshape((b,) + (1,) * (cond.ndim - 1)), null, cond)
  out["drop_image"] = drop_image
  return out


def loss_fn(params, cfg: unet_lib.UNetConfig, schedule: Schedule, batch: dict, rng, *, train: bool = True):
  """Mean hybrid loss over the batch, and its parts.

  batch: image [B, H, W, 3] in [-1, 1], image_embed [B, D], text_embed [B, D],
  text_tokens [B, L, W], text_mask [B, L], optional drop_image [B] bool.
  """
  x0 = jnp.asarray(batch["image"], jnp.float32)
  b = x0.shape[0]
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  i = jax.random.randint(k_t, (b,), 0, schedule.num_steps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = gaussian.q_sample(schedule, x0, i, noise)
  out = unet_lib.UNet(cfg).apply(
      {"params": params}, x_t, schedule.timesteps[i], image_embed=batch["image_embed"],
      text_embed=batch["text_embed"], text_tokens=batch["text_tokens"], text_mask=batch.get("text_mask"),
      drop_image=batch.get("drop_image"), train=train, rngs={"dropout": k_drop})
  loss, parts = losses.diffusion_loss(schedule, out, x0, x_t, i, noise, prediction_type="eps",
                                      variance_type=variance_type(cfg))
  return jnp.mean(loss), {k: jnp.mean(v) for k, v in parts.items()}


def training_loss(params, batch: dict, rng, *, cfg: unet_lib.UNetConfig, schedule: Schedule, uncond: dict,
                  p_drop_image: float = 0.1, p_drop_text: float = 0.5):
  """CFG drops, then loss_fn: the shared loss_fn(params, batch, rng) once the
  keywords are bound (unclip_jax.training.make_train_step takes it from there).

  uncond: the empty prompt's text_embed [D], text_tokens [L, W], text_mask [L].
  """
  if cfg.text_proj is None:
    raise ValueError("The decoder stage needs a U-Net config with text_proj (the CLIP conditioning).")
  k_drop, k_loss = jax.random.split(rng)
  batch = drop_conditioning(k_drop, batch, uncond, p_drop_image=p_drop_image, p_drop_text=p_drop_text)
  return loss_fn(params, cfg, schedule, batch, k_loss)


def sample(params, cfg: unet_lib.UNetConfig, schedule: Schedule, rng, cond: dict, uncond: dict, *,
           guidance_scale=8.0, size: int = 64, sampler: str = "ddpm", **sampler_kwargs):
  """64 px images [B, size, size, 3] guided by z_i and the caption (Karlo: 25 steps, scale 8;
  guidance_scale may be [B], one per sample).

  cond: image_embed [B, D], text_embed [B, D], text_tokens [B, L, W], text_mask [B, L].
  uncond: the empty prompt's text fields, unbatched; its z_i is the learned null.
  """
  b = cond["image_embed"].shape[0]
  model = unet_lib.UNet(cfg)
  uncond_b = {k: jnp.broadcast_to(jnp.asarray(uncond[k]), jnp.shape(cond[k])) for k in TEXT_KEYS}
  uncond_b["image_embed"] = cond["image_embed"]
  uncond_b["drop_image"] = jnp.ones((b,), bool)
  cond = dict(cond, drop_image=jnp.zeros((b,), bool))

  def model_fn(x, t, c):
    return model.apply({"params": params}, x, t, image_embed=c["image_embed"], text_embed=c["text_embed"],
                       text_tokens=c["text_tokens"], text_mask=c["text_mask"], drop_image=c["drop_image"])

  guided = samplers.classifier_free_guidance(model_fn, cond, uncond_b, guidance_scale,
                                             guided_channels=cfg.in_channels)
  x = samplers.sample(guided, schedule, rng, shape=(b, size, size, cfg.in_channels), sampler=sampler,
                      prediction_type="eps", variance_type=variance_type(cfg), **sampler_kwargs)
  return jnp.clip(x, -1.0, 1.0)
