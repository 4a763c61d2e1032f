"""From a data config (configs/common.data_config) to this host's batches: the one place a
`config.data` becomes a stream, whatever its kind."""

import ml_collections

from unclip_jax.data import embeddings, loader, shapes, sources


def make_batches(data: ml_collections.ConfigDict, batch_size: int, resolution: int, example_fn=None):
  """(start, rows) -> batches (rows: this host's rows of each global batch, None for
  all; see data/ordering.py), from a data config with `kind`:
  shapes (seed), folder (path), tfds (name, split, image_key, caption_key, data_dir),
  embeddings (path: precomputed CLIP embeddings, written by unclip-embed). Folders and tfds
  also take workers (decoding processes, 0: threads only), threads and prefetch (loader.py).
  `embeddings` (a store written from this very source) joins item i's precomputed z_t, z_i,
  tokens and mask to its image, so the decoder runs no CLIP; joined Shapes scenes are the
  store's num_examples first, shuffled like any finite source. example_fn: a stage's own
  per-example work, run in the decoding workers (loader.host_batches); the Shapes world's
  generated stream leaves it to the stage."""
  options = dict(seed=data.get("seed", 0), workers=data.get("workers", 0), threads=data.get("threads", 8),
                 prefetch=data.get("prefetch", 2), random_flip=data.get("random_flip", False),
                 example_fn=example_fn)
  if data.kind == "shapes" and not data.get("embeddings"):
    return lambda start, rows=None: _with_corrupt(shapes.batches(data.seed, resolution, batch_size, start=start,
                                                                 rows=rows))
  records, _ = source_records(data, resolution)
  return lambda start, rows=None: loader.host_batches(records, start=start, batch_size=batch_size,
                                                      resolution=resolution, rows=rows, **options)


def source_records(data: ml_collections.ConfigDict, resolution: int, num_examples: int | None = None):
  """(records, description) of a finite source: random access to its items, as the loader and the
  embeddings writer (unclip-embed) read them; description is what a store written from it records.
  A Shapes world is endless: its first `num_examples` scenes (a joined store's length by default)."""
  kind, joined = data.kind, data.get("embeddings") or ""
  if kind == "embeddings":
    if not data.get("path"):
      raise ValueError("data.kind=embeddings needs data.path, a store written by unclip-embed.")
    if joined:
      raise ValueError("data.embeddings joins a store to images (kind folder, tfds or shapes); kind=embeddings "
                       "reads its store from data.path alone.")
    records = embeddings.EmbeddingShards(data.path, skip_corrupt=True)  # no images: the prior's data
    return records, {"kind": "embeddings", "path": data.path, "items": len(records)}
  store = embeddings.EmbeddingShards(joined) if joined else None
  if kind == "folder":
    if not data.get("path"):
      raise ValueError("data.kind=folder needs data.path, a folder of images with captions (or .tar shards).")
    records = sources.folder_source(data.path)
    description = {"kind": "folder", "path": data.path, "items": len(records)}
  elif kind == "tfds":
    records = sources.TfdsRecords(data.name, data.split, image_key=data.get("image_key", "image"),
                                  caption_key=data.get("caption_key", "captions/text"),
                                  data_dir=data.get("data_dir") or None)
    description = {"kind": "tfds", "name": data.name, "split": data.split, "items": len(records)}
  elif kind == "shapes":
    num_examples = num_examples or (len(store) if store is not None else None)
    if not num_examples:
      raise ValueError("a Shapes world is endless: say how many scenes (--num_examples).")
    records = sources.ShapesRecords(data.get("seed", 0), num_examples, resolution)
    description = {"kind": "shapes", "seed": data.get("seed", 0)}
  else:
    raise ValueError(f"unknown data kind {kind!r}; expected 'shapes', 'folder', 'tfds' or 'embeddings'.")
  if store is not None:
    records = embeddings.JoinedRecords(records, store)
  return records, description


def _with_corrupt(stream):
  for batch in stream:
    yield dict(batch, corrupt=0, corrupt_names=[])
