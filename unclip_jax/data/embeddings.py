"""Precomputed CLIP embeddings, so the prior trains without running CLIP each step.

  python -m unclip_jax.data.embeddings --clip DIR --out DIR --num_examples N \\
      --data_kind folder --data_path IMAGES   # or --data_kind shapes / tfds

runs frozen CLIP once over the first N examples of a data set (in stream order
from position 0) and writes one .npy per field: z_t [N, D], z_i [N, D],
tokens [N, L, W] (float16), mask [N, L], plus captions.jsonl and meta.json.
The files are memory-mapped for reading, so a data set larger than RAM works.
"""

import json
import os
from typing import Iterator

import numpy as np

from unclip_jax.data import ordering

FIELDS = {"z_t": np.float32, "z_i": np.float32, "tokens": np.float16, "mask": np.bool_}


def write(clip, batches: Iterator[dict], num_examples: int, out_dir: str, *, progress: bool = True) -> str:
  """Encodes examples from `batches` (image + caption) until num_examples are written."""
  import tqdm.auto

  os.makedirs(out_dir, exist_ok=True)
  shapes = {"z_t": (clip.embed_dim,), "z_i": (clip.embed_dim,), "tokens": (clip.max_length, clip.text_width),
            "mask": (clip.max_length,)}
  arrays = {k: np.lib.format.open_memmap(os.path.join(out_dir, f"{k}.npy"), mode="w+", dtype=FIELDS[k],
                                         shape=(num_examples,) + shapes[k]) for k in FIELDS}
  written = 0
  with open(os.path.join(out_dir, "captions.jsonl"), "w") as captions, \
      tqdm.auto.tqdm(total=num_examples, desc="CLIP embeddings", disable=not progress) as bar:
    while written < num_examples:
      batch = next(batches)
      take = min(len(batch["caption"]), num_examples - written)
      text = clip.encode_text(batch["caption"][:take])
      values = {"z_t": text.embedding, "tokens": text.tokens, "mask": text.mask,
                "z_i": clip.encode_image(batch["image"][:take], value_range=(0, 255))}
      for k, v in values.items():
        arrays[k][written:written + take] = np.asarray(v, FIELDS[k])
      for c in batch["caption"][:take]:
        captions.write(json.dumps(c) + "\n")
      written += take
      bar.update(take)
  for a in arrays.values():
    a.flush()
  with open(os.path.join(out_dir, "meta.json"), "w") as f:
    json.dump({"num_examples": num_examples, "clip": os.path.abspath(clip.path)}, f, indent=2)
  return out_dir


class EmbeddingStore:
  """Read side: memory-mapped fields, batches by example index."""

  def __init__(self, path: str):
    meta_path = os.path.join(path, "meta.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"{path!r} holds no embeddings (no meta.json); write them with "
                              "`python -m unclip_jax.data.embeddings`.")
    with open(meta_path) as f:
      self.meta = json.load(f)
    self.arrays = {k: np.load(os.path.join(path, f"{k}.npy"), mmap_mode="r") for k in FIELDS}
    with open(os.path.join(path, "captions.jsonl")) as f:
      self.captions = [json.loads(line) for line in f]

  def __len__(self):
    return self.meta["num_examples"]

  def get(self, indices) -> dict:
    indices = np.asarray(indices)
    out = {k: np.asarray(a[np.sort(indices)])[np.argsort(np.argsort(indices))] for k, a in self.arrays.items()}
    out["tokens"] = out["tokens"].astype(np.float32)
    out["caption"] = [self.captions[i] for i in indices]
    return out

  def batches(self, start: int, batch_size: int, *, seed: int = 0, rows: np.ndarray | None = None
              ) -> Iterator[dict]:
    """This host's rows of each global batch, in epoch-shuffled order from position `start`."""
    order = ordering.shuffled_order(len(self), seed)
    for positions in ordering.host_batch_positions(start, batch_size, rows):
      items = [order[int(p)] for p in positions]
      yield dict(self.get(items), index=positions, corrupt=0)


def main(argv):
  del argv
  import ml_collections
  from absl import flags

  from unclip_jax.data import sources
  from unclip_jax.models import clip as clip_lib

  f = flags.FLAGS
  clip = clip_lib.load_clip(f.clip)
  data = ml_collections.ConfigDict({"kind": f.data_kind, "path": f.data_path, "name": f.tfds_name,
                                    "split": f.tfds_split, "seed": f.seed, "data_dir": None})
  stream = sources.make_batches(data, f.batch_size, f.resolution)(0)
  write(clip, stream, f.num_examples, f.out)


if __name__ == "__main__":
  from absl import app
  from absl import flags

  flags.DEFINE_string("clip", None, "CLIP folder (Hugging Face format).", required=True)
  flags.DEFINE_string("out", None, "Output folder.", required=True)
  flags.DEFINE_integer("num_examples", None, "How many examples to encode.", required=True)
  flags.DEFINE_enum("data_kind", "shapes", ["shapes", "folder", "tfds"], "Data source.")
  flags.DEFINE_string("data_path", None, "Folder for --data_kind folder.")
  flags.DEFINE_string("tfds_name", "coco_captions", "Data set for --data_kind tfds.")
  flags.DEFINE_string("tfds_split", "train", "Split for --data_kind tfds.")
  flags.DEFINE_integer("seed", 0, "Data seed (Shapes world).")
  flags.DEFINE_integer("batch_size", 64, "Encoding batch size.")
  flags.DEFINE_integer("resolution", 224, "Image size handed to CLIP's preprocessing.")
  app.run(main)
