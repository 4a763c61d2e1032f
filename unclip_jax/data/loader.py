"""This host's batches from a random-access image-caption source, through grain.

The stream is a pure function of the global position (data/ordering.py): global position p
holds item order[p] (an epoch-wise shuffle computed per position), and a host reads only its
rows of each global batch. So a run resumes at any position without replaying the stream,
on any number of hosts, and decoding can run in any number of worker processes: grain hands
each worker whole batches and interleaves them back in order, so the batches do not depend on
the worker count.

    records[i] -> {"image": encoded bytes or uint8 [H, W, 3], "caption": str, "name": str, ...}
    host_batches(...) -> {"image": uint8 [b, R, R, 3], "caption": list[str], "index": int [b],
                          "corrupt": int, "corrupt_names": list[str], ...}

Fields besides these (arrays of a fixed shape, e.g. precomputed CLIP embeddings) are batched as
they are; a record without an image (an embedding store's) skips decoding.

A corrupt image is replaced by another image of the same batch (its caption too) and
counted, never fatal; data/sources.py builds the records, the train loop logs the count.
"""

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from PIL import Image

from unclip_jax import imaging
from unclip_jax.data import ordering

ExampleFn = Callable[[dict], dict]


class HostRows(grain.MapDataset):
  """Element k of this host's stream: (global position, records[order[position]]), where the
  position is start + (k // n) * batch_size + rows[k % n] for this host's n rows."""

  def __init__(self, records: Sequence, order: grain.MapDataset, start: int, batch_size: int, rows: np.ndarray):
    super().__init__([])
    self._records, self._order = records, order
    self._start, self._batch_size, self._rows = start, batch_size, rows

  def __len__(self) -> int:
    return len(self._order)  # endless: epochs repeat, each reshuffled

  def position(self, k: int) -> int:
    batch, row = divmod(k, len(self._rows))
    return self._start + batch * self._batch_size + int(self._rows[row])

  def __getitem__(self, k):
    if isinstance(k, slice):
      return self.slice(k)
    p = self.position(k)
    return p, self._records[self._order[p]]

  def __str__(self) -> str:
    return f"HostRows(start={self._start}, batch_size={self._batch_size}, rows={len(self._rows)})"


def decode_example(example: tuple[int, dict], resolution: int) -> dict:
  """(position, record) -> one example: the image (if the record has one) decoded at resolution x
  resolution, "ok" False if it did not decode; other fields (e.g. precomputed embeddings) as they are."""
  position, record = example
  out = {k: v for k, v in record.items() if k != "image"}
  out.update(index=np.int64(position), ok=True, name=str(record.get("name", position)))
  if "caption" in record:
    out["caption"] = str(record["caption"])
  if "image" in record:
    try:
      image = record["image"]
      image = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else imaging.decode(image)
      out["image"] = imaging.resize_center_crop(image, resolution)
    except imaging.DECODE_ERRORS:
      out["image"], out["ok"] = np.zeros((resolution, resolution, 3), np.uint8), False
  return out


def replace_corrupt(batch: dict) -> dict:
  """Stacked examples -> a training batch; a corrupt example takes a good one's fields (image,
  caption, ...), so the batch keeps its shape and the stream its positions."""
  ok = np.asarray(batch.pop("ok"))
  names = [str(n) for n in batch.pop("name")]
  out = {k: [str(c) for c in v] if k == "caption" else np.array(v) for k, v in batch.items()}
  good, bad = np.flatnonzero(ok), np.flatnonzero(~ok)
  if not len(good):
    raise ValueError(f"every image of the batch at position {int(out['index'][0])} failed to decode "
                     f"(e.g. {names[0]}).")
  for n, j in enumerate(bad):
    for k, v in out.items():
      if k != "index":
        v[j] = v[good[n % len(good)]]
  return dict(out, corrupt=len(bad), corrupt_names=[names[j] for j in bad])


def prepare_example(example: tuple[int, dict], resolution: int, example_fn: ExampleFn | None,
                    flip_seed: int | None = None) -> dict:
  """decode_example, a horizontal flip with probability 1/2 if flip_seed is set (drawn from the seed
  and the global position), then the stage's own per-example work (example_fn; on a corrupt
  example's zero image too, so every example has the same fields to batch)."""
  out = decode_example(example, resolution)
  if flip_seed is not None and "image" in out and np.random.default_rng([flip_seed, out["index"]]).random() < 0.5:
    out["image"] = np.ascontiguousarray(out["image"][:, ::-1])
  return example_fn(out) if example_fn is not None else out


def host_batches(records: Sequence[dict[str, Any]], *, start: int, batch_size: int, resolution: int,
                 rows: np.ndarray | None = None, seed: int = 0, workers: int = 0, threads: int = 8,
                 prefetch: int = 2, example_fn: ExampleFn | None = None, random_flip: bool = False
                 ) -> Iterator[dict]:
  """This host's rows of every global batch from global position `start`, decoded and resized.

  workers: decoding processes (0: threads of this process, which PIL's codecs release the GIL
  for); threads: batches decoded at once per process (each a thread, and buffered); prefetch:
  batches each worker process buffers for this one.
  example_fn: more per-example work done where the decoding is (e.g. the upsamplers' degraded
  low-res input), a picklable function of the example (its "index" is its global position:
  seed from it, and the result is the same on any number of workers and hosts). A corrupt
  example then takes a good example's fields, these included. random_flip: off by default, as
  a flip contradicts captions that say left or right.
  """
  rows = ordering.check_rows(rows, batch_size)
  ds = HostRows(records, ordering.shuffled_order(len(records), seed), start, batch_size, rows)
  prepare = functools.partial(prepare_example, resolution=resolution, example_fn=example_fn,
                              flip_seed=seed if random_flip else None)
  ds = ds.map(prepare).batch(len(rows)).map(replace_corrupt)
  threads = max(threads, 1)  # grain's threads only work on batches its buffer has room for
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=threads))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller (notebook, test) has none
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  for batch in it:  # arrays copied out of grain's shared memory
    yield {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}
