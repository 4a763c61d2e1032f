"""Text -> image with unCLIP, and the paper's image applications.

  unclip-sample --prompt "a red circle above a blue square"
  unclip-sample --mode variations --image cat.png --num_images 4
  unclip-sample --mode interpolate --image a.png --image2 b.png --num_frames 8
  unclip-sample --mode interpolate --prompt "a red circle" --prompt2 "a blue square" --num_frames 8
  unclip-sample --mode textdiff --image a.png --prompt "a red circle" --prompt2 "a blue circle"
  unclip-sample --mode inpaint --image a.png --mask mask.png --prompt "a green triangle" --num_images 4

(`python sample.py ...` from a checkout is the same program.) With no --checkpoint
the shipped Shapes demo model is used. Writes one PNG per
image with a JSON file of the same name beside it (prompt, seed, mode, frame
and theta where they apply, all settings), and one grid PNG per call. A file
of other settings is never replaced: such a call's files get a short hash of
its settings in their names (write_outputs).
"""

import dataclasses
import hashlib
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
from absl import app, flags, logging

from unclip_jax import cli, imaging, paths
from unclip_jax.cli import shipped, stage_flags
from unclip_jax.stages import DIFFUSION_STAGES as STAGES

# assets/shapes_demo in a checkout, unclip_jax/assets/shapes_demo in a wheel; None if neither is there.
DEMO_CHECKPOINT = shipped.find(os.path.join("assets", "shapes_demo"))

_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption to draw (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one caption per line.")
_UNCONDITIONAL = flags.DEFINE_bool("unconditional", False, "Sample with the empty caption (no --prompt).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt (text), or variations of --image.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first image; image k uses seed + k.")
_OUT = flags.DEFINE_string("out", "samples", "Output folder (a local path, or a gs:// or file:// URI).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", DEMO_CHECKPOINT, "Inference checkpoint folder (a local path, or a "
                                  "gs:// or file:// URI; default: the shipped Shapes demo model).")
_CLIP = flags.DEFINE_string("clip", None, "CLIP folder (default: the checkpoint's own).")
_MODE = flags.DEFINE_enum("mode", "text", ["text", "variations", "interpolate", "textdiff", "inpaint"], "What to make.")
_IMAGE = flags.DEFINE_string("image", None, "Input image file (variations, interpolate, textdiff).")
_IMAGE2 = flags.DEFINE_string("image2", None, "Second image file (interpolate).")
_MASK = flags.DEFINE_string("mask", None, "inpaint: a mask image of --image's size; white pixels are repainted after "
                            "--prompt, black ones kept.")
_RESAMPLE = flags.DEFINE_integer("resample_steps", 5, "inpaint: RePaint's takes of each sampling step (1: replace "
                                 "the kept pixels only; more: the repainted part agrees better with the rest).")
_PROMPT2 = flags.DEFINE_string("prompt2", None, "Target caption (textdiff; --prompt is the source caption), or the "
                               "second caption (interpolate between --prompt's and --prompt2's z_i).")
_NUM_FRAMES = flags.DEFINE_integer("num_frames", 5, "Frames (interpolate), or thetas over [0, --max_theta] (textdiff).")
_THETAS = flags.DEFINE_list("thetas", None, "Comma-separated thetas for textdiff (instead of --num_frames).")
_MAX_THETA = flags.DEFINE_float("max_theta", 0.5, "Largest theta of textdiff's grid (the paper goes to about 0.5).")
_INTERP_NOISE = flags.DEFINE_enum("interp_noise", "fixed", ["fixed", "slerp"],
                                  "interpolate: one x_T (from --seed) for every frame, or slerp of the two "
                                  "images' DDIM inversions.")
_INVERSION_ITERS = flags.DEFINE_integer("inversion_iters", None,
                                        "Fixed-point iterations per DDIM inversion step (default: the pipeline's).")
_PRESET = flags.DEFINE_enum("preset", None, ["karlo", "paper"],
                            "Per-stage steps and guidance (default: the checkpoint's recommended settings).")
_UP_TO = flags.DEFINE_enum("up_to", None, list(STAGES), "Stop after this stage (e.g. decoder).")
_CANDIDATES = flags.DEFINE_integer("prior_candidates", 2, "Prior draws per image; the best by z_t . z_i is kept.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Compute and hold the weights in this dtype (default: each stage's own, float32 for "
                           "train.py's exports): bfloat16 halves the weights' memory (docs/karlo.md).")
_SHARD_PARAMS = flags.DEFINE_bool("shard_params", False, "Split each weight over this host's devices (FSDP) "
                                  "instead of a whole copy on each: for a stack that does not fit one device.")
_CACHE = flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax"),
                             "JAX persistent compilation cache folder ('' to disable).")


