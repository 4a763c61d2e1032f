"""Decoder training and sampling: the 64 px U-Net conditioned on z_i and the caption.

Training (paper, section 2.1): eps prediction with improved DDPM's hybrid loss
for the learned variance; z_i is swapped for the learned null embedding 10% of
the time and the caption for the empty prompt's encodings 50% of the time, so
one network serves both halves of classifier-free guidance.

Conditioning is stages/text.py's text dict plus "z_i": [B, D]; the
unconditional text is the empty caption's (batch 1), its z_i the learned null.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import imaging
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import contract, denoising, text

COND_KEYS = ("z_i",) + text.KEYS  # and the token ids, which a decoder with its own text encoder reads


def unet_inputs(cond: dict, cfg: unet_lib.UNetConfig) -> dict:
  """The conditioning as the U-Net's keyword arguments (diffusers' names): CLIP's text encodings, or
  for the paper's decoder (its own text encoder) the token ids."""
  if cfg.text_encoder is not None:
    if text.IDS not in cond:
      raise ValueError("This decoder encodes captions itself (config text_encoder): its conditioning needs the "
                       "token ids, \"ids\" (stages/text.py).")
    return {"image_embed": cond["z_i"], "text_ids": cond[text.IDS], "text_mask": cond["mask"]}
  return {"image_embed": cond["z_i"], "text_embed": cond["z_t"], "text_tokens": cond["tokens"],
          "text_mask": cond["mask"]}


def drop_conditioning(rng, batch: dict, uncond: dict, *, p_drop_image: float = 0.1, p_drop_text: float = 0.5):
  """Per example: drop_image [B] bool (use the learned null z_i) and the text
  fields replaced by the empty prompt's encodings with probability p_drop_text."""
  missing = [k for k in ("image",) + COND_KEYS if k not in batch]
  if missing:
    raise ValueError(f"The decoder batch lacks {missing}; it needs image and {COND_KEYS}.")
  text.check(uncond, "uncond")
  k_img, k_txt = jax.random.split(rng)
  drop_image = jax.random.bernoulli(k_img, p_drop_image, (batch["image"].shape[0],))
  texts, _ = text.drop(k_txt, batch, uncond, p_drop_text)
  return dict(batch, **texts, drop_image=drop_image)


def loss_fn(params, cfg: unet_lib.UNetConfig, schedule: Schedule, batch: dict, rng, *, train: bool = True,
            prediction_type: str = "eps", min_snr_gamma: float | None = None):
  """Mean hybrid loss over the batch, and its parts.

  batch: image [B, H, W, 3] in [-1, 1], the conditioning (COND_KEYS),
  optional drop_image [B] bool.
  """
  model = unet_lib.UNet(cfg)

  def apply(x_t, t, dropout_rng):
    return model.apply({"params": params}, x_t, t, **unet_inputs(batch, cfg), drop_image=batch.get("drop_image"),
                       train=train, rngs={"dropout": dropout_rng})

  return denoising.loss(apply, schedule, batch["image"], rng, prediction_type=prediction_type,
                        variance_type=denoising.variance_type(cfg), min_snr_gamma=min_snr_gamma)


def training_loss(params, batch: dict, rng, *, cfg: unet_lib.UNetConfig, schedule: Schedule, uncond: dict,
                  p_drop_image: float = 0.1, p_drop_text: float = 0.5, prediction_type: str = "eps",
                  min_snr_gamma: float | None = None):
  """CFG drops, then loss_fn: the shared loss_fn(params, batch, rng) once the
  keywords are bound (unclip_jax.training.make_train_step takes it from there)."""
  if cfg.text_proj is None:
    raise ValueError("The decoder stage needs a U-Net config with text_proj (the CLIP conditioning).")
  k_drop, k_loss = jax.random.split(rng)
  batch = drop_conditioning(k_drop, batch, uncond, p_drop_image=p_drop_image, p_drop_text=p_drop_text)
  return loss_fn(params, cfg, schedule, batch, k_loss, prediction_type=prediction_type, min_snr_gamma=min_snr_gamma)


