"""The unCLIP pipeline: text -> z_t -> prior -> z_i -> decoder -> upsamplers,
and the paper's applications on top of the decoder half: variations,
interpolations and text diffs of images.

An inference checkpoint is a folder with one export per stage (as train.py
writes them) and the CLIP folder:

  CHECKPOINT/pipeline.json        {"clip": "clip", "prior": "prior", "decoder": "decoder",
                                   "sr1": "sr1", "sr2": "sr2",    (sr1 and sr2 optional)
                                   "options": {"decoder": {"num_steps": 25, ...}, ...}}  (optional)
  CHECKPOINT/clip/                a Hugging Face CLIP folder
  CHECKPOINT/prior/ ...           train.py exports (config.json + params/)

A stage whose config says "params_last": true holds params {"first", "last"}:
"last" runs the chain's final step (Karlo's super_res_last; see
unclip_jax/convert/diffusers_pipeline.py). The prior is optional: without it
the checkpoint serves the image applications only.

"options" holds the sampling settings the checkpoint's author recommends
(StageOptions fields per stage, each stage's over the "karlo" preset's); they
are the pipeline's `default_options`.

Every stage's sampler is one compiled loop. Each image has its own seed, from
which all its noise (x_T and every step, in every stage) is drawn, so an
image does not depend on the batch it is drawn in or on the number of devices.
"""

import dataclasses
import functools
import json
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unclip_jax import checkpoints, imaging, paths
from unclip_jax.diffusion import samplers, schedules
from unclip_jax.diffusion.slerp import slerp
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage
from unclip_jax.stages import upsampler as upsampler_stage

PIPELINE_FILE = "pipeline.json"
STAGES = ("prior", "decoder", "sr1", "sr2")


@dataclasses.dataclass(frozen=True)
class StageOptions:
  """How one stage samples."""
  num_steps: int
  sampler: str = "ddpm"  # ddpm | ddim
  eta: float = 0.0  # DDIM only
  guidance_scale: float = 1.0  # prior and decoder; 1 = no guidance
  clip_range: float | None = 1.0  # static x_0 clamp (prior: in its normalised space)
  dynamic_threshold: float | None = None  # Imagen's quantile p (images only)


PRESETS = {
    # Table 3's sampling steps; guidance as the paper's figures use it.
    "paper": {"prior": StageOptions(64, "ddpm", guidance_scale=4.0, clip_range=5.0),
              "decoder": StageOptions(250, "ddpm", guidance_scale=3.0),
              "sr1": StageOptions(27, "ddim"), "sr2": StageOptions(15, "ddim")},
    # Karlo / diffusers' UnCLIPPipeline defaults.
    "karlo": {"prior": StageOptions(25, "ddpm", guidance_scale=4.0, clip_range=5.0),
              "decoder": StageOptions(25, "ddpm", guidance_scale=8.0),
              "sr1": StageOptions(7, "ddpm"), "sr2": StageOptions(7, "ddpm")},
}


class CheckpointError(ValueError):
  """An inference checkpoint is missing or does not fit the pipeline."""


class InputError(ValueError):
  """Arguments an application cannot work with (too few frames, captions without a difference, ...)."""


def _cast_floats(tree, dtype):
  return jax.tree.map(lambda x: np.asarray(x, dtype) if np.issubdtype(np.asarray(x).dtype, np.floating) else x, tree)


def _read_stage(folder: str, stage: str):
  try:
    params, config = checkpoints.load_inference(folder)
  except FileNotFoundError as e:
    raise CheckpointError(f"{stage}: {e}") from e
  params = _cast_floats(params, np.float32)  # a checkpoint may store float16 (assemble's param_dtype)
  if config.get("stage") != stage:
    raise CheckpointError(f"{folder!r} holds a {config.get('stage')!r} export, expected {stage!r}.")
  return params, config


