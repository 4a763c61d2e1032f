"""Image-caption sources: tensorflow-datasets, folders (sidecar .txt or .jsonl),
webdataset .tar shards (img2dataset's layout), and the Shapes world.

Every source yields this host's batches {"image": uint8 [b, R, R, 3],
"caption": list[str], "index": int [b], "corrupt": int} from a global position
(examples consumed so far), so a resumed run continues the same stream; each
host takes its own share of every global batch. A corrupt image is replaced by
another image of the same batch and counted, never fatal.
"""

import json
import os
import tarfile
from typing import Callable, Iterator, Sequence

import ml_collections
import numpy as np
from PIL import Image

from unclip_jax.data import images as images_lib
from unclip_jax.data import ordering
from unclip_jax.data import shapes

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class RandomAccessSource:
  """Examples by index: a list of (image bytes loader, caption)."""

  def __init__(self, items: Sequence[tuple[Callable[[], bytes], str]], name: str):
    if not items:
      raise ValueError(f"No image-caption pairs found in {name}.")
    self.items = items
    self.name = name

  def __len__(self):
    return len(self.items)

  def example_order(self, global_index: int, seed: int) -> int:
    return ordering.shuffled_index(global_index, len(self.items), seed)

  def batches(self, start: int, batch_size: int, resolution: int, *, seed: int = 0,
              rows: np.ndarray | None = None) -> Iterator[dict]:
    for indices in ordering.host_batch_positions(start, batch_size, rows):
      pixels, captions, bad = [], [], []
      for i in indices:
        load, caption = self.items[self.example_order(int(i), seed)]
        try:
          pixels.append(images_lib.resize_center_crop(images_lib.decode(load()), resolution))
        except images_lib.DECODE_ERRORS:
          pixels.append(None)
          bad.append(len(pixels) - 1)
        captions.append(caption)
      good = [j for j in range(len(pixels)) if pixels[j] is not None]
      if not good:
        raise ValueError(f"Every image of a batch from {self.name} at position {indices[0]} failed to decode.")
      for n, j in enumerate(bad):  # stand-ins keep the batch shape and the stream position
        pixels[j], captions[j] = pixels[good[n % len(good)]], captions[good[n % len(good)]]
      yield {"image": np.stack(pixels), "caption": captions, "index": indices, "corrupt": len(bad)}


def _read_file(path):
  return lambda: open(path, "rb").read()