def _fail(message: str):
  sys.exit(f"error: {message}")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      lines = paths.as_path(_PROMPTS_FILE.value).read_bytes().decode("utf-8-sig").splitlines()  # a BOM is no caption
      prompts += [line.strip() for line in lines if line.strip()]
    except OSError as e:
      _fail(f"cannot read --prompts_file: {e}")
    except UnicodeDecodeError as e:
      _fail(f"--prompts_file {_PROMPTS_FILE.value!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset "
            f"{e.start}): save it as UTF-8.")
  if _UNCONDITIONAL.value:
    if prompts:
      _fail("--unconditional samples without a caption; drop --prompt/--prompts_file.")
    return [""]
  if not prompts or not all(p.strip() for p in prompts):
    _fail("give a non-empty --prompt (or --prompts_file); for samples without a caption pass --unconditional.")
  return prompts


def _image(flag):
  try:
    return imaging.load_image(flag.value)
  except imaging.ImageError as e:
    _fail(f"--{flag.name}: {e}")


def _between_captions(mode: str) -> bool:
  """interpolate between two captions (--prompt, --prompt2) rather than two images."""
  return mode == "interpolate" and (_PROMPT2.present or _PROMPT.present)


def _check_mode_flags(mode: str):
  """One-line errors for flags a mode needs or does not use, before anything is loaded."""
  interpolate = ([_PROMPT2], [_IMAGE, _IMAGE2, _PROMPTS_FILE]) if _between_captions(mode) else (
      [_IMAGE, _IMAGE2], [_PROMPT2, _PROMPT, _PROMPTS_FILE])
  needs = {"text": [], "variations": [_IMAGE], "interpolate": interpolate[0],
           "textdiff": [_IMAGE, _PROMPT2], "inpaint": [_IMAGE, _MASK]}[mode]
  for flag in needs:
    if flag.value is None:
      _fail(f"--mode={mode} needs --{flag.name}.")
  unused = {"text": [_IMAGE, _IMAGE2, _PROMPT2], "variations": [_IMAGE2, _PROMPT2, _PROMPT, _PROMPTS_FILE],
            "interpolate": interpolate[1], "textdiff": [_IMAGE2, _PROMPTS_FILE],
            "inpaint": [_IMAGE2, _PROMPT2, _PROMPTS_FILE]}[mode]
  if mode != "inpaint":
    unused += [_MASK, _RESAMPLE]
  if mode != "text":
    unused.append(_UNCONDITIONAL)
  for flag in unused:
    if flag.present:
      what = "it decodes without a caption" if flag is _PROMPT else "it is not used there"
      if _between_captions(mode) and flag in (_IMAGE, _IMAGE2):
        what = "it interpolates between --prompt's and --prompt2's images, or give --image and --image2 alone"
      _fail(f"--{flag.name} does not apply to --mode={mode} ({what}).")
  if _between_captions(mode):
    if len(_PROMPT.value) != 1 or not _PROMPT.value[0].strip() or not _PROMPT2.value.strip():
      _fail("--mode=interpolate between captions needs one non-empty --prompt and a non-empty --prompt2.")
    if _INTERP_NOISE.value == "slerp":
      _fail("--interp_noise=slerp slerps the two images' DDIM inversions; between captions every frame starts "
            "from --seed's x_T (drop --interp_noise).")
  if mode == "textdiff":
    if len(_PROMPT.value) != 1 or not _PROMPT.value[0].strip() or not _PROMPT2.value.strip():
      _fail("--mode=textdiff needs one non-empty --prompt (the image's caption) and a non-empty --prompt2 "
            "(the caption to move toward).")
  if mode == "inpaint":
    if len(_PROMPT.value) != 1 or not _PROMPT.value[0].strip():
      _fail("--mode=inpaint needs one non-empty --prompt: what to paint where the mask is white.")
    if _RESAMPLE.value < 1:
      _fail(f"--resample_steps must be at least 1, got {_RESAMPLE.value}.")
  if mode in ("interpolate", "textdiff") and stage_flags.SAMPLERS["decoder"].value not in (None, "ddim"):
    _fail(f"--mode={mode} decodes with DDIM (eta 0) from a fixed or inverted x_T; drop --decoder_sampler.")
  if mode == "interpolate" and _NUM_FRAMES.value < 2:
    _fail("--num_frames must be at least 2 (the two end frames).")


