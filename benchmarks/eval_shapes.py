"""Text-to-image quality on the Shapes world: CLIP R-precision, CLIP-space Frechet distance, pixel accuracies.

Captions of Shapes scenes 0..N-1 of --data_seed (12345: not the training seed 0)
are drawn with the checkpoint, one image each (seed --seed + i), and scored:

- R-precision: with the checkpoint's own CLIP, the image's embedding must be
  closer (cosine) to its caption than to each of --num_distractors other
  captions, drawn per image from the captions of 2,000 scenes of seed
  data_seed + 2, all different from the true one (unclip_jax/eval/metrics.py).
- FD: the Frechet distance between Gaussians fitted to L2-normalised CLIP image
  embeddings of the N images and of N real Shapes images (scenes of seed
  data_seed + 1, rendered at the output resolution).
- colour / shape / relation / count: the pixel analyser of unclip_jax/eval/shapes.py
  (relation over the two-object captions only).
- CLIP relation: over the two-object captions, how often the image's embedding
  is closer to its caption than to the caption with the relation flipped (the
  scene's twin, unclip_jax/data/shapes.py); 0.5 is a CLIP blind to relations.

The "real" row scores the real scenes of the captions themselves, with the same
distractors: the CLIP's own R-precision, the FD of two independent real sets of
this size (the floor a perfect model would reach) and the analyser's accuracy
on exact images (1.0 expected). With --real_only only that row is computed, for
which a CLIP is enough (--clip, or the checkpoint's).

  python benchmarks/eval_shapes.py [--checkpoint assets/shapes_demo] [--num_prompts 200] [--batch_size 16]
  python benchmarks/eval_shapes.py --real_only --clip runs/shapes/clip/export --resolution 64

Sampling settings: the checkpoint's (or --preset's), then sample.py's per-stage flags
(--{stage}_steps, --{stage}_sampler, --{stage}_spacing, --{prior,decoder}_guidance, ...).
generation_seconds times the sampling after one untimed batch has compiled every loop (prior_seconds:
the prior's part; --prior ar runs the checkpoint's autoregressive prior).
"""

import dataclasses
import json
import os
import sys
import time

from absl import app, flags, logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a script from anywhere
from unclip_jax.cli import stage_flags  # noqa: E402  (--{stage}_steps, --{stage}_sampler, ...)

DEMO_CHECKPOINT = os.path.join(ROOT, "assets", "shapes_demo")
DISTRACTOR_POOL = 2000  # scenes whose captions the distractors are drawn from

_CHECKPOINT = flags.DEFINE_string("checkpoint", DEMO_CHECKPOINT, "Inference checkpoint folder.")
_CLIP = flags.DEFINE_string("clip", None, "CLIP folder for the scores (default: the checkpoint's own).")
_REAL_ONLY = flags.DEFINE_bool("real_only", False, "Only the real-image reference row (needs a CLIP only).")
_RESOLUTION = flags.DEFINE_integer("resolution", None, "Real images' size (default: the generated images'; "
                                   "64 with --real_only).")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 200, "Captions (one image each).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per pipeline call (the last batch is padded).")
_DATA_SEED = flags.DEFINE_integer("data_seed", 12345, "Shapes seed of the evaluation captions (training uses 0).")
_SEED = flags.DEFINE_integer("seed", 0, "Image i is drawn with seed + i.")
_NUM_DISTRACTORS = flags.DEFINE_integer("num_distractors", 20, "Other captions per image for R-precision.")
_PRESET = flags.DEFINE_enum("preset", None, ["karlo", "paper"], "Sampling preset (default: the checkpoint's "
                            "recommended options).")
_UP_TO = flags.DEFINE_enum("up_to", None, ["decoder", "sr1", "sr2"], "Stop after this stage (e.g. decoder).")
_CANDIDATES = flags.DEFINE_integer("prior_candidates", 2, "Prior draws per image; the best by z_t . z_i is kept.")
_OUT = flags.DEFINE_string("out", None, "Write a grid PNG of the first --grid_size generated images here (and "
                           "their captions to the same path with .txt).")
_GRID_SIZE = flags.DEFINE_integer("grid_size", 16, "Images in the --out grid.")
_JSON = flags.DEFINE_string("json", None, "Write the settings and results as JSON here.")
_CACHE = flags.DEFINE_string("compilation_cache", os.path.join(os.path.expanduser("~"), ".cache", "unclip_jax"),
                             "JAX persistent compilation cache folder ('' to disable).")


def _fail(message: str):
  sys.exit(f"error: {message}")


def _batched(fn, items, batch_size: int):
  """fn over fixed-size batches (the last one padded by repeating its last item, so nothing recompiles)."""
  import numpy as np

  out = []
  for start in range(0, len(items), batch_size):
    chunk = list(items[start:start + batch_size])
    n = len(chunk)
    out.append(np.asarray(fn(chunk + [chunk[-1]] * (batch_size - n)))[:n])
  return np.concatenate(out)


