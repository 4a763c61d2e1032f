"""The unCLIP pipeline: text -> z_t -> prior -> z_i -> decoder -> upsamplers.

An inference checkpoint is a folder with one export per stage (as train.py
writes them) and the CLIP folder:

  CHECKPOINT/pipeline.json        {"clip": "clip", "prior": "prior", "decoder": "decoder",
                                   "sr1": "sr1", "sr2": "sr2"}   (sr1 and sr2 optional)
  CHECKPOINT/clip/                a Hugging Face CLIP folder
  CHECKPOINT/prior/ ...           train.py exports (config.json + params/)

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

from unclip_jax import checkpoints, imaging
from unclip_jax.diffusion import schedules
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


def _read_stage(folder: str, stage: str):
  try:
    params, config = checkpoints.load_inference(folder)
  except FileNotFoundError as e:
    raise CheckpointError(f"{stage}: {e}") from e
  if config.get("stage") != stage:
    raise CheckpointError(f"{folder!r} holds a {config.get('stage')!r} export, expected {stage!r}.")
  return params, config


def assemble(path: str, **folders: str) -> str:
  """Copies a CLIP folder and stage exports (clip=, prior=, decoder=, sr1=, sr2=) into one checkpoint."""
  import shutil

  unknown = set(folders) - {"clip", *STAGES}
  if unknown:
    raise ValueError(f"Unknown stage folders {sorted(unknown)}.")
  os.makedirs(path, exist_ok=True)
  for name, folder in folders.items():
    shutil.copytree(folder, os.path.join(path, name), dirs_exist_ok=True)
  with open(os.path.join(path, PIPELINE_FILE), "w") as f:
    json.dump({name: name for name in folders}, f, indent=2)
  return path


def stage_keys(seeds: Sequence[int], stage_index: int):
  """Per-image keys of one stage: fold_in(key(seed), stage)."""
  return jax.vmap(lambda s: jax.random.fold_in(jax.random.key(s), stage_index))(jnp.asarray(seeds, jnp.uint32))


class Pipeline:
  """A loaded unCLIP stack; see `load`."""

  def __init__(self, clip, stages: dict, stage_configs: dict, mesh=None, progress: bool = False):
    self.clip = clip
    self.params = stages
    self.configs = stage_configs
    self.mesh = mesh
    self.progress = progress
    prior_cfg = stage_configs["prior"]
    self.prior_model = prior_lib.DiffusionPrior(prior_lib.PriorConfig(**prior_cfg["model"]))
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
    """Reads CHECKPOINT/pipeline.json and each stage's export; clear errors if any is missing."""
    layout_file = os.path.join(path, PIPELINE_FILE)
    if not os.path.isfile(layout_file):
      raise CheckpointError(f"{path!r} is not an unCLIP checkpoint: no {PIPELINE_FILE} (expected "
                            f"{{\"clip\": ..., \"prior\": ..., \"decoder\": ..., \"sr1\": ...}} naming stage folders).")
    with open(layout_file) as f:
      layout = json.load(f)
    missing = [k for k in ("prior", "decoder") if k not in layout]
    if missing:
      raise CheckpointError(f"{layout_file} names no {missing} folder.")
    clip_path = clip_dir or os.path.join(path, layout.get("clip", "clip"))
    try:
      clip = clip_lib.load_clip(clip_path)
    except (FileNotFoundError, ValueError) as e:
      raise CheckpointError(f"CLIP: {e}") from e
    params, configs = {}, {}
    for stage in STAGES:
      if stage in layout:
        params[stage], configs[stage] = _read_stage(os.path.join(path, layout[stage]), stage)
    if configs["prior"]["model"]["clip_dim"] != clip.embed_dim:
      raise CheckpointError(f"The prior expects CLIP embeddings of width {configs['prior']['model']['clip_dim']}, "
                            f"the CLIP at {clip_path!r} makes {clip.embed_dim}.")
    return cls(clip, params, configs, mesh=mesh, progress=progress)

  @property
  def stages(self) -> tuple[str, ...]:
    return tuple(s for s in STAGES if s in self.params)

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

  @functools.lru_cache(maxsize=None)
  def _decoder_fn(self, options: StageOptions):
    diffusion = self.configs["decoder"]["diffusion"]
    schedule = schedules.make_schedule(diffusion["schedule"], diffusion["num_timesteps"], options.num_steps)
    return jax.jit(functools.partial(
        decoder_stage.sample, cfg=self.decoder_cfg, schedule=schedule, size=self.configs["decoder"]["resolution"],
        sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
        dynamic_threshold=options.dynamic_threshold, progress_desc="decoder" if self.progress else None))

  @functools.lru_cache(maxsize=None)
  def _upsampler_fn(self, stage: str, options: StageOptions):
    config = self.configs[stage]
    diffusion = config["diffusion"]
    schedule = schedules.make_schedule(diffusion["schedule"], diffusion["num_timesteps"], options.num_steps)
    return jax.jit(functools.partial(
        upsampler_stage.sample, cfg=self.sr_cfgs[stage], schedule=schedule, size=config["resolution"],
        sampler=options.sampler, eta=options.eta, clip_range=options.clip_range,
        dynamic_threshold=options.dynamic_threshold, progress_desc=stage if self.progress else None))

  # -- text -> image ------------------------------------------------------------------------------

  def _shard(self, tree):
    """Batch-split over the mesh's devices (the batch is padded to divide by their number)."""
    if self.mesh is None:
      return tree
    sharding = NamedSharding(self.mesh, P(self.mesh.axis_names))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), tree)

  def _padded(self, n: int) -> int:
    devices = 1 if self.mesh is None else self.mesh.devices.size
    return -(-n // devices) * devices

  def text_to_image(self, prompts: Sequence[str], seeds: Sequence[int], options: dict | None = None,
                    num_candidates: int = 2, up_to: str | None = None) -> np.ndarray:
    """uint8 images [N, R, R, 3], image i from prompts[i] and seeds[i].

    options: stage -> StageOptions (default: the "karlo" preset). up_to stops
    after that stage (e.g. "decoder" for the 64 px images).
    """
    if len(prompts) != len(seeds):
      raise ValueError(f"{len(prompts)} prompts for {len(seeds)} seeds.")
    options = dict(PRESETS["karlo"], **(options or {}))
    n = len(prompts)
    total = self._padded(n)
    prompts = list(prompts) + [prompts[-1]] * (total - n)
    seeds = list(seeds) + [seeds[-1]] * (total - n)
    text = self.clip.encode_text(prompts)
    cond = prior_stage.text_conditioning(text)
    keys = stage_keys(seeds, 0)
    rows = jax.vmap(lambda k: jax.vmap(lambda c: jax.random.fold_in(k, c))(jnp.arange(num_candidates)))(keys)
    z_i = self._prior_fn(options["prior"], num_candidates)(
        self.params["prior"], self._shard(cond), self.uncond_prior, self._shard(rows.reshape(-1)))
    decoder_cond = self._shard({"image_embed": z_i, "text_embed": text.embedding, "text_tokens": text.tokens,
                                "text_mask": text.mask})
    images = self._decoder_fn(options["decoder"])(
        self.params["decoder"], rng=self._shard(stage_keys(seeds, 1)), cond=decoder_cond,
        uncond=self.uncond_decoder, guidance_scale=options["decoder"].guidance_scale)
    for index, stage in enumerate(("sr1", "sr2"), start=2):
      if up_to in STAGES[:index] or stage not in self.params:
        break
      images = self._upsampler_fn(stage, options[stage])(
          self.params[stage], rng=self._shard(stage_keys(seeds, index)), low_res=images)
    return imaging.to_uint8(np.asarray(images)[:n])


def _slug(text: str, limit: int = 40) -> str:
  kept = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
  return "_".join(filter(None, kept.split("_")))[:limit] or "unconditional"


def write_outputs(out_dir: str, images: np.ndarray, jobs: Sequence[tuple[str, int]], options: dict,
                  settings: dict) -> list[str]:
  """One PNG per image with a same-named JSON (prompt, seed, all settings), and one grid PNG.

  Returns the written image paths, the grid last.
  """
  import time

  os.makedirs(out_dir, exist_ok=True)
  stage_options = {s: dataclasses.asdict(o) for s, o in options.items()}
  paths = []
  for image, (prompt, seed) in zip(images, jobs):
    stem = os.path.join(out_dir, f"{_slug(prompt)}_seed{seed}")
    imaging.save_png(image, stem + ".png")
    with open(stem + ".json", "w") as f:
      json.dump({"prompt": prompt, "seed": seed, "options": stage_options, **settings}, f, indent=2)
    paths.append(stem + ".png")
  grid_path = os.path.join(out_dir, f"grid_{time.strftime('%Y%m%d-%H%M%S')}_seed{jobs[0][1]}.png")
  imaging.save_png(imaging.make_grid(images), grid_path)
  return paths + [grid_path]