SEED_MAX = 2**32 - 1  # seeds are uint32 (pipeline.stage_keys)


def _check_seeds(count: int):
  """--seed .. --seed + count - 1, the call's seeds, must be uint32s."""
  seed = _SEED.value
  if seed < 0 or seed > SEED_MAX:
    _fail(f"--seed must be in 0..{SEED_MAX} (2**32 - 1), got {seed}.")
  if seed + count - 1 > SEED_MAX:
    _fail(f"--seed {seed} with {count} images needs seeds up to {seed + count - 1}, past 2**32 - 1 = {SEED_MAX}: "
          f"use a --seed of at most {SEED_MAX - count + 1}.")


def _thetas() -> list[float]:
  if _THETAS.value:
    try:
      return [float(t) for t in _THETAS.value]
    except ValueError:
      _fail(f"--thetas must be numbers separated by commas, got {','.join(_THETAS.value)!r}.")
  if _NUM_FRAMES.value < 1:
    _fail("--num_frames must be at least 1.")
  return [float(t) for t in np.linspace(0.0, _MAX_THETA.value, _NUM_FRAMES.value)]


def _options(pipeline_lib, pipe, mode: str):
  """The checkpoint's defaults (or --preset), adjusted for the mode, then the stage flags."""
  base = dict(pipeline_lib.PRESETS[_PRESET.value]) if _PRESET.value else None
  options = stage_flags.apply(pipe.options_for(mode, base))
  return pipe.options_for(mode, options)  # interpolate / textdiff keep their deterministic decoder


def slug(text: str, limit: int = 40) -> str:
  """A file-name-safe form of a caption (or file stem): lower case, runs of other characters -> "_"."""
  kept = "".join(c if c.isalnum() else "_" for c in text.lower()).strip("_")
  return "_".join(filter(None, kept.split("_")))[:limit] or "unconditional"


def write_outputs(out_dir: str, images: np.ndarray, jobs: Sequence[tuple[str, int]], options: dict,
                  settings: dict, extras: Sequence[dict] | None = None, names: Sequence[str] | None = None,
                  grid_columns: int | None = None) -> list[str]:
  """One PNG per image with a same-named JSON, and one grid PNG; never replaces an image of other settings.

  jobs[i] = (prompt, seed) of image i. Its JSON holds prompt, seed, every
  stage's options, `settings` and extras[i] (per-image fields, e.g. frame and
  theta). names[i] is its file stem (default PROMPT_seedN). Where a stem is
  taken by a file of other settings (its JSON differs, or a PNG has none), every
  file of the call gets a suffix: _HASH, 8 hex digits of a hash of the call's
  JSONs (_HASH_2, ... should that be taken too). A rerun with the same settings
  writes the same names again (the same images). Returns the written image
  paths, the grid last.
  """
  if extras is not None and len(extras) != len(images) or names is not None and len(names) != len(images):
    raise ValueError(f"{len(images)} images need as many extras and names.")
  out = paths.as_path(out_dir)  # a local folder or a URI (gs://, file://)
  out.mkdir(parents=True, exist_ok=True)
  stage_options = {s: dataclasses.asdict(o) for s, o in options.items()}
  stems = list(names) if names else [f"{slug(prompt)}_seed{seed}" for prompt, seed in jobs]
  records = [json.loads(json.dumps({"prompt": prompt, "seed": seed, **(extras[i] if extras else {}),
                                    "options": stage_options, **settings}))  # as the JSON file reads back
             for i, (prompt, seed) in enumerate(jobs)]
  digest = hashlib.sha256(json.dumps(records, sort_keys=True).encode()).hexdigest()[:8]
  suffix = next(suffix for suffix in itertools.chain([""], _numbered(f"_{digest}"))
                if all(_free_or_same(os.fspath(out / (stem + suffix)), record) for stem, record in zip(stems, records)))
  written = []
  for image, stem, record in zip(images, stems, records):
    path = os.fspath(out / (stem + suffix))
    imaging.save_png(image, path + ".png")
    paths.as_path(path + ".json").write_text(json.dumps(record, indent=2))
    written.append(path + ".png")
  grid = os.fspath(out / f"grid_{time.strftime('%Y%m%d-%H%M%S')}_seed{jobs[0][1]}{suffix}")
  grid_path = next(path for path in _numbered(grid) if not paths.as_path(path + ".png").exists()) + ".png"
  imaging.save_png(imaging.make_grid(images, columns=grid_columns), grid_path)
  return written + [grid_path]