def _check_clip_fits(configs: dict, clip, clip_path: str):
  """The prior's and decoder's CLIP widths against the CLIP's: a mismatch is a one-line error here,
  not a shape error deep inside the first sampling call."""
  have = {"embedding width": clip.embed_dim, "token width": clip.text_width, "tokens": clip.max_length}
  wants = {}
  if "prior" in configs:  # the configs' own defaults apply (e.g. a token width of None means clip_dim)
    prior = prior_lib.PriorConfig(**configs["prior"]["model"])
    wants["prior"] = {"embedding width": prior.clip_dim, "token width": prior.text_width or prior.clip_dim,
                      "tokens": prior.num_text_tokens}
  text_proj = unet_lib.UNetConfig.from_dict(configs["decoder"]["model"]).text_proj
  if text_proj:
    wants["decoder"] = {"embedding width": text_proj.clip_dim, "token width": text_proj.text_dim or text_proj.clip_dim}
  for stage, want in wants.items():
    wrong = [f"{k} {v} (the CLIP has {have[k]})" for k, v in want.items() if v != have[k]]
    if wrong:
      raise CheckpointError(f"The {stage} does not fit the CLIP at {clip_path!r}: it expects {', '.join(wrong)}.")


def stage_options(stage: str, fields, base: StageOptions | None = None) -> StageOptions:
  """StageOptions from a StageOptions or a dict of its fields (the others from base, default Karlo's)."""
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r} in sampling options; expected one of {STAGES}.")
  if isinstance(fields, StageOptions):
    return fields
  if not isinstance(fields, dict):
    raise ValueError(f"Sampling options for {stage!r} must be a dict of StageOptions fields, got {fields!r}.")
  known = {f.name for f in dataclasses.fields(StageOptions)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"Unknown sampling option(s) {unknown} for {stage!r}; StageOptions has {sorted(known)}.")
  options = dataclasses.replace(base or PRESETS["karlo"][stage], **fields)
  if options.sampler not in ("ddpm", "ddim") or options.num_steps < 1:
    raise ValueError(f"Bad sampling options for {stage!r}: {options}.")
  return options


def assemble(path: str, options: dict | None = None, param_dtype: str | None = None, **folders: str) -> str:
  """Copies a CLIP folder and stage exports (clip=, prior=, decoder=, sr1=, sr2=) into one checkpoint.

  Any of the folders may be a URI (gs://, file://).

  options: the recommended sampling settings, {stage: StageOptions or dict of
  its fields}, written to pipeline.json (Pipeline.load reads them back as
  default_options). param_dtype (e.g. "float16") stores the stages' float
  params in that dtype, to halve a checkpoint that ships in a repository;
  Pipeline.load computes in float32 whatever the stored dtype.
  """
  unknown = set(folders) - {"clip", *STAGES}
  if unknown:
    raise ValueError(f"Unknown stage folders {sorted(unknown)}.")
  layout = {name: name for name in folders}
  if options:
    for stage, fields in options.items():
      stage_options(stage, fields)  # fail here, not at load time
    # A dict keeps only its own fields, so the others follow Karlo's defaults when loaded.
    layout["options"] = {stage: dict(fields) if isinstance(fields, dict) else dataclasses.asdict(fields)
                         for stage, fields in options.items()}
  root = paths.as_path(path)
  root.mkdir(parents=True, exist_ok=True)
  for name, folder in folders.items():
    if name == "clip" or param_dtype is None:
      paths.copy_tree(folder, root / name)
    else:
      params, config = checkpoints.load_inference(folder)
      checkpoints.export_inference(root / name, _cast_floats(params, param_dtype), config)
  (root / PIPELINE_FILE).write_text(json.dumps(layout, indent=2))
  return path


def stage_keys(seeds: Sequence[int], stage_index: int):
  """Per-image keys of one stage: fold_in(key(seed), stage)."""
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stage_index))(jnp.asarray(seeds, jnp.uint32))