def _load_clip():
  """The CLIP to score with: --clip, else the checkpoint's (pipeline.json's "clip" folder)."""
  from unclip_jax.models import clip as clip_lib

  path = _CLIP.value
  if path is None:
    layout_file = os.path.join(_CHECKPOINT.value, "pipeline.json")
    try:
      with open(layout_file) as f:
        path = os.path.join(_CHECKPOINT.value, json.load(f).get("clip", "clip"))
    except (OSError, ValueError) as e:
      _fail(f"cannot read {layout_file} to find the checkpoint's CLIP ({e}); pass --clip DIR.")
  try:
    return clip_lib.load_clip(path)
  except (FileNotFoundError, ValueError) as e:
    _fail(f"CLIP: {str(e).splitlines()[0]}")


def _scores(clip, images, captions, text_embeds, distractor_embeds, reference_embeds, twin_embeds, two_object,
            batch_size):
  """One table row: R-precision, FD and pixel accuracies for images [N, R, R, 3] uint8 and their captions."""
  import numpy as np

  from unclip_jax.eval import metrics
  from unclip_jax.eval import shapes as evaluate

  image_embeds = _batched(lambda x: clip.encode_image(np.stack(x), value_range=(0, 255)), list(images), batch_size)
  normalise = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  row = {"num_images": len(images),
         "r_precision": metrics.r_precision(image_embeds, text_embeds, distractor_embeds),
         "frechet_distance": metrics.frechet_distance(normalise(image_embeds), normalise(reference_embeds))}
  prefers_caption = metrics.r_precision(image_embeds, text_embeds, twin_embeds[:, None], per_image=True)
  row["clip_relation"] = float(prefers_caption[two_object].mean()) if two_object.any() else None
  acc = evaluate.accuracies(evaluate.score_images(images, captions))
  row.update({k: acc[k] for k in ("color", "shape", "relation", "count", "all_correct", "speckle", "num_two_object")})
  if row["num_two_object"] == 0:
    row["relation"] = None  # no two-object caption among them
  return row


