"""What a stage's training hands its sampling (every stage but the CLIP).

An export (train.py's WORKDIR/export, a checkpoint's stage folder) is the
params and a config.json, the stage's record below as JSON: each stage writes
its record (inference_config) and builds its sampling loop from one (its
module's sampler_from_export), so the two sides cannot disagree about a key.
`read` turns a config.json back into a record; it is the one place that knows
how older exports spelled things. StageOptions are the settings of one
sampling run (the pipeline's options, a training run's sample grids).
"""

import dataclasses

from unclip_jax.diffusion import gaussian, schedules
from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet_config
from unclip_jax.stages import SAMPLING_STAGES, UPSAMPLERS, denoising


@dataclasses.dataclass(frozen=True)
class StageOptions:
  """How one stage samples."""
  num_steps: int
  sampler: str = "ddpm"  # ddpm | ddim | dpmpp_2m | dpmpp_3m (diffusion/samplers.SAMPLERS)
  eta: float = 0.0  # DDIM only
  guidance_scale: float = 1.0  # prior and decoder; 1 = no guidance
  clip_range: float | None = 1.0  # static x_0 clamp (prior: in its normalised space)
  dynamic_threshold: float | None = None  # Imagen's quantile p (images only)
  spacing: str = "linspace"  # the respaced timesteps: linspace | stride | logsnr (diffusion/schedules.SPACINGS)


@dataclasses.dataclass(frozen=True)
class Diffusion:
  """The forward process a network was trained on, and how its output is read."""
  schedule: str = "cosine"  # cosine | linear
  num_timesteps: int = 1000
  prediction_type: str = "eps"  # eps | x0 | v
  variance_type: str = "fixed_small"  # fixed_small | fixed_large | learned_range (a variance output)

  def __post_init__(self):
    if self.prediction_type not in gaussian.PREDICTION_TYPES:
      raise ValueError(f"Unknown prediction_type {self.prediction_type!r}; expected one of "
                       f"{gaussian.PREDICTION_TYPES}.")
    if self.variance_type not in gaussian.VARIANCE_TYPES:
      raise ValueError(f"Unknown variance_type {self.variance_type!r}; expected one of {gaussian.VARIANCE_TYPES}.")

  @classmethod
  def from_config(cls, diffusion, **defaults) -> "Diffusion":
    """A training config's `diffusion` block over the stage's defaults; an unknown key is an error."""
    fields = dict(defaults, **diffusion)
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
      raise ValueError(f"Unknown diffusion config keys {unknown}.")
    return cls(**fields)

  def make_schedule(self, num_steps: int | None = None, spacing: str = "linspace") -> schedules.Schedule:
    """The training schedule, or its respacing to num_steps for sampling."""
    return schedules.make_schedule(self.schedule, self.num_timesteps, num_steps, spacing)


def _check_unet(model: unet_config.UNetConfig, diffusion: Diffusion):
  if (diffusion.variance_type == "learned_range") != (denoising.variance_type(model) == "learned_range"):
    raise ValueError(f"variance_type {diffusion.variance_type!r} does not fit a U-Net with {model.in_channels} "
                     f"input and {model.out_channels} output channels (learned_range needs twice as many).")