class Pipeline:
  """A loaded unCLIP stack; see `load`.

  Text to image: `text_to_image` (prior, then `decode`). The paper's
  applications work on images through CLIP's image embeddings z_i and the
  decoder: `variations`, `interpolate`, `text_diff`; `image_embeddings` and
  `invert` (DDIM inversion through the decoder) are their building blocks.
  Images come in as uint8 [H, W, 3] arrays (any size) or image file paths.
  Every method that samples takes `options` ({stage: StageOptions}, merged
  over `default_options`) and returns uint8 images, or floats in [-1, 1] with
  as_float=True.
  """

  # Fixed-point iterations per DDIM inversion step (samplers.ddim_invert); 0 is plain inversion.
  inversion_iters = 8

  def __init__(self, clip, stages: dict, stage_configs: dict, mesh=None, progress: bool = False,
               default_options: dict | None = None):
    self.clip = clip
    self.params = stages
    self.configs = stage_configs
    self.mesh = mesh
    self.progress = progress
    # The checkpoint's recommended settings over Karlo's (text_to_image etc. use them when options is None).
    self.default_options = dict(PRESETS["karlo"])
    self.default_options.update({stage: stage_options(stage, fields)
                                 for stage, fields in (default_options or {}).items()})
    # No prior: a checkpoint for the image applications alone (e.g. Karlo's image-variations).
    self.prior_model = (prior_lib.DiffusionPrior(prior_lib.PriorConfig(**stage_configs["prior"]["model"]))
                        if "prior" in stage_configs else None)
    self.decoder_cfg = unet_lib.UNetConfig.from_dict(stage_configs["decoder"]["model"])
    self.sr_cfgs = {s: unet_lib.UNetConfig.from_dict(stage_configs[s]["model"]) for s in ("sr1", "sr2")
                    if s in stage_configs}
    empty = clip.encode_text([""])
    self.uncond_prior = prior_stage.text_conditioning(empty)
    self.uncond_decoder = {"text_embed": empty.embedding[0], "text_tokens": empty.tokens[0],
                           "text_mask": empty.mask[0]}
    if mesh is not None:  # params and the unconditional text on every device
      replicated = NamedSharding(mesh, P())
      self.params, self.uncond_prior, self.uncond_decoder = jax.device_put(
          (self.params, self.uncond_prior, self.uncond_decoder), replicated)

  @classmethod
  def load(cls, path: str, clip_dir: str | None = None, mesh=None, progress: bool = False) -> "Pipeline":
    """Reads CHECKPOINT/pipeline.json and each stage's export; clear errors if any is missing.

    path (and clip_dir) may be a URI: gs://, file://."""
    root = paths.as_path(path)
    layout_file = root / PIPELINE_FILE
    if not layout_file.is_file():
      raise CheckpointError(f"{path!r} is not an unCLIP checkpoint: no {PIPELINE_FILE} (expected "
                            f"{{\"clip\": ..., \"prior\": ..., \"decoder\": ..., \"sr1\": ...}} naming stage folders).")
    layout = json.loads(layout_file.read_text())
    missing = [k for k in ("decoder",) if k not in layout]
    if missing:
      raise CheckpointError(f"{layout_file} names no {missing} folder.")
    try:
      default_options = {stage: stage_options(stage, fields) for stage, fields in layout.get("options", {}).items()}
    except (ValueError, TypeError, AttributeError) as e:
      raise CheckpointError(f"{layout_file}: bad \"options\": {e}") from e
    clip_path = clip_dir or os.fspath(root / layout.get("clip", "clip"))
    try:
      clip = clip_lib.load_clip(clip_path)
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointError(f"CLIP: {e}") from e
    params, configs = {}, {}
    for stage in STAGES:
      if stage in layout:
        params[stage], configs[stage] = _read_stage(os.fspath(root / layout[stage]), stage)
    _check_clip_fits(configs, clip, clip_path)
    return cls(clip, params, configs, mesh=mesh, progress=progress, default_options=default_options)

  @property
  def stages(self) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in self.params)

  @property
  def decoder_resolution(self) -> int:
    return self.configs["decoder"]["resolution"]

  def options_for(self, mode: str = "text", options: dict | None = None) -> dict:
    """The stage options a mode samples with: options over default_options, then
    - variations: the decoder runs DDIM with eta = 1 unless options sets "decoder";
    - interpolate, textdiff: the decoder always runs DDIM with eta = 0 (its steps,
      guidance and clamp are kept), so that a frame is a deterministic function of
      its z_i and x_T.
    """
    options = options or {}
    resolved = dict(self.default_options)
    resolved.update({stage: stage_options(stage, fields, resolved[stage]) for stage, fields in options.items()})
    if mode == "variations" and "decoder" not in options:
      resolved["decoder"] = dataclasses.replace(resolved["decoder"], sampler="ddim", eta=1.0)
    elif mode in ("interpolate", "textdiff"):
      resolved["decoder"] = dataclasses.replace(resolved["decoder"], sampler="ddim", eta=0.0)
    elif mode not in ("text", "variations"):
      raise ValueError(f"Unknown mode {mode!r}; expected text, variations, interpolate or textdiff.")
    return resolved

  # -- one compiled loop per stage ---------------------------------------------------------------

  @functools.lru_cache(maxsize=None)
  def _prior_fn(self, options: StageOptions, num_candidates: int):
    diffusion = self.configs["prior"].get("diffusion", {})
    return jax.jit(functools.partial(
        prior_stage.sample_prior, self.prior_model, num_steps=options.num_steps, sampler=options.sampler,
        eta=options.eta, guidance_scale=options.guidance_scale, clip_range=options.clip_range,
        num_candidates=num_candidates, noise_schedule=diffusion.get("schedule", "cosine"),
        num_train_timesteps=diffusion.get("num_timesteps", 1000),
        progress_desc="prior" if self.progress else None))

  def _decoder_schedule(self, options: StageOptions):
    diffusion = self.configs["decoder"]["diffusion"]
    return schedules.make_schedule(diffusion["schedule"], diffusion["num_timesteps"], options.num_steps)

  @functools.lru_cache(maxsize=None)
  def _decoder_fn(self, options: StageOptions):
    return jax.jit(functools.partial(
        decoder_stage.sample, cfg=self.decoder_cfg, schedule=self._decoder_schedule(options),
        size=self.decoder_resolution, sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
        dynamic_threshold=options.dynamic_threshold, progress_desc="decoder" if self.progress else None))

  @functools.lru_cache(maxsize=None)
  def _invert_fn(self, options: StageOptions, fixed_point_iters: int):
    return jax.jit(functools.partial(
        decoder_stage.invert, cfg=self.decoder_cfg, schedule=self._decoder_schedule(options),
        clip_range=options.clip_range, dynamic_threshold=options.dynamic_threshold,
        fixed_point_iters=fixed_point_iters, progress_desc="inversion" if self.progress else None))

  @functools.lru_cache(maxsize=None)
  def _upsampler_fn(self, stage: str, options: StageOptions):
    config = self.configs[stage]
    diffusion = config["diffusion"]
    schedule = schedules.make_schedule(diffusion["schedule"], diffusion["num_timesteps"], options.num_steps)
    return jax.jit(functools.partial(
        upsampler_stage.sample, cfg=self.sr_cfgs[stage], schedule=schedule, size=config["resolution"],
        sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
        dynamic_threshold=options.dynamic_threshold, prediction_type=diffusion.get("prediction_type", "eps"),
        progress_desc=stage if self.progress else None))

  # -- batches over devices -----------------------------------------------------------------------

  def _shard(self, tree):
    """Batch-split over the mesh's devices (the batch is padded to divide by their number)."""
    if self.mesh is None:
      return tree
    sharding = NamedSharding(self.mesh, P(self.mesh.axis_names))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

  def _padded(self, n: int) -> int:
    devices = 1 if self.mesh is None else self.mesh.devices.size
    return -(-n // devices) * devices

  @staticmethod
  def _pad(x, total: int):
    """A list or an array [n, ...] padded to `total` rows by repeating its last."""
    if isinstance(x, list):
      return x + [x[-1]] * (total - len(x))
    x = np.asarray(x)
    return np.concatenate([x, np.repeat(x[-1:], total - len(x), axis=0)]) if total > len(x) else x

  @staticmethod
  def _output(images, n: int, as_float: bool) -> np.ndarray:
    images = np.asarray(images)[:n]
    return images.astype(np.float32) if as_float else imaging.to_uint8(images)

  # -- text -> image ------------------------------------------------------------------------------

  def text_to_image(self, prompts: Sequence[str], seeds: Sequence[int], options: dict | None = None,
                    num_candidates: int = 2, up_to: str | None = None, as_float: bool = False) -> np.ndarray:
    """Images [N, R, R, 3], image i from prompts[i] and seeds[i]: uint8, or float in [-1, 1] if as_float.

    options: stage -> StageOptions (or a dict of its fields), over
    default_options. up_to stops after that stage (e.g. "decoder" for the 64 px
    images).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds.")
    if self.prior_model is None:
      raise CheckpointError("This checkpoint has no prior: it makes images from images (variations, "
                            "interpolate, textdiff), not from text.")
    options = self.options_for("text", options)
    n = len(prompts)
    total = self._padded(n)
    prompts, seeds = self._pad(list(prompts), total), self._pad(list(seeds), total)
    text = self.clip.encode_text(prompts)
    cond = prior_stage.text_conditioning(text)
    keys = stage_keys(seeds, 0)
    rows = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.arange(num_candidates)))(keys)
    z_i = self._prior_fn(options["prior"], num_candidates)(
        self.params["prior"], self._shard(cond), self.uncond_prior, self._shard(rows.reshape(-1)))
    images = self._decode(z_i, text, seeds, options, None, up_to)
    return self._output(images, n, as_float)

  # -- the decoder half: z_i (+ caption) -> image -------------------------------------------------

  def decode(self, z_i, prompts: str | Sequence[str], seeds: Sequence[int], options: dict | None = None,
             x_T=None, up_to: str | None = None) -> np.ndarray:
    """Float images [N, R, R, 3] in [-1, 1] decoded from CLIP image embeddings z_i [N, D].

    prompts: the decoder's caption per image, or one for all ("" = none, as in
    variations). seeds[i] draws all of image i's noise: its x_T (unless x_T
    [N, r, r, 3] at the decoder's resolution r is given) and every sampler
    step of every stage. options: as in text_to_image, used as given (no mode
    adjustments; see options_for).
    """
    z_i = np.asarray(z_i, np.float32)
    n = len(z_i)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if not len(prompts) == len(seeds) == n:
      raise ValueError(f"{n} embeddings, {len(prompts)} prompts and {len(seeds)} seeds: one each per image.")
    options = self.options_for("text", options)
    total = self._padded(n)
    text = self.clip.encode_text(self._pad(prompts, total))
    if x_T is not None:
      x_T = self._pad(np.asarray(x_T, np.float32), total)
    images = self._decode(self._pad(z_i, total), text, self._pad(list(seeds), total), options, x_T, up_to)
    return np.asarray(images)[:n]

  def _decode(self, z_i, text, seeds, options: dict, x_T, up_to: str | None):
    """decode on a batch already padded to the devices."""
    cond = self._shard({"image_embed": z_i, "text_embed": text.embedding, "text_tokens": text.tokens,
                        "text_mask": text.mask})
    images = self._decoder_fn(options["decoder"])(
        self.params["decoder"], rng=self._shard(stage_keys(seeds, 1)), cond=cond, uncond=self.uncond_decoder,
        guidance_scale=options["decoder"].guidance_scale, x_T=None if x_T is None else self._shard(x_T))
    for index, stage in enumerate(("sr1", "sr2"), start=2):
      if up_to in STAGES[:index] or stage not in self.params:
        break
      params, extra = self.params[stage], {}
      if self.configs[stage].get("params_last"):  # Karlo: super_res_last runs the chain's final step
        params, extra = params["first"], {"params_last": params["last"]}
      images = self._upsampler_fn(stage, options[stage])(
          params, rng=self._shard(stage_keys(seeds, index)), low_res=images, **extra)
    return images

  def initial_noise(self, seeds: Sequence[int]) -> np.ndarray:
    """The decoder's x_T [N, r, r, 3] for these seeds: what decode draws when given no x_T."""
    shape = (len(seeds), self.decoder_resolution, self.decoder_resolution, self.decoder_cfg.in_channels)
    return np.asarray(samplers.initial_noise(stage_keys(seeds, 1), shape))

  # -- images in ----------------------------------------------------------------------------------

  def _images(self, images) -> np.ndarray:
    """uint8 [N, H, W, 3] from an image path, an array [H, W, 3] / [N, H, W, 3], or a list of them."""
    if isinstance(images, (str, os.PathLike)):
      return imaging.load_image(images)[None]
    if isinstance(images, (list, tuple)):
      loaded = [self._images(x) for x in images]
      if len({x.shape for x in loaded}) > 1:
        raise imaging.ImageError(f"Images of different sizes {[x.shape[1:3] for x in loaded]} in one batch; "
                                 "pass them one at a time.")
      return np.concatenate(loaded)
    return imaging.check_images(images)

  def image_embeddings(self, images) -> np.ndarray:
    """CLIP image embeddings z_i [N, D] (as CLIP makes them: projected, not unit-norm) of uint8 images
    [N, H, W, 3] of any size (CLIP resizes the shortest side and centre-crops), or of image paths."""
    return np.asarray(self.clip.encode_image(self._images(images), value_range=(0, 255)), np.float32)

  def invert(self, images, z_i=None, prompts: str | Sequence[str] = "", options: dict | None = None,
             fixed_point_iters: int | None = None) -> np.ndarray:
    """DDIM inversion: the x_T [N, r, r, 3] from which the decoder, run with DDIM eta = 0, makes the
    images again (shortest side resized to the decoder's resolution r, centre-cropped).

    The chain is inverted through the same guided model function the decode
    uses: the decoder under each image's own z_i (default: its CLIP
    embedding) and `prompts` (default: none), with options["decoder"]'s
    steps, guidance scale and x_0 clamp. fixed_point_iters (default
    inversion_iters) makes the round trip exact up to the fixed point's
    convergence (samplers.ddim_invert); 0 is the usual approximate inversion.
    """
    images = self._images(images)
    n = len(images)
    z_i = self.image_embeddings(images) if z_i is None else np.asarray(z_i, np.float32)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    decoder = self.options_for("textdiff", options)["decoder"]
    iters = self.inversion_iters if fixed_point_iters is None else fixed_point_iters
    x0 = imaging.to_model_range(imaging.square(images, self.decoder_resolution))
    total = self._padded(n)
    text = self.clip.encode_text(self._pad(prompts, total))
    cond = self._shard({"image_embed": self._pad(z_i, total), "text_embed": text.embedding,
                        "text_tokens": text.tokens, "text_mask": text.mask})
    x_T = self._invert_fn(decoder, iters)(self.params["decoder"], images=self._shard(self._pad(x0, total)),
                                          cond=cond, uncond=self.uncond_decoder,
                                          guidance_scale=decoder.guidance_scale)
    return np.asarray(x_T)[:n]

  # -- the paper's applications (section 3) -------------------------------------------------------

  def variations(self, image, seeds: Sequence[int], options: dict | None = None, up_to: str | None = None,
                 as_float: bool = False) -> np.ndarray:
    """Variations of one image [len(seeds), R, R, 3]: its z_i decoded without a caption, one image per
    seed. The decoder samples with DDIM eta = 1 unless options sets "decoder" (options_for)."""
    images = self._images(image)
    if len(images) != 1:
      raise imaging.ImageError(f"variations takes one image, got {len(images)}; call it once per image.")
    seeds = list(seeds)
    z_i = np.repeat(self.image_embeddings(images), len(seeds), axis=0)
    out = self.decode(z_i, "", seeds, self.options_for("variations", options), up_to=up_to)
    return self._output(out, len(seeds), as_float)

  def interpolate(self, image_a, image_b, num_frames: int, seed: int = 0, options: dict | None = None,
                  noise: str = "fixed", up_to: str | None = None, as_float: bool = False,
                  fixed_point_iters: int | None = None) -> np.ndarray:
    """num_frames images [F, R, R, 3] between two images, frame k at theta = linspace(0, 1, F)[k]:
    z_theta = slerp(z_a, z_b, theta) (direction on the sphere, norm linearly), decoded without a
    caption by DDIM eta = 0 from x_T(theta), where noise is
    - "fixed": every frame starts from the x_T of `seed` (initial_noise), so the end frames
      are exactly decode(z_a) and decode(z_b) with that seed;
    - "slerp": x_T(theta) = slerp(invert(a), invert(b), theta), each image DDIM-inverted under its
      own z_i, so the end frames reconstruct the two images.
    `seed` also draws the upsamplers' noise, the same for every frame.
    """
    if num_frames < 2:
      raise InputError(f"num_frames must be at least 2 (the two end frames), got {num_frames}.")
    if noise not in ("fixed", "slerp"):
      raise InputError(f"noise must be 'fixed' or 'slerp', got {noise!r}.")
    images = [self._images(image_a), self._images(image_b)]
    for name, x in zip(("image_a", "image_b"), images):
      if len(x) != 1:
        raise imaging.ImageError(f"{name} must be one image, got {len(x)}.")
    options = self.options_for("interpolate", options)
    z_a, z_b = (self.image_embeddings(x)[0] for x in images)
    thetas = np.linspace(0.0, 1.0, num_frames)
    if noise == "fixed":
      x_T = np.repeat(self.initial_noise([seed]), num_frames, axis=0)
    else:
      x_a, x_b = (self.invert(x, z[None], options=options, fixed_point_iters=fixed_point_iters)[0]
                  for x, z in zip(images, (z_a, z_b)))
      x_T = slerp(x_a, x_b, thetas)
    out = self.decode(slerp(z_a, z_b, thetas), "", [seed] * num_frames, options, x_T=x_T, up_to=up_to)
    return self._output(out, num_frames, as_float)

  def text_diff(self, image, source_prompt: str, target_prompt: str, thetas: Sequence[float],
                options: dict | None = None, seed: int = 0, up_to: str | None = None, as_float: bool = False,
                fixed_point_iters: int | None = None) -> np.ndarray:
    """The image edited toward a caption change, one frame per theta [T, R, R, 3] (paper, section 3.3).

    x_T = invert(image) under its own z_i and no caption (the inversion runs
    the decode's own guided model function: same steps, guidance scale and
    clamp, so theta = 0 reconstructs the image). The text diff
    z_d = normalize(z_t(target) - z_t(source)) is scaled to |z_i| (z_i is not
    unit-norm here, and the decoder was trained on CLIP's raw norms), and each
    frame decodes z_theta = slerp(z_i, |z_i| z_d, theta) without a caption by
    DDIM eta = 0 from that x_T. The paper uses theta up to about 0.5. `seed`
    draws the upsamplers' noise, the same for every frame.
    """
    images = self._images(image)
    if len(images) != 1:
      raise imaging.ImageError(f"text_diff takes one image, got {len(images)}.")
    thetas = np.asarray(thetas, np.float64).reshape(-1)
    options = self.options_for("textdiff", options)
    z_i = self.image_embeddings(images)[0]
    z_t = np.asarray(self.clip.encode_text([source_prompt, target_prompt]).embedding, np.float64)
    diff = z_t[1] - z_t[0]
    if np.linalg.norm(diff) < 1e-6 * np.linalg.norm(z_t[0]):
      raise InputError(f"The source and target captions have the same CLIP embedding ({source_prompt!r}, "
                       f"{target_prompt!r}): there is no direction to move in.")
    z_d = diff / np.linalg.norm(diff) * np.linalg.norm(z_i)
    x_T = self.invert(images, z_i[None], options=options, fixed_point_iters=fixed_point_iters)
    out = self.decode(slerp(z_i, z_d.astype(np.float32), thetas), "", [seed] * len(thetas), options,
                      x_T=np.repeat(x_T, len(thetas), axis=0), up_to=up_to)
    return self._output(out, len(thetas), as_float)


