"""Scores any folder of images with a CLIP: CLIPScore, R-precision, and a Frechet distance in CLIP
space against a reference folder.

  python -m unclip_jax.eval --images DIR --clip CLIP_DIR [--captions FILE] [--reference DIR] [--json OUT]

Captions come from each image's NAME.json sidecar ("prompt", as sample.py writes them) or from
--captions (one per line, in the images' sorted name order). Metrics: unclip_jax/eval/folder.py,
docs/evaluation.md. Inception FID needs Inception weights that are not shipped; the Frechet distance
here is computed on CLIP image embeddings instead (not comparable with published FIDs).
"""

import argparse
import json
import sys

from unclip_jax.eval import folder
from unclip_jax.models import clip as clip_lib


def parser() -> argparse.ArgumentParser:
  """argparse, not absl flags: module-level absl flags (--clip, ...) would clash with sample.py's in any
  process that imports both."""
  p = argparse.ArgumentParser(prog="python -m unclip_jax.eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--images", required=True, help="folder of images to score (PNG, JPEG, WebP, BMP)")
  p.add_argument("--clip", required=True, help="CLIP folder (Hugging Face CLIPModel format, with its vision tower)")
  p.add_argument("--captions", help="text file, one caption per line, matched to the sorted image names "
                 "(default: each image's NAME.json sidecar, its \"prompt\")")
  p.add_argument("--reference", help="folder of reference images: adds the Frechet distance between the two "
                 "sets' CLIP image embeddings")
  p.add_argument("--json", help="write the scores to this JSON file")
  p.add_argument("--batch_size", type=int, default=32, help="images per CLIP call")
  return p


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


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:  # every input before any model is loaded
    images, captions, reference = read_inputs(args.images, args.captions, args.reference)
    folder.check_clip_dir(args.clip)
    clip = clip_lib.load_clip(args.clip)
  except (ValueError, FileNotFoundError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  image_embeds = folder.embed_images(clip, images, args.batch_size)
  reference_embeds = folder.embed_images(clip, reference, args.batch_size) if reference is not None else None
  results = folder.scores(image_embeds, folder.embed_texts(clip, captions), captions, reference_embeds)
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(results, images=args.images, clip=args.clip, reference=args.reference), f, indent=2)
  return 0


def run():
  """`python -m unclip_jax.eval` (and the unclip-eval console script)."""
  sys.exit(main())


if __name__ == "__main__":
  run()
