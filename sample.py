"""Text -> image with unCLIP.

  python sample.py --prompt "a red circle above a blue square"

With no --checkpoint the shipped Shapes demo model is used. Writes one PNG per
image with a JSON file of the same name beside it (prompt, seed, settings),
and one grid PNG per call.
"""

import os
import sys

from absl import app
from absl import flags

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_demo")
STAGES = ("prior", "decoder", "sr1", "sr2")

_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption to draw (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one caption per line.")
_UNCONDITIONAL = flags.DEFINE_bool("unconditional", False, "Sample with the empty caption (no --prompt).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", 1, "Images per prompt.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the first image; image k uses seed + k.")
_OUT = flags.DEFINE_string("out", "samples", "Output folder.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", DEMO_CHECKPOINT, "Inference checkpoint folder.")
_CLIP = flags.DEFINE_string("clip", None, "CLIP folder (default: the checkpoint's own).")
_MODE = flags.DEFINE_enum("mode", "text", ["text", "variations", "interpolate", "textdiff"], "What to make.")
_IMAGE = flags.DEFINE_string("image", None, "Input image (variations, interpolate, textdiff).")
_IMAGE2 = flags.DEFINE_string("image2", None, "Second image (interpolate).")
_PROMPT2 = flags.DEFINE_string("prompt2", None, "Target caption (textdiff).")
_PRESET = flags.DEFINE_enum("preset", "karlo", ["karlo", "paper"], "Per-stage steps and guidance.")
_UP_TO = flags.DEFINE_enum("up_to", None, list(STAGES), "Stop after this stage (e.g. decoder).")
_CANDIDATES = flags.DEFINE_integer("prior_candidates", 2, "Prior draws per image; the best by z_t . z_i is kept.")
_CACHE = flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax"),
                             "JAX persistent compilation cache folder ('' to disable).")
_STEPS = {s: flags.DEFINE_integer(f"{s}_steps", None, f"{s} sampling steps (default: the preset's).") for s in STAGES}
_SAMPLERS = {s: flags.DEFINE_enum(f"{s}_sampler", None, ["ddpm", "ddim"], f"{s} sampler.") for s in STAGES}
_GUIDANCE = {s: flags.DEFINE_float(f"{s}_guidance", None, f"{s} guidance scale.") for s in ("prior", "decoder")}
_ETA = flags.DEFINE_float("eta", None, "DDIM eta for every stage that samples with DDIM.")
_THRESHOLD = flags.DEFINE_float("dynamic_threshold", None, "Imagen's dynamic thresholding quantile for images.")


def _fail(message: str):
  sys.exit(f"error: {message}")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value) as f:
        prompts += [line.strip() for line in f if line.strip()]
    except OSError as e:
      _fail(f"cannot read --prompts_file: {e}")
  if _UNCONDITIONAL.value:
    if prompts:
      _fail("--unconditional samples without a caption; drop --prompt/--prompts_file.")
    return [""]
  if not prompts or not all(p.strip() for p in prompts):
    _fail("give a non-empty --prompt (or --prompts_file); for samples without a caption pass --unconditional.")
  return prompts


def _options(pipeline_lib):
  import dataclasses

  options = dict(pipeline_lib.PRESETS[_PRESET.value])
  for stage in STAGES:
    changes = {}
    if _STEPS[stage].value is not None:
      changes["num_steps"] = _STEPS[stage].value
    if _SAMPLERS[stage].value is not None:
      changes["sampler"] = _SAMPLERS[stage].value
    if stage in _GUIDANCE and _GUIDANCE[stage].value is not None:
      changes["guidance_scale"] = _GUIDANCE[stage].value
    if _ETA.value is not None:
      changes["eta"] = _ETA.value
    if _THRESHOLD.value is not None and stage != "prior":
      changes["dynamic_threshold"] = _THRESHOLD.value
    options[stage] = dataclasses.replace(options[stage], **changes)
  return options


def main(argv):
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}")
  if _MODE.value != "text":
    _fail(f"--mode={_MODE.value} is not available yet; only --mode=text is.")
  prompts = _prompts()
  if _NUM_IMAGES.value < 1:
    _fail("--num_images must be at least 1.")
  if not os.path.isdir(_CHECKPOINT.value):
    if _CHECKPOINT.value == DEMO_CHECKPOINT:
      _fail("the shipped Shapes demo model is not in this checkout yet (it is trained and committed under "
            "assets/shapes_demo by issue #7); pass --checkpoint DIR with a checkpoint of your own.")
    _fail(f"checkpoint folder {_CHECKPOINT.value!r} does not exist.")

  import jax

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from unclip_jax import parallel
  from unclip_jax import pipeline as pipeline_lib

  mesh = parallel.make_mesh({"data": -1}, devices=jax.local_devices()) if jax.local_device_count() > 1 else None
  try:
    pipe = pipeline_lib.Pipeline.load(_CHECKPOINT.value, clip_dir=_CLIP.value, mesh=mesh, progress=True)
  except pipeline_lib.CheckpointError as e:
    _fail(str(e))
  options = _options(pipeline_lib)
  jobs = [(p, _SEED.value + i * _NUM_IMAGES.value + j) for i, p in enumerate(prompts) for j in range(_NUM_IMAGES.value)]
  images = pipe.text_to_image([p for p, _ in jobs], [s for _, s in jobs], options,
                              num_candidates=_CANDIDATES.value, up_to=_UP_TO.value)
  settings = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "preset": _PRESET.value, "up_to": _UP_TO.value,
              "prior_candidates": _CANDIDATES.value, "mode": _MODE.value}
  paths = pipeline_lib.write_outputs(_OUT.value, images, jobs, options, settings)
  print("\n".join(paths))


if __name__ == "__main__":
  app.run(main)