def main(argv):
  logging.set_verbosity(logging.WARNING)  # checkpoint loading logs at INFO; keep the table readable
  if len(argv) > 1:
    _fail(f"unexpected arguments {' '.join(argv[1:])}")
  if _NUM_PROMPTS.value < 2 or _BATCH_SIZE.value < 1 or _NUM_DISTRACTORS.value < 1:
    _fail("--num_prompts must be at least 2, --batch_size and --num_distractors at least 1.")
  if not _REAL_ONLY.value and not os.path.isdir(_CHECKPOINT.value):
    _fail(f"checkpoint folder {_CHECKPOINT.value!r} does not exist; pass --checkpoint DIR, or --real_only "
          "--clip DIR for the real-image row alone.")

  from unclip_jax import cli

  cli.use_cpu_cores(_BATCH_SIZE.value)  # before JAX starts: one CPU device per core, unless XLA_FLAGS sets a count
  import jax
  import numpy as np

  if _CACHE.value:
    jax.config.update("jax_compilation_cache_dir", _CACHE.value)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from unclip_jax import imaging
  from unclip_jax.data import shapes
  from unclip_jax.eval import metrics

  n, batch = _NUM_PROMPTS.value, _BATCH_SIZE.value
  scenes = [shapes.sample_scene(_DATA_SEED.value, i) for i in range(n)]
  captions = [s.caption for s in scenes]
  twin_captions = [shapes.twin(s, np.random.default_rng(i)).caption for i, s in enumerate(scenes)]
  two_object = np.array([s.relation is not None for s in scenes])
  pool = [shapes.sample_scene(_DATA_SEED.value + 2, i).caption for i in range(DISTRACTOR_POOL)]

  generated, gen_seconds, prior_seconds, pipe, options = None, None, None, None, None
  if _REAL_ONLY.value:
    clip = _load_clip()
  else:
    from unclip_jax import parallel
    from unclip_jax import pipeline as pipeline_lib

    mesh = parallel.sampling_mesh()
    try:
      pipe = pipeline_lib.Pipeline.load(_CHECKPOINT.value, clip_dir=_CLIP.value, mesh=mesh,
                                        prior=stage_flags.PRIOR.value)
    except pipeline_lib.CheckpointError as e:
      _fail(str(e).splitlines()[0])
    clip = pipe.clip
    options = stage_flags.apply(pipe.options_for("text", dict(pipeline_lib.PRESETS[_PRESET.value])
                                                 if _PRESET.value else None))
    jobs = list(zip(captions, range(_SEED.value, _SEED.value + n), strict=True))
    # text_to_image in its two halves (the same images), so that the prior's share of the time is known.
    prior = lambda chunk: pipe.prior([p for p, _ in chunk], [s for _, s in chunk], options=options,
                                     num_candidates=_CANDIDATES.value)
    decode = lambda chunk: pipe.decode(np.stack([z for z, _, _ in chunk]), [p for _, p, _ in chunk],
                                       [s for _, _, s in chunk], options=options, up_to=_UP_TO.value)
    _batched(decode, [(z, p, s) for z, (p, s) in zip(_batched(prior, jobs[:batch], batch), jobs[:batch])], batch)
    start = time.perf_counter()  # (the untimed batch above compiled every loop: this is sampling alone)
    z_i = _batched(prior, jobs, batch)
    prior_seconds = time.perf_counter() - start
    generated = imaging.to_uint8(_batched(decode, [(z, p, s) for z, (p, s) in zip(z_i, jobs)], batch))
    gen_seconds = time.perf_counter() - start
  if clip.vision_module is None:
    _fail(f"the CLIP at {clip.path!r} has no image tower; R-precision and FD need a full CLIP.")
  resolution = generated.shape[1] if generated is not None else (_RESOLUTION.value or 64)
  if _RESOLUTION.value and _RESOLUTION.value != resolution:
    _fail(f"--resolution {_RESOLUTION.value} differs from the generated images' {resolution}.")

  real, _ = shapes.generate(_DATA_SEED.value, range(n), resolution)
  reference, _ = shapes.generate(_DATA_SEED.value + 1, range(n), resolution)
  encode_text = lambda texts: clip.encode_text(texts).embedding
  text_embeds = _batched(encode_text, captions, batch)
  pool_texts = list(dict.fromkeys(pool))
  pool_embeds = _batched(encode_text, pool_texts, batch)
  distractors = pool_embeds[metrics.sample_distractors(captions, pool_texts, _NUM_DISTRACTORS.value,
                                                       seed=_DATA_SEED.value)]
  reference_embeds = _batched(lambda x: clip.encode_image(np.stack(x), value_range=(0, 255)), list(reference), batch)
  twin_embeds = _batched(encode_text, twin_captions, batch)
  score = lambda images: _scores(clip, images, captions, text_embeds, distractors, reference_embeds, twin_embeds,
                                 two_object, batch)

  rows = {}
  if generated is not None:
    rows["generated"] = score(generated)
  rows["real"] = score(real)

  settings = {"checkpoint": None if _REAL_ONLY.value else os.path.abspath(_CHECKPOINT.value),
              "clip": os.path.abspath(clip.path), "num_prompts": n, "data_seed": _DATA_SEED.value,
              "seed": _SEED.value, "resolution": int(resolution), "num_distractors": _NUM_DISTRACTORS.value,
              "preset": _PRESET.value, "up_to": _UP_TO.value, "prior": stage_flags.PRIOR.value,
              "prior_candidates": _CANDIDATES.value,
              "batch_size": batch, "device": f"{jax.local_device_count()} x {jax.devices()[0].device_kind} "
                                                          f"({jax.default_backend()})",
              "generation_seconds": gen_seconds, "prior_seconds": prior_seconds,
              "options": None if options is None else {k: dataclasses.asdict(v) for k, v in options.items()}}
  print(f"device: {settings['device']}; CLIP: {clip.path}; {n} captions of Shapes seed {_DATA_SEED.value} "
        f"({rows['real']['num_two_object']} with two objects), {resolution}x{resolution} px, "
        f"{_NUM_DISTRACTORS.value} distractors")
  if generated is not None:
    print(f"checkpoint: {_CHECKPOINT.value}; preset: {_PRESET.value or 'checkpoint default'}; up_to: "
          f"{_UP_TO.value or 'last stage'}; generation {gen_seconds:.1f} s ({gen_seconds / n:.2f} s/image, "
          f"of which the {stage_flags.PRIOR.value} prior {prior_seconds / n:.3f} s; after one untimed batch that "
          "compiles)")
  print()
  print("| images | R-precision | FD (CLIP z_i) | colour acc | shape acc | relation acc (two-object) | count acc "
        "| all correct | speckle | CLIP relation (two-object) |")
  print("|" + "---|" * 10)
  fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
  for name, r in rows.items():
    print(f"| {name} | {r['r_precision']:.3f} | {r['frechet_distance']:.4g} | {r['color']:.3f} | {r['shape']:.3f} "
          f"| {fmt(r['relation'])} | {r['count']:.3f} | {r['all_correct']:.3f} | {r['speckle']:.4f} "
          f"| {fmt(r['clip_relation'])} |")

  if _OUT.value and generated is not None:
    k = min(_GRID_SIZE.value, n)
    imaging.save_png(imaging.make_grid(generated[:k]), _OUT.value)
    listing = "\n".join(f"{i + 1}. {c}" for i, c in enumerate(captions[:k]))
    with open(os.path.splitext(_OUT.value)[0] + ".txt", "w") as f:
      f.write(listing + "\n")
    print(f"\ngrid of the first {k} images (row-major): {_OUT.value}\n{listing}")
  elif _OUT.value:
    print("\n--out: no generated images with --real_only; no grid written.")
  if _JSON.value:
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump({"settings": settings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
