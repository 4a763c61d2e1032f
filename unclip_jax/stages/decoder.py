"""Decoder training and sampling: the 64 px U-Net conditioned on z_i and the caption.

Training (paper, section 2.1): eps prediction with improved DDPM's hybrid loss
for the learned variance; z_i is swapped for the learned null embedding 10% of
the time and the caption for the empty prompt's encodings 50% of the time, so
one network serves both halves of classifier-free guidance.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import imaging
from unclip_jax.diffusion import gaussian, losses, samplers
from unclip_jax.diffusion.schedules import Schedule, make_schedule
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


def guided_model_fn(params, cfg: unet_lib.UNetConfig, cond: dict, uncond: dict, guidance_scale):
  """The classifier-free guided decoder as a model function (x, t) -> output.

  cond: image_embed [B, D], text_embed [B, D], text_tokens [B, L, W], text_mask [B, L].
  uncond: the empty prompt's text fields, unbatched; its z_i is the learned null.
  guidance_scale: a scalar or [B], one per sample.
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

  return samplers.classifier_free_guidance(model_fn, cond, uncond_b, guidance_scale, guided_channels=cfg.in_channels)


def sample(params, cfg: unet_lib.UNetConfig, schedule: Schedule, rng, cond: dict, uncond: dict, *,
           guidance_scale=8.0, size: int = 64, sampler: str = "ddpm", x_T=None, **sampler_kwargs):
  """64 px images [B, size, size, 3] guided by z_i and the caption (Karlo: 25 steps, scale 8;
  guidance_scale may be [B], one per sample).

  cond, uncond: as for guided_model_fn. x_T [B, size, size, 3]: the starting
  noise (default: drawn from rng, as samplers.initial_noise(rng, shape) does).
  """
  b = cond["image_embed"].shape[0]
  guided = guided_model_fn(params, cfg, cond, uncond, guidance_scale)
  shape = (b, size, size, cfg.in_channels)
  if x_T is not None and tuple(x_T.shape) != shape:
    raise ValueError(f"x_T must be [B, size, size, C] = {shape}, got {tuple(x_T.shape)}.")
  x = samplers.sample(guided, schedule, rng, x_T, shape=shape, sampler=sampler, prediction_type="eps",
                      variance_type=variance_type(cfg), **sampler_kwargs)
  return jnp.clip(x, -1.0, 1.0)


def invert(params, cfg: unet_lib.UNetConfig, schedule: Schedule, images, cond: dict, uncond: dict, *,
           guidance_scale=8.0, clip_range=1.0, dynamic_threshold=None, fixed_point_iters: int = 0,
           progress_desc=None):
  """DDIM inversion of images [B, H, W, 3] in [-1, 1] to the x_T from which a
  deterministic DDIM `sample` (same schedule, cond, guidance and clamp)
  decodes them again: the chain is inverted through the same guided model
  function the decode uses. See samplers.ddim_invert for fixed_point_iters.
  """
  guided = guided_model_fn(params, cfg, cond, uncond, guidance_scale)
  return samplers.ddim_invert(guided, schedule, jnp.asarray(images, jnp.float32), prediction_type="eps",
                              variance_type=variance_type(cfg), clip_range=clip_range,
                              dynamic_threshold=dynamic_threshold, fixed_point_iters=fixed_point_iters,
                              progress_desc=progress_desc)


class DecoderStage:
  """Trains the decoder on images whose z_i and captions a frozen CLIP encodes.

  Data arrive at CLIP's resolution (CLIP embeds them there) and are resized
  to the decoder's resolution for the diffusion target.
  """
  grid_columns = 4  # two [original, reconstruction] pairs per row

  def __init__(self, config, clip, eval_batch: dict):
    self.config = config
    self.clip = clip
    model = config.model.to_dict()
    extra_tokens = model.pop("extra_tokens", 4)
    self.unet_config = unet_lib.UNetConfig.from_dict(dict(
        model, in_channels=3, out_channels=6 if config.diffusion.variance_type == "learned_range" else 3,
        dtype=config.get("compute_dtype", "float32"),
        text_proj=unet_lib.TextProjConfig(clip_dim=clip.embed_dim, text_dim=clip.text_width,
                                          extra_tokens=extra_tokens))).validate()
    self.schedule = make_schedule(config.diffusion.schedule, config.diffusion.num_timesteps)
    empty = clip.encode_text([""])
    self.uncond = {"text_embed": np.asarray(empty.embedding[0]), "text_tokens": np.asarray(empty.tokens[0]),
                   "text_mask": np.asarray(empty.mask[0])}
    self._loss = functools.partial(training_loss, cfg=self.unet_config, schedule=self.schedule, uncond=self.uncond,
                                   p_drop_image=config.get("p_drop_image", 0.1),
                                   p_drop_text=config.get("p_drop_text", 0.5))
    n = config.get("num_sample_images", 8)
    self.eval = {k: v[:n] for k, v in self.encode_batch(eval_batch).items()}

  def init_params(self, rng):
    r, b = self.config.decoder_resolution, 1
    cfg = self.unet_config
    tokens = self.uncond["text_tokens"]
    return jax.jit(lambda key: unet_lib.UNet(cfg).init(
        key, jnp.zeros((b, r, r, 3)), jnp.zeros((b,), jnp.int32), image_embed=jnp.zeros((b, cfg.text_proj.clip_dim)),
        text_embed=jnp.zeros((b, cfg.text_proj.clip_dim)), text_tokens=jnp.zeros((b,) + tokens.shape),
        text_mask=jnp.ones((b, tokens.shape[0]), bool))["params"])(rng)

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng)

  def encode_batch(self, host_batch):
    """Images at the decoder's resolution in [-1, 1] and their CLIP conditioning: precomputed (a batch
    joined to data.embeddings carries z_i [B, D], z_t [B, D], tokens [B, L, W] float16, mask [B, L]),
    else CLIP run on the batch."""
    image = imaging.to_model_range(imaging.resize_batch(host_batch["image"], self.config.decoder_resolution))
    if "z_i" in host_batch:
      return {"image": image, "image_embed": np.asarray(host_batch["z_i"], np.float32),
              "text_embed": np.asarray(host_batch["z_t"], np.float32),
              "text_tokens": np.asarray(host_batch["tokens"], np.float32),
              "text_mask": np.asarray(host_batch["mask"], bool)}
    text = self.clip.encode_text(list(host_batch["caption"]))
    return {"image": image,
            "image_embed": np.asarray(self.clip.encode_image(host_batch["image"], value_range=(0, 255))),
            "text_embed": np.asarray(text.embedding), "text_tokens": np.asarray(text.tokens),
            "text_mask": np.asarray(text.mask)}

  def sample_images(self, params, rng):
    """Reconstructions of fixed training images from their z_i and captions, beside the originals."""
    cond = {k: jnp.asarray(self.eval[k]) for k in ("image_embed",) + TEXT_KEYS}
    schedule = make_schedule(self.config.diffusion.schedule, self.config.diffusion.num_timesteps,
                             self.config.get("sample_steps", 25))
    out = sample(params, self.unet_config, schedule, rng, cond, self.uncond,
                 guidance_scale=self.config.get("guidance_scale", 3.0), size=self.config.decoder_resolution,
                 clip_range=1.0)
    pairs = np.stack([self.eval["image"], np.asarray(out)], axis=1).reshape((-1,) + out.shape[1:])
    return imaging.to_uint8(pairs)

  def inference_config(self):
    return {"stage": "decoder", "model": self.unet_config.to_dict(), "resolution": self.config.decoder_resolution,
            "diffusion": self.config.diffusion.to_dict()}