def folder_source(path: str) -> RandomAccessSource:
  """A folder of images with captions: *.jsonl lines {"image": relpath, "caption": text},
  else a sidecar NAME.txt beside each image, else webdataset *.tar shards."""
  if not os.path.isdir(path):
    raise ValueError(f"Data folder {path!r} does not exist.")
  names = sorted(os.listdir(path))
  jsonl = [n for n in names if n.endswith(".jsonl")]
  if jsonl:
    items = []
    for name in jsonl:
      with open(os.path.join(path, name)) as f:
        for line_no, line in enumerate(f, 1):
          if not line.strip():
            continue
          try:
            record = json.loads(line)
            items.append((_read_file(os.path.join(path, record["image"])), str(record["caption"])))
          except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{name}:{line_no}: expected {{\"image\": ..., \"caption\": ...}}, got "
                             f"{line.strip()[:80]!r}") from e
    return RandomAccessSource(items, path)
  tars = [n for n in names if n.endswith(".tar")]
  if tars:
    return webdataset_source([os.path.join(path, n) for n in tars])
  items = []
  for name in names:
    stem, suffix = os.path.splitext(name)
    if suffix.lower() in IMAGE_SUFFIXES and os.path.exists(os.path.join(path, stem + ".txt")):
      with open(os.path.join(path, stem + ".txt")) as f:
        items.append((_read_file(os.path.join(path, name)), f.read().strip()))
  return RandomAccessSource(items, path)


def webdataset_source(tar_paths: Sequence[str]) -> RandomAccessSource:
  """img2dataset / webdataset shards: members KEY.jpg (or png, webp) with KEY.txt captions."""
  items = []
  for tar_path in tar_paths:
    with tarfile.open(tar_path) as tar:
      members = {m.name: m for m in tar.getmembers() if m.isfile()}
      for name, member in sorted(members.items()):
        key, suffix = os.path.splitext(name)
        if suffix.lower() in IMAGE_SUFFIXES and key + ".txt" in members:
          caption = tar.extractfile(members[key + ".txt"]).read().decode("utf-8").strip()
          items.append((_tar_reader(tar_path, member.offset_data, member.size), caption))
  return RandomAccessSource(items, ", ".join(tar_paths))


def _tar_reader(path, offset, size):
  def read():
    with open(path, "rb") as f:
      f.seek(offset)
      return f.read(size)
  return read


def tfds_batches(name: str, split: str, *, image_key: str, caption_key: str, data_dir: str | None,
                 start: int, batch_size: int, resolution: int, seed: int = 0, rows: np.ndarray | None = None,
                 shuffle_buffer: int = 10_000) -> Iterator[dict]:
  """Any tensorflow-datasets image-caption set, e.g. coco_captions (caption_key
  "captions/text" takes the first caption of a list)."""
  import tensorflow as tf
  import tensorflow_datasets as tfds

  tf.config.set_visible_devices([], "GPU")  # keep TF off the accelerators JAX uses
  ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=False)
  ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True).skip(start)
  rows = ordering.check_rows(rows, batch_size)
  mine = set(rows.tolist())

  def field(example, key):
    for part in key.split("/"):
      example = example[part]
    return example

  # Images differ in size, so examples are gathered here rather than batched by tf.data.
  examples = iter(tfds.as_numpy(ds))
  position = start
  while True:
    pixels, captions = [], []
    for j in range(batch_size):
      example = next(examples)
      if j not in mine:
        continue
      pixels.append(images_lib.resize_center_crop(Image.fromarray(field(example, image_key)), resolution))
      caption = field(example, caption_key)
      caption = caption[0] if np.ndim(caption) else caption
      captions.append(caption.decode("utf-8") if isinstance(caption, bytes) else str(caption))
    indices = position + rows
    yield {"image": np.stack(pixels), "caption": captions, "index": indices, "corrupt": 0}
    position += batch_size


def make_batches(data: ml_collections.ConfigDict, batch_size: int, resolution: int):
  """(start, rows) -> batches (rows: this host's rows of each global batch, None for
  all; see data/ordering.py), from a data config with `kind`:
  shapes (seed), folder (path), tfds (name, split, image_key, caption_key, data_dir),
  embeddings (path: precomputed CLIP embeddings, see data/embeddings.py)."""
  kind = data.kind
  if kind == "shapes":
    return lambda start, rows=None: _with_corrupt(shapes.batches(data.seed, resolution, batch_size, start=start,
                                                                 rows=rows))
  if kind == "folder":
    source = folder_source(data.path)
    return lambda start, rows=None: source.batches(start, batch_size, resolution, seed=data.get("seed", 0),
                                                   rows=rows)
  if kind == "tfds":
    return lambda start, rows=None: tfds_batches(
        data.name, data.split, image_key=data.get("image_key", "image"),
        caption_key=data.get("caption_key", "captions/text"), data_dir=data.get("data_dir"), start=start,
        batch_size=batch_size, resolution=resolution, seed=data.get("seed", 0), rows=rows)
  if kind == "embeddings":
    from unclip_jax.data import embeddings
    store = embeddings.EmbeddingStore(data.path)
    return lambda start, rows=None: store.batches(start, batch_size, seed=data.get("seed", 0), rows=rows)
  raise ValueError(f"Unknown data kind {kind!r}; expected 'shapes', 'folder', 'tfds' or 'embeddings'.")


def _with_corrupt(stream):
  for batch in stream:
    yield dict(batch, corrupt=0)