def guided_model_fn(params, cfg: unet_lib.UNetConfig, cond: dict, uncond: dict, guidance_scale):
  """The classifier-free guided decoder as a model function (x, t) -> output.

  cond: COND_KEYS with batch B; uncond: the empty prompt's text (batch 1 or
  B), its z_i the learned null. guidance_scale: a scalar or [B], one per sample.
  """
  text.check(uncond, "uncond")
  b = cond["z_i"].shape[0]
  model = unet_lib.UNet(cfg)
  uncond_b = dict(text.broadcast_uncond(uncond, cond), z_i=cond["z_i"], drop_image=jnp.ones((b,), bool))
  cond = dict(cond, drop_image=jnp.zeros((b,), bool))

  def model_fn(x, t, c):
    return model.apply({"params": params}, x, t, **unet_inputs(c, cfg), drop_image=c["drop_image"])

  return samplers.classifier_free_guidance(model_fn, cond, uncond_b, guidance_scale, guided_channels=cfg.in_channels)


def sample(params, cfg: unet_lib.UNetConfig, schedule: Schedule, rng, cond: dict, uncond: dict, *,
           guidance_scale=8.0, size: int = 64, sampler: str = "ddpm", x_T=None, prediction_type: str = "eps",
           variance_type: str | None = None, **sampler_kwargs):
  """64 px images [B, size, size, 3] guided by z_i and the caption (Karlo: 25 steps, scale 8;
  guidance_scale may be [B], one per sample).

  cond, uncond: as for guided_model_fn. x_T [B, size, size, 3]: the starting
  noise (default: drawn from rng, as samplers.initial_noise(rng, shape) does).
  variance_type: default from the U-Net's output channels. sampler_kwargs go to
  samplers.sample (a `part`: run some steps, for progress between them).
  """
  b = cond["z_i"].shape[0]
  guided = guided_model_fn(params, cfg, cond, uncond, guidance_scale)
  shape = (b, size, size, cfg.in_channels)
  if x_T is not None and tuple(x_T.shape) != shape:
    raise ValueError(f"x_T must be [B, size, size, C] = {shape}, got {tuple(x_T.shape)}.")
  return samplers.sample(guided, schedule, rng, x_T, shape=shape, sampler=sampler, prediction_type=prediction_type,
                         variance_type=variance_type or denoising.variance_type(cfg), finish=denoising.clip_images,
                         **sampler_kwargs)


def invert(params, cfg: unet_lib.UNetConfig, schedule: Schedule, images, cond: dict, uncond: dict, *,
           guidance_scale=8.0, clip_range=1.0, dynamic_threshold=None, fixed_point_iters: int = 0,
           prediction_type: str = "eps", variance_type: str | None = None, part: samplers.Part | None = None):
  """DDIM inversion of images [B, H, W, 3] in [-1, 1] to the x_T from which a
  deterministic DDIM `sample` (same schedule, cond, guidance and clamp)
  decodes them again: the chain is inverted through the same guided model
  function the decode uses. See samplers.ddim_invert for fixed_point_iters.
  """
  guided = guided_model_fn(params, cfg, cond, uncond, guidance_scale)
  return samplers.ddim_invert(guided, schedule, jnp.asarray(images, jnp.float32), prediction_type=prediction_type,
                              variance_type=variance_type or denoising.variance_type(cfg), clip_range=clip_range,
                              dynamic_threshold=dynamic_threshold, fixed_point_iters=fixed_point_iters, part=part)


def sampler_from_export(export: contract.DecoderExport, options: contract.StageOptions):
  """sample(params, rng, cond, uncond, guidance_scale, x_T=None, part=None) -> images [B, r, r, 3]: the
  exported decoder sampled as `options` say (guidance_scale is an argument: a scalar or one per image).
  Jit it."""
  d = export.diffusion
  return functools.partial(
      sample, cfg=export.model, schedule=d.make_schedule(options.num_steps, options.spacing), size=export.resolution,
      sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
      dynamic_threshold=options.dynamic_threshold, prediction_type=d.prediction_type, variance_type=d.variance_type)


