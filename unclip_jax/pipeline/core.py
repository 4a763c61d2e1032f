"""The Pipeline: a loaded unCLIP stack that runs text -> z_t -> prior -> z_i ->
decoder -> upsamplers, and the building blocks of the image applications
(applications.py): CLIP image embeddings, decoding given z_i (and x_T), DDIM
inversion.

Every stage's sampler is one compiled loop, built from the stage's export by
the stage itself (its sampler_from_export). With progress on, the same loop
runs one step per call, a bar drawn between calls (diffusion/progress.py), so
that it has no host callback and JAX's persistent cache can serve it; a
"compiling STAGE..." line marks each compile. Each image has its own seed, from
which all its noise (x_T and every step, in every stage) is drawn, so an
image does not depend on the batch it is drawn in or on the number of devices.
"""

import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from unclip_jax import imaging, parallel
from unclip_jax.diffusion import progress, samplers
from unclip_jax.pipeline import loading
from unclip_jax.pipeline import options as options_lib
from unclip_jax.pipeline.options import STAGES, StageOptions
from unclip_jax.stages import UPSAMPLERS, ar_prior, decoder, prior, text, upsampler

DTYPES = ("float32", "bfloat16", "float16")

# Each stage's noise is drawn from fold_in(key(seed), stream): these numbers are part of every
# sample's identity (the same seed gives the same image in every version), never to be renumbered.
RNG_STREAMS = {"prior": 0, "decoder": 1, "sr1": 2, "sr2": 3}


def stage_keys(seeds: Sequence[int], stage: str):
  """Per-image keys of one stage: fold_in(key(seed), RNG_STREAMS[stage])."""
  stream = RNG_STREAMS[stage]
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stream))(jnp.asarray(seeds, jnp.uint32))


def read_images(images) -> np.ndarray:
  """uint8 [N, H, W, 3] from an image path, an array [H, W, 3] / [N, H, W, 3], or a list of them."""
  if isinstance(images, (str, os.PathLike)):
    return imaging.load_image(images)[None]
  if isinstance(images, (list, tuple)):
    loaded = [read_images(x) for x in images]
    if len({x.shape for x in loaded}) > 1:
      raise imaging.ImageError(f"Images of different sizes {[x.shape[1:3] for x in loaded]} in one batch; "
                               "pass them one at a time.")
    return np.concatenate(loaded)
  return imaging.check_images(images)


def output(images, n: int, as_float: bool) -> np.ndarray:
  """The first n images, as uint8 or (as_float) float32 in [-1, 1]."""
  images = np.asarray(images)[:n]
  return images.astype(np.float32) if as_float else imaging.to_uint8(images)


def held_in(params: dict, dtype: str) -> dict:
  """Each stage's float params cast to dtype, but a prior's latent stats or codebook (they scale or
  decode every z_i it returns) kept in float32."""
  return {stage: loading.cast_params(p, dtype) for stage, p in params.items()}


def _check_dtype(dtype: str):
  if dtype not in DTYPES:
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")


def _pad(x, total: int):
  """A list or an array [n, ...] padded to `total` rows by repeating its last."""
  if isinstance(x, list):
    return x + [x[-1]] * (total - len(x))
  x = np.asarray(x)
  return np.concatenate([x, np.repeat(x[-1:], total - len(x), axis=0)]) if total > len(x) else x


