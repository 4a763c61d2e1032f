"""Upsampler training and sampling (64 -> 256 and 256 -> 1024).

Training follows the paper: the networks are convolutional, so they train on
random crops of 1/4 of the target size and sample at full size; the low-res
image may be degraded first (blur / BSR, unclip_jax/data/degradations.py).
The low-res image is upsampled to the full target size before cropping, so a
crop sees exactly the conditioning it would see at sampling time (the model's
own resize is the identity on an input already at its size).

The network predicts eps (the paper, Karlo) or v (config.diffusion.prediction_type).
With eps, errors in x0 cost almost nothing at high noise, so a briefly trained
model ignores the low-res image there and DDIM's first steps start from a wrong
image that the rest of the chain keeps; v weighs x0 evenly across noise levels.
"""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import imaging
from unclip_jax.data import degradations
from unclip_jax.diffusion import samplers
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import contract, denoising

Degrade = Callable[[jax.Array, jax.Array], jax.Array]  # degrade(rng, low_res [B, h, w, C]) -> same shape


def random_crop_pair(rng, image, low_res_up, crop: int):
  """The same random crop x crop window of image and low_res_up, per example.

  image, low_res_up: [B, H, W, C] (low_res_up already at the target size).
  """
  b, h, w, _ = image.shape
  if low_res_up.shape[:3] != image.shape[:3]:
    raise ValueError(f"low_res_up {low_res_up.shape} must match the target's size {image.shape}.")
  if not 0 < crop <= min(h, w):
    raise ValueError(f"crop {crop} must be in (0, {min(h, w)}].")
  k_y, k_x = jax.random.split(rng)
  ys = jax.random.randint(k_y, (b,), 0, h - crop + 1)
  xs = jax.random.randint(k_x, (b,), 0, w - crop + 1)

  def one(img, low, y, x):
    return (jax.lax.dynamic_slice(img, (y, x, 0), (crop, crop, img.shape[-1])),
            jax.lax.dynamic_slice(low, (y, x, 0), (crop, crop, low.shape[-1])))

  return jax.vmap(one)(image, low_res_up, ys, xs)  # 2 x [B, crop, crop, C]


def loss_fn(params, cfg: unet_lib.UNetConfig, schedule: Schedule, image, low_res_up, rng, *, train: bool = True,
            prediction_type: str = "eps", min_snr_gamma: float | None = None):
  """Mean diffusion loss (hybrid if the config learns the variance).

  image: [B, S, S, 3] target crops in [-1, 1]; low_res_up: [B, S, S, 3] conditioning.
  """
  model = unet_lib.UNet(cfg)

  def apply(x_t, t, dropout_rng):
    return model.apply({"params": params}, x_t, t, low_res=low_res_up, train=train, rngs={"dropout": dropout_rng})

  return denoising.loss(apply, schedule, image, rng, prediction_type=prediction_type,
                        variance_type=denoising.variance_type(cfg), min_snr_gamma=min_snr_gamma)


def training_loss(params, batch: dict, rng, *, cfg: unet_lib.UNetConfig, schedule: Schedule,
                  crop_fraction: float = 0.25, degrade: Degrade | None = None, prediction_type: str = "eps",
                  min_snr_gamma: float | None = None):
  """The shared loss_fn(params, batch, rng) once the keywords are bound.

  batch: image [B, H, W, 3] (the full-size target, [-1, 1]) and low_res
  [B, h, w, 3]. degrade(rng, low_res) is applied to the whole low-res image,
  which is then upsampled to H x W; a random crop of crop_fraction * H is cut
  from both. crop_fraction=1 trains at full size.
  """
  if not cfg.low_res_channels:
    raise ValueError("The upsampler stage needs a U-Net config with low_res_channels > 0.")
  k_deg, k_crop, k_loss = jax.random.split(rng, 3)
  image, low_res = jnp.asarray(batch["image"], jnp.float32), jnp.asarray(batch["low_res"], jnp.float32)
  crop = int(round(image.shape[1] * crop_fraction))
  factor = 2 ** (cfg.levels - 1)
  if crop % factor:
    raise ValueError(f"Crop size {crop} (= {crop_fraction} x {image.shape[1]}) must be divisible by {factor}.")
  if degrade is not None:
    low_res = degrade(k_deg, low_res)
  low_up = unet_lib.resize_low_res(low_res, image.shape[1:3])
  image, low_up = random_crop_pair(k_crop, image, low_up, crop)
  return loss_fn(params, cfg, schedule, image, low_up, k_loss, prediction_type=prediction_type,
                 min_snr_gamma=min_snr_gamma)


def sample(params, cfg: unet_lib.UNetConfig, schedule: Schedule, rng, low_res, *, size: int,
           params_last=None, sampler: str = "ddim", prediction_type: str = "eps", variance_type: str | None = None,
           **sampler_kwargs):
  """Full-size samples [B, size, size, 3] from low_res [B, h, w, 3] in [-1, 1].

  Unguided. params_last, if given, runs the chain's final step (Karlo's
  super_res_last); params runs all the others (super_res_first).
  variance_type: default from the U-Net's output channels. sampler_kwargs go to
  samplers.sample (a `part`: run some steps, for progress between them).
  """
  model = unet_lib.UNet(cfg)
  low_up = unet_lib.resize_low_res(jnp.asarray(low_res, jnp.float32), (size, size))
  last_t = schedule.timesteps[0]

  def model_fn(x, t):
    run = lambda p: model.apply({"params": p}, x, t, low_res=low_up)
    if params_last is None:
      return run(params)
    return jax.lax.cond(t[0] == last_t, lambda: run(params_last), lambda: run(params))

  b = low_up.shape[0]
  return samplers.sample(model_fn, schedule, rng, shape=(b, size, size, cfg.in_channels), sampler=sampler,
                         prediction_type=prediction_type, variance_type=variance_type or denoising.variance_type(cfg),
                         finish=denoising.clip_images, **sampler_kwargs)