def slug(text: str, limit: int = 40) -> str:
  """A file-name-safe form of a caption (or file stem): lower case, runs of other characters -> "_"."""
  kept = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
  return "_".join(filter(None, kept.split("_")))[:limit] or "unconditional"


def write_outputs(out_dir: str, images: np.ndarray, jobs: Sequence[tuple[str, int]], options: dict,
                  settings: dict, extras: Sequence[dict] | None = None, names: Sequence[str] | None = None,
                  grid_columns: int | None = None) -> list[str]:
  """One PNG per image with a same-named JSON, and one grid PNG.

  jobs[i] = (prompt, seed) of image i. Its JSON holds prompt, seed, every
  stage's options, `settings` and extras[i] (per-image fields, e.g. frame and
  theta). names[i] is its file stem (default PROMPT_seedN). Returns the written
  image paths, the grid last.
  """
  import time

  if extras is not None and len(extras) != len(images) or names is not None and len(names) != len(images):
    raise ValueError(f"{len(images)} images need as many extras and names.")
  out = paths.as_path(out_dir)  # a local folder or a URI (gs://, file://)
  out.mkdir(parents=True, exist_ok=True)
  stage_options = {s: dataclasses.asdict(o) for s, o in options.items()}
  written = []
  for i, (image, (prompt, seed)) in enumerate(zip(images, jobs)):
    stem = os.fspath(out / (names[i] if names else f"{slug(prompt)}_seed{seed}"))
    imaging.save_png(image, stem + ".png")
    paths.as_path(stem + ".json").write_text(json.dumps(
        {"prompt": prompt, "seed": seed, **(extras[i] if extras else {}), "options": stage_options, **settings},
        indent=2))
    written.append(stem + ".png")
  grid_path = os.fspath(out / f"grid_{time.strftime('%Y%m%d-%H%M%S')}_seed{jobs[0][1]}.png")
  imaging.save_png(imaging.make_grid(images, columns=grid_columns), grid_path)
  return written + [grid_path]