def _numbered(stem: str):
  """stem, stem_2, stem_3, ...: names to try until one is free."""
  yield stem
  for k in itertools.count(2):
    yield f"{stem}_{k}"


def _free_or_same(stem: str, record: dict) -> bool:
  """Nothing at STEM.png / STEM.json, or a JSON with this record (the same settings: the same image)."""
  meta = paths.as_path(stem + ".json")
  if meta.exists():
    try:
      return json.loads(meta.read_text()) == record
    except (OSError, ValueError):
      return False
  return not paths.as_path(stem + ".png").exists()


def _stem(path: str) -> str:
  return os.path.splitext(os.path.basename(path))[0]


def _absolute(path: str) -> str:
  """For the JSON records: a local path made absolute, a URI (gs://) as given."""
  return os.fspath(paths.absolute(path))


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}")
  # Quiet by default: absl's (Orbax's, JAX's) INFO lines and transformers' notices would come before
  # the progress bars; --verbosity 0 brings them back.
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # transformers is imported later, with the CLIP
  mode = _MODE.value
  _check_mode_flags(mode)
  prompts = _prompts() if mode == "text" else None
  if _NUM_IMAGES.value < 1:
    _fail("--num_images must be at least 1.")
  thetas = _thetas() if mode == "textdiff" else None
  _check_seeds({"text": len(prompts or []) * _NUM_IMAGES.value, "variations": _NUM_IMAGES.value,
                "inpaint": _NUM_IMAGES.value}.get(mode, 1))
  images = {flag.name: _image(flag) for flag in (_IMAGE, _IMAGE2, _MASK) if flag.value is not None}
  problem = paths.output_folder_problem("out", _OUT.value)
  if problem:
    _fail(problem)
  if _CHECKPOINT.value is None:
    _fail("this installation has no shipped demo model (assets/shapes_demo); pass --checkpoint DIR.")
  if not paths.as_path(_CHECKPOINT.value).is_dir():
    _fail(f"checkpoint folder {_CHECKPOINT.value!r} does not exist.")

  batch = {"text": len(prompts or []) * _NUM_IMAGES.value, "variations": _NUM_IMAGES.value,
           "inpaint": _NUM_IMAGES.value, "textdiff": len(thetas or [])}.get(mode, _NUM_FRAMES.value)
  cli.use_cpu_cores(batch)  # before JAX starts: one CPU device per core, unless XLA_FLAGS sets a count
  import jax

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from unclip_jax import parallel
  from unclip_jax import pipeline as pipeline_lib

  mesh = parallel.sampling_mesh()
  logging.info("sampling on %d %s device(s)", jax.local_device_count(), jax.default_backend())
  try:
    pipe = pipeline_lib.Pipeline.load(_CHECKPOINT.value, clip_dir=_CLIP.value, mesh=mesh, progress=True,
                                      dtype=_DTYPE.value, shard_params=_SHARD_PARAMS.value,
                                      prior=stage_flags.PRIOR.value)
  except pipeline_lib.CheckpointError as e:
    _fail(str(e))
  if _INVERSION_ITERS.value is not None:
    pipe.inversion_iters = _INVERSION_ITERS.value
  options = _options(pipeline_lib, pipe, mode)
  seed, up_to = _SEED.value, _UP_TO.value
  extras = names = columns = None
  try:
    if mode == "text":
      jobs = [(p, seed + i * _NUM_IMAGES.value + j) for i, p in enumerate(prompts) for j in range(_NUM_IMAGES.value)]
      out = pipe.text_to_image([p for p, _ in jobs], [s for _, s in jobs], options,
                               num_candidates=_CANDIDATES.value, up_to=up_to)
    elif mode == "variations":
      seeds = [seed + j for j in range(_NUM_IMAGES.value)]
      out = pipeline_lib.variations(pipe, images["image"], seeds, options, up_to=up_to)
      jobs = [("", s) for s in seeds]
      extras = [{"image": _absolute(_IMAGE.value)} for _ in seeds]
      names = [f"{slug(_stem(_IMAGE.value))}_variation_seed{s}" for s in seeds]
    elif mode == "inpaint":
      prompt, seeds = _PROMPT.value[0], [seed + j for j in range(_NUM_IMAGES.value)]
      out = pipeline_lib.inpaint(pipe, images["image"], images["mask"], prompt, seeds, options,
                                 resample_steps=_RESAMPLE.value, num_candidates=_CANDIDATES.value, up_to=up_to)
      jobs = [(prompt, s) for s in seeds]
      extras = [{"image": _absolute(_IMAGE.value), "mask": _absolute(_MASK.value), "resample_steps": _RESAMPLE.value}
                for _ in seeds]
      names = [f"{slug(prompt)}_inpaint_{slug(_stem(_IMAGE.value))}_seed{s}" for s in seeds]
    elif _between_captions(mode):
      frames, (first, second) = _NUM_FRAMES.value, (_PROMPT.value[0], _PROMPT2.value)
      out = pipeline_lib.interpolate_captions(pipe, first, second, frames, seed=seed, options=options,
                                              num_candidates=_CANDIDATES.value, up_to=up_to)
      thetas = [float(t) for t in np.linspace(0.0, 1.0, frames)]
      jobs = [("", seed)] * frames
      extras = [{"prompt_a": first, "prompt_b": second, "frame": k, "theta": theta} for k, theta in enumerate(thetas)]
      names = [f"interpolate_{slug(first)}_{slug(second)}_seed{seed}_frame{k:02d}" for k in range(frames)]
      columns = frames
    elif mode == "interpolate":
      frames = _NUM_FRAMES.value
      out = pipeline_lib.interpolate(pipe, images["image"], images["image2"], frames, seed=seed, options=options,
                                     noise=_INTERP_NOISE.value, up_to=up_to)
      thetas = [float(t) for t in np.linspace(0.0, 1.0, frames)]
      jobs = [("", seed)] * frames
      extras = [{"image": _absolute(_IMAGE.value), "image2": _absolute(_IMAGE2.value), "frame": k,
                 "theta": theta, "interp_noise": _INTERP_NOISE.value} for k, theta in enumerate(thetas)]
      stem = f"interpolate_{slug(_stem(_IMAGE.value))}_{slug(_stem(_IMAGE2.value))}"
      names = [f"{stem}_seed{seed}_frame{k:02d}" for k in range(frames)]
      columns = frames
    else:  # textdiff
      source, target = _PROMPT.value[0], _PROMPT2.value
      out = pipeline_lib.text_diff(pipe, images["image"], source, target, thetas, options, seed=seed, up_to=up_to)
      jobs = [(source, seed)] * len(thetas)
      extras = [{"image": _absolute(_IMAGE.value), "prompt2": target, "frame": k, "theta": theta}
                for k, theta in enumerate(thetas)]
      stem = f"textdiff_{slug(_stem(_IMAGE.value))}_{slug(target)}"
      names = [f"{stem}_frame{k:02d}_theta{theta:.3f}" for k, theta in enumerate(thetas)]
      columns = len(thetas)
  except (imaging.ImageError, pipeline_lib.InputError, pipeline_lib.CheckpointError) as e:
    _fail(str(e))  # e.g. text from a variations-only checkpoint (no prior)
  settings = {"checkpoint": _absolute(_CHECKPOINT.value), "preset": _PRESET.value or "checkpoint",
              "up_to": up_to, "mode": mode}
  if _DTYPE.value:  # (absent when unset, so earlier files keep their settings hash)
    settings["dtype"] = _DTYPE.value
  if stage_flags.PRIOR.value != "diffusion":
    settings["prior"] = stage_flags.PRIOR.value
  if mode in ("text", "inpaint") or _between_captions(mode):
    settings["prior_candidates"] = _CANDIDATES.value
  if mode == "textdiff" or (mode == "interpolate" and _INTERP_NOISE.value == "slerp"):
    settings["inversion_iters"] = pipe.inversion_iters
  # The image applications start at z_i; text and caption interpolation sample it with the prior.
  used = {s: o for s, o in options.items() if mode in ("text", "inpaint") or _between_captions(mode) or s != "prior"}
  try:
    written = write_outputs(_OUT.value, out, jobs, used, settings, extras=extras, names=names, grid_columns=columns)
  except OSError as e:  # --out was checked before sampling, but a disk fills and a bucket refuses
    _fail(f"cannot write the images to --out {_OUT.value!r}: {e}")
  print("\n".join(written))


def run():
  """The unclip-sample console script (and `python sample.py`)."""
  cli.show_in_help(__name__, __doc__)
  app.run(main)


if __name__ == "__main__":
  run()