def sampler_from_export(export: contract.UpsamplerExport, options: contract.StageOptions):
  """sample(params, rng, low_res, part=None) -> images [B, R, R, 3]: the exported upsampler sampled as `options`
  say (unguided: its guidance_scale is not used). Params of a params_last export are its
  {"first", "last"} pair. Jit it."""
  d = export.diffusion
  fn = functools.partial(
      sample, cfg=export.model, schedule=d.make_schedule(options.num_steps, options.spacing), size=export.resolution,
      sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
      dynamic_threshold=options.dynamic_threshold, prediction_type=d.prediction_type, variance_type=d.variance_type)
  if not export.params_last:
    return fn
  return lambda params, **kwargs: fn(params["first"], params_last=params["last"], **kwargs)


def sampling_options(config) -> contract.StageOptions:
  """How a training config's sample grids (and the AOT tool's sampling loop) sample: its
  sample_steps, sampler, sample_spacing and clip_range, or 25 DDIM steps."""
  return contract.StageOptions(config.get("sample_steps", 25), config.get("sampler", "ddim"),
                               clip_range=config.get("clip_range", 1.0),
                               spacing=config.get("sample_spacing", "linspace"))


def add_low_res(example: dict, *, augmentation: str, low_res_resolution: int, seed: int) -> dict:
  """One example's degraded low-res input (uint8 [r, r, 3]), seeded by (seed, its global position):
  what the data workers run (loader.host_batches' example_fn)."""
  low = degradations.make_low_res(example["image"], augmentation, low_res_resolution, (seed, int(example["index"])))
  return dict(example, low_res=low)


def example_fn(config):
  """The per-example work this stage hands the data workers."""
  return functools.partial(add_low_res, augmentation=config.augmentation,
                           low_res_resolution=config.low_res_resolution, seed=config.seed)


class UpsamplerStage:
  """Trains an upsampler on (degraded low-res, high-res) pairs made on the host.

  The corruption (none / blur / BSR, unclip_jax/data/degradations.py) runs in
  the input pipeline, seeded by each example's stream index, so it is the
  same on every resume and every host count.
  """
  grid_columns = 6  # two [low-res, sample, target] triplets per row

  def __init__(self, config, eval_batch: dict):
    self.config = config
    diffusion = contract.Diffusion.from_config(config.diffusion)
    self.unet_config = unet_lib.UNetConfig.from_dict(dict(
        config.model.to_dict(), in_channels=3, low_res_channels=3,
        out_channels=denoising.out_channels(3, diffusion.variance_type),
        dtype=config.get("compute_dtype", "float32"))).validate()
    self.export_config = contract.UpsamplerExport(config.stage, self.unet_config, config.resolution,
                                                  config.low_res_resolution, diffusion, config.augmentation)
    self.schedule = diffusion.make_schedule()
    self.sampling = sampling_options(config)
    self._loss = functools.partial(training_loss, cfg=self.unet_config, schedule=self.schedule,
                                   crop_fraction=config.get("crop_fraction", 0.25),
                                   prediction_type=diffusion.prediction_type,
                                   min_snr_gamma=config.get("min_snr_gamma") or None)
    n = config.get("num_sample_images", 8)
    self.eval = {k: v[:n] for k, v in self.encode_batch(eval_batch).items()}

  def init_params(self, rng):
    return unet_lib.init_params(self.unet_config, rng)

  def loss(self, params, batch, rng):
    return self._loss(params, batch, rng)

  def encode_batch(self, host_batch):
    """The low-res input comes degraded from the data workers (example_fn); a source that does
    not run it (the Shapes world, the AOT tool's zeros) is degraded here, identically."""
    image = np.asarray(host_batch["image"])
    if "low_res" in host_batch:
      low = np.asarray(host_batch["low_res"])
    else:
      make = example_fn(self.config)
      low = np.stack([make({"image": im, "index": i})["low_res"]
                      for im, i in zip(image, host_batch["index"], strict=True)])
    return {"image": imaging.to_model_range(image), "low_res": imaging.to_model_range(low)}

  def sample_images(self, params, rng):
    """Upsampled fixed low-res images: [low-res (nearest), sample, target] per example."""
    low = jnp.asarray(self.eval["low_res"])
    out = np.asarray(sampler_from_export(self.export_config, self.sampling)(params, rng=rng, low_res=low))
    factor = self.config.resolution // self.config.low_res_resolution
    nearest = np.repeat(np.repeat(np.asarray(low), factor, axis=1), factor, axis=2)
    rows = np.stack([nearest, out, self.eval["image"]], axis=1).reshape((-1,) + out.shape[1:])
    return imaging.to_uint8(rows)

  def inference_config(self):
    return self.export_config.to_json()
