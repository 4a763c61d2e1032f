"""Scores any folder of images with a CLIP: CLIPScore, R-precision, and a Frechet distance in CLIP
space against a reference folder.

  python -m unclip_jax.eval --images DIR --clip CLIP_DIR [--captions FILE] [--reference DIR] [--json OUT]

Captions come from each image's NAME.json sidecar ("prompt", as sample.py writes them) or from
--captions (one per line, in the images' sorted name order). Metrics: unclip_jax/eval/folder.py,
docs/evaluation.md. Inception FID needs Inception weights that are not shipped; the Frechet distance
here is computed on CLIP image embeddings instead (not comparable with published FIDs).
"""

import json
import sys

from absl import app, flags

from unclip_jax import cli
from unclip_jax.eval import folder
from unclip_jax.models import clip as clip_lib

_IMAGES = flags.DEFINE_string("images", None, "Folder of images to score (PNG, JPEG, WebP, BMP).")
_CAPTIONS = flags.DEFINE_string("captions", None, "Text file, one caption per line, matched to the sorted image "
                                "names (default: each image's NAME.json sidecar, its \"prompt\").")
_CLIP = flags.DEFINE_string("clip", None, "CLIP folder (Hugging Face CLIPModel format, with its vision tower).")
_REFERENCE = flags.DEFINE_string("reference", None, "Folder of reference images: adds the Frechet distance "
                                 "between the two sets' CLIP image embeddings.")
_JSON = flags.DEFINE_string("json", None, "Write the scores to this JSON file.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per CLIP call.")


def read_inputs(images_dir: str, captions_file: str | None, reference_dir: str | None):
  """(images, captions, reference images or None), every problem a folder.InputError."""
  files = folder.image_files(images_dir)
  captions = (folder.captions_from_file(captions_file, len(files)) if captions_file
              else folder.captions_from_sidecars(files))
  reference = folder.image_files(reference_dir, "--reference") if reference_dir else None
  if reference is not None and min(len(files), len(reference)) < 2:
    raise folder.InputError(f"a Frechet distance needs at least 2 images on each side; --images has {len(files)}, "
                            f"--reference {len(reference)}.")
  return folder.read_images(files), captions, folder.read_images(reference) if reference else None


def table(results: dict) -> str:
  """The scores as a two-column Markdown table."""
  rows = [f"| {k} | {'n/a' if v is None else f'{v:.4f}' if isinstance(v, float) else v} |"
          for k, v in results.items()]
  return "\n".join(["| metric | value |", "|---|---|", *rows])


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
  if not _IMAGES.value or not _CLIP.value:
    sys.exit("error: --images and --clip are required, e.g. python -m unclip_jax.eval --images samples/ "
             "--clip runs/shapes/clip/export")
  try:  # every input before any model is loaded
    images, captions, reference = read_inputs(_IMAGES.value, _CAPTIONS.value, _REFERENCE.value)
    folder.check_clip_dir(_CLIP.value)
    clip = clip_lib.load_clip(_CLIP.value)
  except (ValueError, FileNotFoundError, OSError) as e:
    sys.exit(f"error: {e}")
  image_embeds = folder.embed_images(clip, images, _BATCH.value)
  reference_embeds = folder.embed_images(clip, reference, _BATCH.value) if reference is not None else None
  results = folder.scores(image_embeds, folder.embed_texts(clip, captions), captions, reference_embeds)
  print(table(results))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump(dict(results, images=_IMAGES.value, clip=_CLIP.value, reference=_REFERENCE.value), f, indent=2)


def run():
  """`python -m unclip_jax.eval` (and the unclip-eval console script)."""
  cli.show_in_help(__name__, __doc__)
  app.run(main)


if __name__ == "__main__":
  run()