@dataclasses.dataclass(frozen=True)
class PriorExport:
  model: prior_lib.PriorConfig
  diffusion: Diffusion = Diffusion(prediction_type="x0")
  dtype: str = "float32"  # what sampling computes in (a U-Net's is its model's dtype)
  stage = "prior"

  def __post_init__(self):
    if self.diffusion.variance_type == "learned_range":
      raise ValueError("The prior predicts no variance: its variance_type is fixed_small or fixed_large.")

  def to_json(self) -> dict:
    return {"stage": self.stage, "model": dataclasses.asdict(self.model),
            "diffusion": dataclasses.asdict(self.diffusion), "dtype": self.dtype}

  def with_dtype(self, dtype: str) -> "PriorExport":
    return dataclasses.replace(self, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class ARPriorExport:
  """The autoregressive prior: its network and codebook sizes (the codebook itself is in its params)."""
  model: ar_lib.ARPriorConfig
  dtype: str = "float32"  # what sampling computes in
  stage = "ar_prior"

  def to_json(self) -> dict:
    return {"stage": self.stage, "model": dataclasses.asdict(self.model), "dtype": self.dtype}

  def with_dtype(self, dtype: str) -> "ARPriorExport":
    return dataclasses.replace(self, dtype=dtype)


@dataclasses.dataclass(frozen=True)
class DecoderExport:
  model: unet_config.UNetConfig
  resolution: int  # of its images
  diffusion: Diffusion = Diffusion()
  stage = "decoder"

  def __post_init__(self):
    _check_unet(self.model, self.diffusion)

  def to_json(self) -> dict:
    return {"stage": self.stage, "model": self.model.to_dict(), "resolution": self.resolution,
            "diffusion": dataclasses.asdict(self.diffusion)}

  def with_dtype(self, dtype: str) -> "DecoderExport":
    return dataclasses.replace(self, model=dataclasses.replace(self.model, dtype=dtype))


@dataclasses.dataclass(frozen=True)
class UpsamplerExport:
  stage: str  # sr1 | sr2
  model: unet_config.UNetConfig
  resolution: int  # of its images
  low_res_resolution: int  # of the images it was trained to upsample
  diffusion: Diffusion = Diffusion()
  augmentation: str | None = None  # the low-res corruption it was trained on (a record; sampling reads none)
  params_last: bool = False  # Karlo's: params {"first", "last"}, "last" running the chain's final step

  def __post_init__(self):
    if self.stage not in UPSAMPLERS:
      raise ValueError(f"An upsampler export is {' or '.join(UPSAMPLERS)}, not {self.stage!r}.")
    _check_unet(self.model, self.diffusion)

  def to_json(self) -> dict:
    return {"stage": self.stage, "model": self.model.to_dict(), "resolution": self.resolution,
            "low_res_resolution": self.low_res_resolution, "diffusion": dataclasses.asdict(self.diffusion),
            "augmentation": self.augmentation, "params_last": self.params_last}

  def with_dtype(self, dtype: str) -> "UpsamplerExport":
    return dataclasses.replace(self, model=dataclasses.replace(self.model, dtype=dtype))


StageExport = PriorExport | ARPriorExport | DecoderExport | UpsamplerExport


def read(config: dict) -> StageExport:
  """An export's config.json as its stage's record, whichever version wrote it.

  Older exports may lack diffusion keys: they take what those versions sampled
  with (the prior: x0 prediction; variance fixed_small, or learned_range for a
  U-Net with a variance output). Karlo conversions spell the fixed variance
  "fixed_small_log" (diffusers' name for the same variance) and carry
  "clip_sample_range" (the x_0 clamp, which pipeline.json's options hold).
  Raises ValueError (KeyError, TypeError for a missing or unknown key).
  """
  stage = config.get("stage")
  if stage not in SAMPLING_STAGES:
    raise ValueError(f"An export of stage {stage!r}; expected one of {SAMPLING_STAGES}.")
  if stage == "ar_prior":
    return ARPriorExport(ar_lib.ARPriorConfig(**config["model"]), config.get("dtype", "float32"))
  diffusion = dict(config.get("diffusion") or {})
  diffusion.pop("clip_sample_range", None)
  if diffusion.get("variance_type") == "fixed_small_log":
    diffusion["variance_type"] = "fixed_small"
  if stage == "prior":
    return PriorExport(prior_lib.PriorConfig(**config["model"]),
                       Diffusion.from_config(diffusion, prediction_type="x0"), config.get("dtype", "float32"))
  model = unet_config.UNetConfig.from_dict(config["model"])
  diffusion = Diffusion.from_config(diffusion, variance_type=denoising.variance_type(model))
  if stage == "decoder":
    return DecoderExport(model, config["resolution"], diffusion)
  return UpsamplerExport(stage, model, config["resolution"], config["low_res_resolution"], diffusion,
                         config.get("augmentation"), config.get("params_last", False))