class Pipeline:
  """A loaded unCLIP stack; see `load`.

  Text to image: `text_to_image`, which is `prior` (captions to CLIP image
  embeddings z_i) then `decode` (z_i to images), each public. The paper's
  applications (pipeline.variations, interpolate, text_diff) work on images
  through CLIP's image embeddings z_i (`image_embeddings`) and the decoder
  (`decode`, `invert`: DDIM inversion). Images come in as uint8 [H, W, 3]
  arrays (any size) or image file paths. Every method that samples takes
  `options` ({stage: StageOptions}, merged over `default_options`).

  Compiled loops are cached per pipeline (and go with it): one per stage and
  set of options.
  """

  # Fixed-point iterations per DDIM inversion step (samplers.ddim_invert); 0 is plain inversion.
  inversion_iters = 8

  def __init__(self, clip, params: dict, exports: dict, mesh=None, progress: bool = False,
               default_options: dict | None = None, dtype: str | None = None, shard_params: bool = False):
    """params, exports: per stage, its params and export record (stages/contract.py); the prior is optional.

    dtype (float32, bfloat16, float16): every stage computes in it and holds its weights in it (the
    prior's latent stats stay float32; so do the noise schedules, which the samplers build in float32);
    None keeps each export's own. mesh: a mesh over this process's devices to batch-split sampling
    over (parallel.sampling_mesh). shard_params: each weight FSDP-split over those devices (all local
    devices without a mesh) instead of whole on each, for stacks that do not fit one device; XLA
    gathers each layer's weights as it runs (activations stay batch-split).
    """
    if dtype is not None:
      _check_dtype(dtype)
      params = held_in(params, dtype)
      exports = {stage: export.with_dtype(dtype) for stage, export in exports.items()}
    if shard_params:  # the batch over every device as before, each weight over the "fsdp" axis
      devices = jax.local_devices() if mesh is None else list(mesh.devices.flat)
      mesh = parallel.make_mesh({"data": 1, "fsdp": -1}, devices=devices)
    self.clip = clip
    self.params = params
    self.exports = exports
    self.mesh = mesh
    self.shard_params = shard_params
    self.progress = progress
    # The checkpoint's recommended settings over Karlo's (text_to_image etc. use them when options is None).
    self.default_options = options_lib.over_karlo(default_options)
    self.uncond = text.unconditional(clip)
    if mesh is not None:  # the unconditional text on every device; params on every device, or split
      shardings = (parallel.param_shardings(self.params, mesh) if shard_params
                   else jax.tree.map(lambda _: NamedSharding(mesh, P()), self.params))
      self.params = jax.device_put(self.params, shardings)
      self.uncond = jax.device_put(self.uncond, NamedSharding(mesh, P()))
    self._compiled = {}

  @classmethod
  def load(cls, path: str, clip_dir: str | None = None, mesh=None, progress: bool = False, dtype: str | None = None,
           shard_params: bool = False, prior: str = "diffusion") -> "Pipeline":
    """Reads CHECKPOINT/pipeline.json, its CLIP and each stage's export (loading.py); clear errors
    (CheckpointError) if any is missing. path (and clip_dir) may be a URI: gs://, file://. prior:
    "diffusion" or "ar" (the checkpoint's autoregressive prior, in the prior's place). dtype,
    shard_params: see __init__."""
    if dtype is not None:
      _check_dtype(dtype)  # before reading anything
    clip, params, exports, default_options = loading.read_checkpoint(path, clip_dir, prior)
    return cls(clip, params, exports, mesh=mesh, progress=progress, default_options=default_options, dtype=dtype,
               shard_params=shard_params)

  @property
  def stages(self) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in self.params)

  @property
  def decoder_resolution(self) -> int:
    return self.exports["decoder"].resolution

  def options_for(self, mode: str = "text", options: dict | None = None) -> dict:
    """The stage options a mode (text, variations, interpolate, textdiff) samples with: options over
    default_options, then the mode's decoder (options.for_mode)."""
    return options_lib.for_mode(mode, options, self.default_options)

  # -- one compiled loop per stage, built by the stage from its export ---------------------------

  def _loop(self, name: str, key: tuple, num_steps: int, build):
    """The stage's jitted chain (cached under key) as a function of its arguments: one call of the
    whole loop, or with progress a step per call under a bar named `name`."""
    if key not in self._compiled:
      fn, announce = build(), self.progress
      split_weights_mesh = self.mesh if self.shard_params else None  # (not self: the cache must not hold it)

      def chain(*args, part=None, **kwargs):
        if announce:
          progress.announce_compile(name, part)  # runs as JAX traces: before each compile
        if split_weights_mesh is None:
          return fn(*args, part=part, **kwargs)
        with parallel.activation_sharding(split_weights_mesh):  # gather the split weights, not the activations
          return fn(*args, part=part, **kwargs)

      self._compiled[key] = jax.jit(chain)
    jitted = self._compiled[key]
    if not self.progress:
      return jitted
    place = progress.commit if self.mesh is None else self._shard
    return lambda *args, **kwargs: progress.run_chain(lambda part: jitted(*args, part=part, **kwargs), num_steps,
                                                      name, place=place)

  def _prior_fn(self, options: StageOptions, num_candidates: int):
    export = self.exports["prior"]
    if export.stage == "ar_prior":  # a step per code (options: its guidance scale)
      return self._loop("prior", ("ar_prior", options.guidance_scale, num_candidates), export.model.num_codes - 1,
                        lambda: ar_prior.sampler_from_export(export, options, num_candidates=num_candidates))
    return self._loop("prior", ("prior", options, num_candidates), options.num_steps,
                      lambda: prior.sampler_from_export(export, options, num_candidates=num_candidates))

  def _decoder_fn(self, options: StageOptions, resample_steps: int = 1):
    return self._loop("decoder", ("decoder", options, resample_steps), options.num_steps,
                      lambda: functools.partial(decoder.sampler_from_export(self.exports["decoder"], options),
                                                resample_steps=resample_steps))

  def _invert_fn(self, options: StageOptions, fixed_point_iters: int):
    return self._loop("inversion", ("invert", options, fixed_point_iters), options.num_steps,
                      lambda: decoder.inverter_from_export(self.exports["decoder"], options,
                                                           fixed_point_iters=fixed_point_iters))

  def _upsampler_fn(self, stage: str, options: StageOptions, resample_steps: int = 1):
    return self._loop(stage, (stage, options, resample_steps), options.num_steps,
                      lambda: functools.partial(upsampler.sampler_from_export(self.exports[stage], options),
                                                resample_steps=resample_steps))

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

  # -- text -> z_i -> image -----------------------------------------------------------------------

  def text_to_image(self, prompts: Sequence[str], seeds: Sequence[int], options: dict | None = None,
                    num_candidates: int = 2, up_to: str | None = None, as_float: bool = False) -> np.ndarray:
    """Images [N, R, R, 3], image i from prompts[i] and seeds[i]: uint8, or float in [-1, 1] if as_float.

    options: stage -> StageOptions (or a dict of its fields), over
    default_options. up_to stops after that stage (e.g. "decoder" for the 64 px
    images). The same images as decode(prior(prompts, seeds), prompts, seeds).
    """
    options, encoding, seeds, n = self._text_batch(prompts, seeds, options)
    z_i = self._prior(encoding, seeds, options["prior"], num_candidates)
    return output(self._decode(z_i, encoding, seeds, options, None, up_to), n, as_float)

  def prior(self, prompts: Sequence[str], seeds: Sequence[int], options: dict | None = None,
            num_candidates: int = 2) -> np.ndarray:
    """CLIP image embeddings z_i [N, D] (float32) that the prior samples for prompts[i], its noise
    drawn from seeds[i]: the best of num_candidates draws by z_t . z_i. text_to_image's first half,
    for editing or mixing z_i before `decode` (e.g. applications.interpolate_captions)."""
    options, encoding, seeds, n = self._text_batch(prompts, seeds, options)
    return np.asarray(self._prior(encoding, seeds, options["prior"], num_candidates))[:n]

  def _text_batch(self, prompts: Sequence[str], seeds: Sequence[int], options: dict | None):
    """(options, CLIP's encoding, seeds, N) of a text batch, padded to the devices."""
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds.")
    if "prior" not in self.exports:
      raise loading.CheckpointError("This checkpoint has no prior: it makes images from images (variations, "
                                    "interpolate, textdiff), not from text.")
    total = self._padded(len(prompts))
    encoding = self.clip.encode_text(_pad(list(prompts), total))
    return self.options_for("text", options), encoding, _pad(list(seeds), total), len(prompts)

  def _prior(self, encoding, seeds, options: StageOptions, num_candidates: int):
    """prior on a batch already padded to the devices: z_i [N, D] on the devices."""
    keys = stage_keys(seeds, "prior")
    rows = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.arange(num_candidates)))(keys)
    return self._prior_fn(options, num_candidates)(
        self.params["prior"], self._shard(text.conditioning(encoding)), self.uncond, self._shard(rows.reshape(-1)))

  # -- the decoder half: z_i (+ caption) -> image -------------------------------------------------

  def decode(self, z_i, prompts: str | Sequence[str], seeds: Sequence[int], options: dict | None = None,
             x_T=None, up_to: str | None = None, known=None, resample_steps: int = 1) -> np.ndarray:
    """Float images [N, R, R, 3] in [-1, 1] decoded from CLIP image embeddings z_i [N, D].

    prompts: the decoder's caption per image, or one for all ("" = none, as in
    variations). seeds[i] draws all of image i's noise: its x_T (unless x_T
    [N, r, r, 3] at the decoder's resolution r is given) and every sampler
    step of every stage. options: as in text_to_image, used as given (no mode
    adjustments; see options_for).

    known = (images uint8 [N, H, W, 3], masks bool [N, H, W], True where painted) inpaints: every
    stage keeps each image's pixels outside its mask (at the stage's resolution: the image's centre
    square, resized) and paints the rest (samplers.sample's RePaint, each step taken resample_steps
    times), so the output equals the image there.
    """
    z_i = np.asarray(z_i, np.float32)
    n = len(z_i)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    if not len(prompts) == len(seeds) == n:
      raise ValueError(f"{n} embeddings, {len(prompts)} prompts and {len(seeds)} seeds: one each per image.")
    options = self.options_for("text", options)
    total = self._padded(n)
    encoding = self.clip.encode_text(_pad(prompts, total))
    if x_T is not None:
      x_T = _pad(np.asarray(x_T, np.float32), total)
    if known is not None:
      known_images, masks = read_images(known[0]), np.asarray(known[1], bool)
      if len(known_images) != n or masks.shape != known_images.shape[:3]:
        raise ValueError(f"known: {len(known_images)} images {known_images.shape[1:3]} and masks {masks.shape} "
                         f"for {n} embeddings; one image and one mask of its size per embedding.")
      known = (_pad(known_images, total), _pad(masks, total))
    images = self._decode(_pad(z_i, total), encoding, _pad(list(seeds), total), options, x_T, up_to, known,
                          resample_steps)
    return np.asarray(images)[:n]

  def _known(self, known, size: int) -> dict:
    """The samplers' known=(x0, keep) at a stage's resolution, for known=(images, masks) (or none)."""
    if known is None:
      return {}
    images, masks = known
    x0 = imaging.to_model_range(imaging.square(images, size))
    mask = imaging.square(np.repeat(masks[..., None].astype(np.uint8) * 255, 3, axis=-1), size)
    keep = (mask[..., :1] < 128).astype(np.float32)
    return {"known": self._shard((x0, keep))}

  def _decode(self, z_i, encoding, seeds, options: dict, x_T, up_to: str | None, known=None, resample_steps: int = 1):
    """decode on a batch already padded to the devices."""
    cond = self._shard(dict(text.conditioning(encoding), z_i=z_i))
    steps = resample_steps if known is not None else 1
    images = self._decoder_fn(options["decoder"], steps)(
        self.params["decoder"], rng=self._shard(stage_keys(seeds, "decoder")), cond=cond, uncond=self.uncond,
        guidance_scale=options["decoder"].guidance_scale, x_T=None if x_T is None else self._shard(x_T),
        **self._known(known, self.decoder_resolution))
    return self._upsample(images, seeds, options, UPSAMPLERS, up_to, known, steps)

  def _upsample(self, images, seeds, options: dict, stages, up_to: str | None, known=None, steps: int = 1):
    """`stages`' upsamplers in turn (until up_to) on a padded batch of float images in [-1, 1]."""
    for stage in stages:
      if up_to in STAGES[:STAGES.index(stage)] or stage not in self.params:
        break
      images = self._upsampler_fn(stage, options[stage], steps)(
          self.params[stage], rng=self._shard(stage_keys(seeds, stage)), low_res=images,
          **self._known(known, self.exports[stage].resolution))
    return images

  def upsample(self, images, seeds: Sequence[int], options: dict | None = None, up_to: str | None = None,
               as_float: bool = False) -> np.ndarray:
    """The upsamplers alone on given images (uint8 [N, r, r, 3], paths or a list; or float in [-1, 1]):
    from the upsampler whose input size r is, through the last (or up_to). Image i's noise comes from
    seeds[i], as in decode, so decode(..., up_to="decoder") then upsample gives decode's images."""
    floats = isinstance(images, np.ndarray) and images.dtype.kind == "f"
    images = np.asarray(images, np.float32) if floats else imaging.to_model_range(read_images(images))
    size = images.shape[1]
    starts = [s for s in UPSAMPLERS if s in self.exports and self.exports[s].low_res_resolution == size]
    if not starts or images.shape[2] != size:
      inputs = {s: self.exports[s].low_res_resolution for s in UPSAMPLERS if s in self.exports}
      raise ValueError(f"upsample takes square images of an upsampler's input size {inputs}, got "
                       f"{images.shape[1]}x{images.shape[2]}.")
    if len(seeds) != len(images):
      raise ValueError(f"{len(images)} images for {len(seeds)} seeds.")
    total = self._padded(len(images))
    stages = UPSAMPLERS[UPSAMPLERS.index(starts[0]):]
    low_res = self._shard(_pad(images, total))
    out = self._upsample(low_res, _pad(list(seeds), total), self.options_for("text", options), stages, up_to)
    return output(out, len(images), as_float)

  def initial_noise(self, seeds: Sequence[int]) -> np.ndarray:
    """The decoder's x_T [N, r, r, 3] for these seeds: what decode draws when given no x_T."""
    r = self.decoder_resolution
    shape = (len(seeds), r, r, self.exports["decoder"].model.in_channels)
    return np.asarray(samplers.initial_noise(stage_keys(seeds, "decoder"), shape))

  # -- images in ----------------------------------------------------------------------------------

  def image_embeddings(self, images) -> np.ndarray:
    """CLIP image embeddings z_i [N, D] (as CLIP makes them: projected, not unit-norm) of uint8 images
    [N, H, W, 3] of any size (CLIP resizes the shortest side and centre-crops), or of image paths."""
    return np.asarray(self.clip.encode_image(read_images(images), value_range=(0, 255)), np.float32)

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
    images = read_images(images)
    n = len(images)
    z_i = self.image_embeddings(images) if z_i is None else np.asarray(z_i, np.float32)
    prompts = [prompts] * n if isinstance(prompts, str) else list(prompts)
    options = self.options_for("textdiff", options)["decoder"]
    iters = self.inversion_iters if fixed_point_iters is None else fixed_point_iters
    x0 = imaging.to_model_range(imaging.square(images, self.decoder_resolution))
    total = self._padded(n)
    encoding = self.clip.encode_text(_pad(prompts, total))
    cond = self._shard(dict(text.conditioning(encoding), z_i=_pad(z_i, total)))
    x_T = self._invert_fn(options, iters)(self.params["decoder"], images=self._shard(_pad(x0, total)), cond=cond,
                                          uncond=self.uncond, guidance_scale=options.guidance_scale)
    return np.asarray(x_T)[:n]