def inverter_from_export(export: contract.DecoderExport, options: contract.StageOptions, *,
                         fixed_point_iters: int = 0):
  """invert(params, images, cond, uncond, guidance_scale, part=None) -> x_T: the inverse of sampler_from_export's
  loop when it runs DDIM with eta = 0 (options' steps and clamp). Jit it."""
  d = export.diffusion
  return functools.partial(
      invert, cfg=export.model, schedule=d.make_schedule(options.num_steps, options.spacing),
      clip_range=options.clip_range, dynamic_threshold=options.dynamic_threshold, fixed_point_iters=fixed_point_iters,
      prediction_type=d.prediction_type, variance_type=d.variance_type)


def sampling_options(config) -> contract.StageOptions:
  """How a training config's sample grids (and the AOT tool's sampling loop) sample: its
  sample_steps, sampler, sample_spacing, guidance_scale and clip_range, or 25 DDPM steps at guidance 3."""
  return contract.StageOptions(config.get("sample_steps", 25), config.get("sampler", "ddpm"),
                               guidance_scale=config.get("guidance_scale", 3.0),
                               clip_range=config.get("clip_range", 1.0),
                               spacing=config.get("sample_spacing", "linspace"))


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
    if model.get("text_encoder"):  # the CLIP's tokenizer fixes its vocabulary and length
      model["text_encoder"] = dict(model["text_encoder"], vocab_size=clip.vocab_size, num_tokens=clip.max_length)
    diffusion = contract.Diffusion.from_config(config.diffusion)
    self.unet_config = unet_lib.UNetConfig.from_dict(dict(
        model, in_channels=3, out_channels=denoising.out_channels(3, diffusion.variance_type),
        dtype=config.get("compute_dtype", "float32"),
        text_proj=unet_lib.TextProjConfig(clip_dim=clip.embed_dim, text_dim=clip.text_width,
                                          extra_tokens=extra_tokens))).validate()
    self.export_config = contract.DecoderExport(self.unet_config, config.decoder_resolution, diffusion)
    self.schedule = diffusion.make_schedule()
    self.sampling = sampling_options(config)
    self.uncond = text.unconditional(clip)
    self._loss = functools.partial(training_loss, cfg=self.unet_config, schedule=self.schedule, uncond=self.uncond,
                                   p_drop_image=config.get("p_drop_image", 0.1),
                                   p_drop_text=config.get("p_drop_text", 0.5),
                                   prediction_type=diffusion.prediction_type,
                                   min_snr_gamma=config.get("min_snr_gamma") or None)
    n = config.get("num_sample_images", 8)
    self.eval = {k: v[:n] for k, v in self.encode_batch(eval_batch).items()}

  def init_params(self, rng):
    return unet_lib.init_params(self.unet_config, rng)

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng)

  def encode_batch(self, host_batch):
    """Images at the decoder's resolution in [-1, 1] and their CLIP conditioning (stages/text.py:
    precomputed embeddings joined to the batch, else CLIP run on it)."""
    image = imaging.to_model_range(imaging.resize_batch(host_batch["image"], self.config.decoder_resolution))
    return dict(image=image, **text.encode_batch(self.clip, host_batch))

  def sample_images(self, params, rng):
    """Reconstructions of fixed training images from their z_i and captions, beside the originals."""
    cond = {k: jnp.asarray(self.eval[k]) for k in ("z_i",) + text.fields(self.eval)}
    out = sampler_from_export(self.export_config, self.sampling)(
        params, rng=rng, cond=cond, uncond=self.uncond, guidance_scale=self.sampling.guidance_scale)
    pairs = np.stack([self.eval["image"], np.asarray(out)], axis=1).reshape((-1,) + out.shape[1:])
    return imaging.to_uint8(pairs)

  def inference_config(self):
    return self.export_config.to_json()
