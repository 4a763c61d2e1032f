"""This host's batches from a random-access image-caption source, through grain.

The stream is a pure function of the global position (data/ordering.py): global position p
holds item order[p] (an epoch-wise shuffle computed per position), and a host reads only its
rows of each global batch. So a run resumes at any position without replaying the stream,
on any number of hosts, and decoding can run in any number of worker processes: grain hands
each worker whole batches and interleaves them back in order, so the batches do not depend on
the worker count.

    records[i] -> {"image": encoded bytes or uint8 [H, W, 3], "caption": str, "name": str}
    host_batches(...) -> {"image": uint8 [b, R, R, 3], "caption": list[str], "index": int [b],
                          "corrupt": int, "corrupt_names": list[str]}

A corrupt image is replaced by another image of the same batch (its caption too) and
counted, never fatal; data/sources.py builds the records, the train loop logs the count.
"""

import functools
from collections.abc import Iterator, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags
from PIL import Image

from unclip_jax.data import images as images_lib
from unclip_jax.data import ordering


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
  """(position, record) -> one example at resolution x resolution; "ok" False if it did not decode."""
  position, record = example
  try:
    image = record["image"]
    image = Image.fromarray(np.asarray(image)) if isinstance(image, np.ndarray) else images_lib.decode(image)
    pixels, ok = images_lib.resize_center_crop(image, resolution), True
  except images_lib.DECODE_ERRORS:
    pixels, ok = np.zeros((resolution, resolution, 3), np.uint8), False
  return {"image": pixels, "caption": str(record["caption"]), "index": np.int64(position), "ok": ok,
          "name": str(record["name"])}


def replace_corrupt(batch: dict) -> dict:
  """Stacked examples -> a training batch; a corrupt example takes a good one's image and
  caption, so the batch keeps its shape and the stream its positions."""
  ok = np.asarray(batch["ok"])
  images, captions = np.array(batch["image"]), [str(c) for c in batch["caption"]]
  good, bad = np.flatnonzero(ok), np.flatnonzero(~ok)
  if not len(good):
    raise ValueError(f"every image of the batch at position {int(batch['index'][0])} failed to decode "
                     f"(e.g. {batch['name'][0]}).")
  for n, j in enumerate(bad):
    images[j], captions[j] = images[good[n % len(good)]], captions[good[n % len(good)]]
  return {"image": images, "caption": captions, "index": np.asarray(batch["index"], np.int64),
          "corrupt": len(bad), "corrupt_names": [str(batch["name"][j]) for j in bad]}


def host_batches(records: Sequence[dict[str, Any]], *, start: int, batch_size: int, resolution: int,
                 rows: np.ndarray | None = None, seed: int = 0, workers: int = 0, threads: int = 8,
                 prefetch: int = 2) -> Iterator[dict]:
  """This host's rows of every global batch from global position `start`, decoded and resized.

  workers: decoding processes (0: threads of this process, which PIL's codecs release the GIL
  for); threads: batches decoded at once per process; prefetch: batches buffered per process.
  """
  rows = ordering.check_rows(rows, batch_size)
  ds = HostRows(records, ordering.shuffled_order(len(records), seed), start, batch_size, rows)
  ds = ds.map(functools.partial(decode_example, resolution=resolution)).batch(len(rows)).map(replace_corrupt)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=max(prefetch, 1)))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller (notebook, test) has none
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=max(prefetch, 1)))
  for batch in it:
    yield dict(batch, image=np.array(batch["image"]), index=np.array(batch["index"]))
