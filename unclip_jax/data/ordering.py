"""Which examples each host reads: global stream positions, shuffling, and the
rows of each global batch that a host owns.

A global batch at stream position p holds examples p .. p + B - 1, and row i
of the global array is always example p + i, whatever the number of hosts or
the mesh layout. A host reads exactly the rows its devices hold (parallel.host_rows),
so a run on 2 hosts trains on the same arrays, in the same order, as a run on
one host, and a stream resumed on another topology continues exactly.
"""

from collections.abc import Iterator

import grain
import numpy as np


def shuffled_order(num_items: int, seed: int) -> grain.MapDataset:
  """Global position -> item index, a fresh permutation of the items each epoch. grain's
  index_shuffle computes one position's item in O(1) (no permutation is ever built), so an
  index of a billion items costs nothing to start or resume anywhere."""
  if num_items < 1:
    raise ValueError("cannot shuffle an empty data set.")
  return grain.MapDataset.range(num_items).shuffle(seed=seed).repeat()


def check_rows(rows: np.ndarray | None, batch_size: int) -> np.ndarray:
  """rows as an int array (None: the whole batch), validated against batch_size."""
  if rows is None:
    return np.arange(batch_size)
  rows = np.asarray(rows, dtype=np.int64)
  if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= batch_size or np.any(np.diff(rows) <= 0):
    raise ValueError(f"rows must be sorted, unique offsets in [0, {batch_size}), got {rows}.")
  return rows


def host_batch_positions(start: int, batch_size: int, rows: np.ndarray | None = None) -> Iterator[np.ndarray]:
  """Global example positions of this host's rows of each global batch, from `start` on."""
  rows = check_rows(rows, batch_size)
  position = start
  while True:
    yield position + rows
    position += batch_size
