"""Where a Shapes checkpoint loses shape and cleanliness: real scenes sent through each stage alone.

The captions of Shapes scenes 0..N-1 of --data_seed (12345, held out from training's seed 0) and
their exact renders, scored by the pixel analyser (unclip_jax/eval/shapes.py) at each row's own size:

  real                      the renders at the output size (the analyser's ceiling)
  real at decoder size      the renders shrunk to the decoder's size, as its training targets are:
                            what the base resolution itself can carry
  upsamplers on real        those shrunk renders through sr1 and sr2
  sr2 on real               the renders at sr2's input size through sr2 alone
  decoder, real z_i         the decoder on each render's own CLIP z_i and caption (no prior)
  decoder + upsamplers, real z_i
  text to image             the whole stack from the caption (the prior's z_i)

Each row reports colour, shape, relation (two-object captions), count, all correct (all of those
in the same image) and speckle (the fraction of off-white background pixels). Image i's noise is
seed i in every row. Sampling settings: the checkpoint's, then sample.py's per-stage flags.

  python -m benchmarks.shapes_stages [--checkpoint assets/shapes_demo] [--num_prompts 200] [--json OUT]
"""

import dataclasses
import json
import os

from absl import app, flags, logging

from unclip_jax import cli
from unclip_jax.cli import stage_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHECKPOINT = flags.DEFINE_string("checkpoint", os.path.join(ROOT, "assets", "shapes_demo"), "Inference checkpoint.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 200, "Scenes (one image each).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per pipeline call.")
_DATA_SEED = flags.DEFINE_integer("data_seed", 12345, "Shapes seed of the scenes (training uses 0).")
_JSON = flags.DEFINE_string("json", None, "Write the settings and rows as JSON here.")
_OUT = flags.DEFINE_string("out", None, "Write a PNG grid here: the first 8 scenes, one row per table row "
                           "(each resized to the output size).")
COLUMNS = ("color", "shape", "relation", "count", "all_correct", "speckle")


def main(argv):
  logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {' '.join(argv[1:])}")
  if _NUM_PROMPTS.value < 1 or _BATCH_SIZE.value < 1:
    raise app.UsageError("--num_prompts and --batch_size must be at least 1")
  cli.use_cpu_cores(_BATCH_SIZE.value)  # before JAX starts
  import numpy as np

  from unclip_jax import imaging
  from unclip_jax import pipeline as pipeline_lib
  from unclip_jax.data import shapes
  from unclip_jax.eval import shapes as evaluate

  try:
    pipe = pipeline_lib.Pipeline.load(_CHECKPOINT.value)
  except pipeline_lib.CheckpointError as e:
    raise app.UsageError(str(e).splitlines()[0]) from None
  options = stage_flags.apply(pipe.options_for("text"))
  n, batch = _NUM_PROMPTS.value, _BATCH_SIZE.value
  output = pipe.exports["sr2"].resolution
  decoder_size, sr2_input = pipe.decoder_resolution, pipe.exports["sr2"].low_res_resolution
  real, captions = shapes.generate(_DATA_SEED.value, range(n), output)
  seeds = list(range(n))

  def batched(fn, *arrays):
    return np.concatenate([fn(*(a[i:i + batch] for a in arrays)) for i in range(0, n, batch)])

  upsample = lambda images: batched(lambda x, s: pipe.upsample(x, list(s), options), images, np.array(seeds))
  z_i = batched(pipe.image_embeddings, real)
  decoded = batched(lambda z, c, s: pipe.decode(z, list(c), list(s), options, up_to="decoder"),
                    z_i, np.array(captions), np.array(seeds))
  real_small = imaging.resize_batch(real, decoder_size)
  rows = {
      "real": real,
      "real at decoder size": real_small,
      "upsamplers on real": upsample(real_small),
      "sr2 on real": upsample(imaging.resize_batch(real, sr2_input)),
      "decoder, real z_i": imaging.to_uint8(decoded),
      "decoder + upsamplers, real z_i": upsample(decoded),
      "text to image": batched(lambda c, s: pipe.text_to_image(list(c), list(s), options),
                               np.array(captions), np.array(seeds)),
  }
  results = {}
  print(f"{n} scenes of Shapes seed {_DATA_SEED.value}; checkpoint {_CHECKPOINT.value}\n")
  print("| images | size | colour | shape | relation (two-object) | count | all correct | speckle |")
  print("|---|---|---|---|---|---|---|---|")
  for name, images in rows.items():
    acc = evaluate.accuracies(evaluate.score_images(images, captions))
    results[name] = dict({k: acc[k] for k in COLUMNS}, size=int(images.shape[1]))
    print(f"| {name} | {images.shape[1]} | {acc['color']:.3f} | {acc['shape']:.3f} | {acc['relation']:.3f} "
          f"| {acc['count']:.3f} | {acc['all_correct']:.3f} | {acc['speckle']:.4f} |", flush=True)
  if _OUT.value:
    grid = np.concatenate([imaging.resize_batch(images[:8], output) for images in rows.values()])
    imaging.save_png(imaging.make_grid(grid, 8), _OUT.value)
  if _JSON.value:
    settings = {"checkpoint": os.path.abspath(_CHECKPOINT.value), "num_prompts": n, "data_seed": _DATA_SEED.value,
                "options": {k: dataclasses.asdict(v) for k, v in options.items()}}
    os.makedirs(os.path.dirname(os.path.abspath(_JSON.value)), exist_ok=True)
    with open(_JSON.value, "w") as f:
      json.dump({"settings": settings, "rows": results}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
