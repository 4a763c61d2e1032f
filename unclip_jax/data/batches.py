"""From a data config (configs/common.data_config) to this host's batches: the one place a
`config.data` becomes a stream, whatever its kind."""

import ml_collections

from unclip_jax.data import embeddings
from unclip_jax.data import loader
from unclip_jax.data import shapes
from unclip_jax.data import sources


def make_batches(data: ml_collections.ConfigDict, batch_size: int, resolution: int, example_fn=None):
  """(start, rows) -> batches (rows: this host's rows of each global batch, None for
  all; see data/ordering.py), from a data config with `kind`:
  shapes (seed), folder (path), tfds (name, split, image_key, caption_key, data_dir),
  embeddings (path: precomputed CLIP embeddings, see data/embeddings.py). Folders and tfds
  also take workers (decoding processes, 0: threads only), threads and prefetch (loader.py).
  `embeddings` (a store written from this very source) joins item i's precomputed z_t, z_i,
  tokens and mask to its image, so the decoder runs no CLIP; joined Shapes scenes are the
  store's num_examples first, shuffled like any finite source. example_fn: a stage's own
  per-example work, run in the decoding workers (loader.host_batches); the Shapes world's
  generated stream leaves it to the stage."""
  kind, joined = data.kind, data.get("embeddings") or ""
  options = dict(seed=data.get("seed", 0), workers=data.get("workers", 0), threads=data.get("threads", 8),
                 prefetch=data.get("prefetch", 2), random_flip=data.get("random_flip", False),
                 example_fn=example_fn)
  if kind == "shapes" and not joined:
    return lambda start, rows=None: _with_corrupt(shapes.batches(data.seed, resolution, batch_size, start=start,
                                                                 rows=rows))
  if kind == "embeddings":
    if not data.get("path"):
      raise ValueError("data.kind=embeddings needs data.path, written by `python -m unclip_jax.data.embeddings`.")
    if joined:
      raise ValueError("data.embeddings joins a store to images (kind folder, tfds or shapes); kind=embeddings "
                       "reads its store from data.path alone.")
    records = embeddings.EmbeddingShards(data.path, skip_corrupt=True)  # no images: the prior's data
  elif kind == "folder":
    if not data.get("path"):
      raise ValueError("data.kind=folder needs data.path, a folder of images with captions (or .tar shards).")
    records = sources.folder_source(data.path)
  elif kind == "tfds":
    records = sources.TfdsRecords(data.name, data.split, image_key=data.get("image_key", "image"),
                                  caption_key=data.get("caption_key", "captions/text"),
                                  data_dir=data.get("data_dir") or None)
  elif kind == "shapes":
    records = None  # joined: the store's first len(store) scenes, below
  else:
    raise ValueError(f"unknown data kind {kind!r}; expected 'shapes', 'folder', 'tfds' or 'embeddings'.")
  if joined:
    store = embeddings.EmbeddingShards(joined)
    if records is None:
      records = sources.ShapesRecords(data.get("seed", 0), len(store), resolution)
    records = embeddings.JoinedRecords(records, store)
  return lambda start, rows=None: loader.host_batches(records, start=start, batch_size=batch_size,
                                                      resolution=resolution, rows=rows, **options)


def _with_corrupt(stream):
  for batch in stream:
    yield dict(batch, corrupt=0, corrupt_names=[])
