"""Evaluation of any folder of images against its captions with a CLIP (`python -m unclip_jax.eval`).

Captions come from each image's JSON sidecar (sample.py writes NAME.json with the "prompt" beside
NAME.png) or from a file of one caption per line, matched to the images' sorted names. sample.py's
grids (grid_*.png, which have no sidecar) are not images of the set. Every input is checked before
any model is loaded (read_inputs, check_clip_dir), each problem a one-line InputError.

The metrics (unclip_jax/eval/metrics.py), all on CLIP embeddings:
  clip_score:  100 * mean max(cos, 0) of image and own caption (torchmetrics' CLIPScore);
  clip_s:      2.5 * mean max(cos, 0), Hessel et al. 2021's CLIP-S;
  r_precision: the fraction of images whose own caption beats K distractors, K = min(20, distinct
               captions - 1), drawn (seed 0) from the other images' captions (different texts only);
               null when all images share one caption;
  frechet_clip_distance (with a reference folder): Frechet distance between Gaussians fitted to the
               two sets' CLIP image embeddings.
"""

import json
import os
from collections.abc import Sequence

import numpy as np

from unclip_jax import imaging
from unclip_jax.eval import metrics

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_KEY = "prompt"  # what sample.py's sidecars call the caption
MAX_DISTRACTORS = 20


class InputError(ValueError):
  """A folder, caption file or CLIP folder that cannot be evaluated."""


def image_files(folder: str, flag: str = "--images") -> list[str]:
  """The folder's image paths, sorted by name, without sample.py's grids (grid_*.png with no sidecar)."""
  if not os.path.isdir(folder):
    raise InputError(f"{flag} {folder!r} is not a folder.")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES)
                 and not (n.startswith("grid_") and not os.path.exists(_sidecar(os.path.join(folder, n)))))
  if not names:
    raise InputError(f"{flag} {folder!r} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
  return [os.path.join(folder, n) for n in names]


def _sidecar(image_path: str) -> str:
  return os.path.splitext(image_path)[0] + ".json"


def captions_from_sidecars(files: Sequence[str]) -> list[str]:
  """Each image's caption from its NAME.json's "prompt"."""
  captions = []
  for path in files:
    sidecar = _sidecar(path)
    try:
      with open(sidecar) as f:
        caption = json.load(f).get(CAPTION_KEY)
    except FileNotFoundError:
      raise InputError(f"{os.path.basename(path)} has no caption sidecar {os.path.basename(sidecar)}: pass "
                       f"--captions FILE (one caption per line, in the images' name order).") from None
    except (OSError, ValueError, AttributeError) as e:
      raise InputError(f"{sidecar} is not a JSON object: {e}.") from None
    if not isinstance(caption, str) or not caption.strip():
      raise InputError(f"{sidecar} has no non-empty {CAPTION_KEY!r}: pass --captions FILE instead.")
    captions.append(caption.strip())
  return captions


def captions_from_file(path: str, count: int) -> list[str]:
  """The non-blank lines of a text file, one per image."""
  try:
    with open(path) as f:
      captions = [line.strip() for line in f if line.strip()]
  except OSError as e:
    raise InputError(f"cannot read --captions {path!r}: {e.strerror or e}.") from None
  if len(captions) != count:
    raise InputError(f"--captions {path!r} has {len(captions)} captions for {count} images (one per line, "
                     "in the images' sorted name order).")
  return captions


def read_images(files: Sequence[str]) -> list[np.ndarray]:
  """uint8 RGB [H, W, 3] arrays, read as sample.py reads its inputs (imaging.load_image: transparency
  composited on white)."""
  try:
    return [imaging.load_image(path) for path in files]
  except imaging.ImageError as e:
    raise InputError(str(e)) from None


def check_clip_dir(path: str) -> None:
  """A full CLIP folder (with its vision tower) in Hugging Face format, checked without loading it."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise InputError(f"--clip {path!r} is not a CLIP folder: no config.json (a Hugging Face CLIPModel folder, "
                     "e.g. openai/clip-vit-large-patch14 or runs/shapes/clip/export).")
  try:
    with open(config_path) as f:
      model_type = json.load(f).get("model_type")
  except (OSError, ValueError, AttributeError) as e:
    raise InputError(f"--clip {path!r}: its config.json does not read: {e}.") from None
  if model_type != "clip":
    raise InputError(f"--clip {path!r} is a {model_type!r} model; scoring images needs a full CLIPModel "
                     "(model_type 'clip', with its vision tower).")


def embed_images(clip, images: Sequence[np.ndarray], batch_size: int = 32) -> np.ndarray:
  """CLIP image embeddings [N, D]; images of one size are encoded together, batch_size at a time."""
  out = [None] * len(images)
  by_shape = {}
  for i, image in enumerate(images):
    by_shape.setdefault(image.shape, []).append(i)
  for rows in by_shape.values():
    for start in range(0, len(rows), batch_size):
      chunk = rows[start:start + batch_size]
      embeds = np.asarray(clip.encode_image(np.stack([images[i] for i in chunk])), np.float64)
      for i, e in zip(chunk, embeds):
        out[i] = e
  return np.stack(out)


def embed_texts(clip, captions: Sequence[str], batch_size: int = 64) -> np.ndarray:
  """CLIP text embeddings z_t [N, D]."""
  return np.concatenate([np.asarray(clip.encode_text(list(captions[i:i + batch_size])).embedding, np.float64)
                         for i in range(0, len(captions), batch_size)])


def scores(image_embeds, text_embeds, captions: Sequence[str], reference_embeds=None, seed: int = 0) -> dict:
  """The metrics of a set (see the module docstring) from its embeddings."""
  distinct = len(set(captions))
  k = min(MAX_DISTRACTORS, distinct - 1)
  out = {"num_images": len(captions), "clip_score": metrics.clip_score(image_embeds, text_embeds),
         "clip_s": metrics.clip_score(image_embeds, text_embeds, weight=2.5),
         "r_precision": (metrics.r_precision(image_embeds, text_embeds, captions=captions, num_distractors=k,
                                             seed=seed) if k > 0 else None),
         "r_precision_distractors": max(k, 0)}
  if reference_embeds is not None:
    out["frechet_clip_distance"] = metrics.frechet_distance(image_embeds, reference_embeds)
    out["num_reference_images"] = len(reference_embeds)
  return out
