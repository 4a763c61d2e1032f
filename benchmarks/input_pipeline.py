"""Can the input pipeline feed the train step? Images/s per host of data/loader.py against the
decoder's train step, measured in one run on one machine.

  JAX_PLATFORMS=cpu python -m benchmarks.input_pipeline [--items 1000000] [--batches 6]

Writes synthetic JPEGs to a temporary folder (smooth random images, 512 px for the 64 px decoder,
1024 px for sr2), indexes them as a 1M-item data set two ways -- a folder with a .jsonl index and
webdataset .tar shards (the items cycle through the files; the shuffle runs over all 1M) -- and
times this host's batches through grain with 0, 1 and 2 worker processes:
  * decoder: decode, resize and crop to 64 px (its input when the CLIP embeddings are precomputed);
  * sr2: decode to 1024 px and degrade to its 256 px input (BSR) in the same workers.
Then it times the 64 px decoder's real train step (benchmarks/train_throughput.py's decoder) on the
same machine. The files sit in the page cache: this measures decoding, not the disk or network.
The last line is `ratio input/train: X` for the decoder with 2 workers.
"""

import argparse
import io
import json
import os
import tarfile
import tempfile
import time

import jax
import numpy as np
from PIL import Image

from benchmarks import train_throughput
from configs import paper
from unclip_jax import optim, training
from unclip_jax.data import loader, sources
from unclip_jax.stages import upsampler


def synthetic_jpegs(folder: str, count: int, size: int, seed: int = 0) -> list[str]:
  """Smooth random colour images (a low-res noise field upsampled), JPEG quality 90, like photos in
  size on disk and decode cost."""
  rng = np.random.default_rng(seed)
  names = []
  for i in range(count):
    coarse = rng.integers(0, 256, (8, 8, 3), np.uint8)
    image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
    name = f"img{i:05d}_{size}.jpg"
    image.save(os.path.join(folder, name), quality=90)
    names.append(name)
  return names


def folder_index(folder: str, names: list[str], items: int) -> sources.FileRecords:
  """A .jsonl of `items` lines cycling through the files, read back by sources.folder_source."""
  with open(os.path.join(folder, "index.jsonl"), "w") as f:
    for i in range(items):
      f.write(json.dumps({"image": names[i % len(names)], "caption": f"item {i}"}) + "\n")
  return sources.folder_source(folder)


def shard_index(folder: str, names: list[str], items: int) -> sources.FileRecords:
  """The files packed into webdataset shards, indexed by sources.webdataset_source, then its
  records repeated to `items` (a shard per 1M images would be 100 GB here)."""
  shard = os.path.join(folder, "shard-00000.tar")
  with tarfile.open(shard, "w") as tar:
    for i, name in enumerate(names):
      for suffix, data in ((".jpg", open(os.path.join(folder, name), "rb").read()), (".txt", f"item {i}".encode())):
        info = tarfile.TarInfo(f"{i:09d}{suffix}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  base = sources.webdataset_source([shard])
  cycle = np.arange(items) % len(base)
  return sources.FileRecords([base.paths[i] for i in cycle], [f"item {i}" for i in range(items)],
                             base.offsets[cycle], base.sizes[cycle], "repeated shard")


def input_rate(records, *, batch_size: int, resolution: int, workers: int, threads: int, batches: int,
               example_fn=None) -> float:
  """Images/s in the steady state: the batches in flight when the workers start (threads per process,
  plus each worker's buffer) are taken before the clock starts, then `batches` are timed."""
  prefetch = 1
  stream = loader.host_batches(records, start=123_456, batch_size=batch_size, resolution=resolution,
                               workers=workers, threads=threads, prefetch=prefetch, seed=0, example_fn=example_fn)
  for _ in range(1 + (threads + prefetch) * max(workers, 1)):
    next(stream)
  start = time.perf_counter()
  for _ in range(batches):
    next(stream)
  return batches * batch_size / (time.perf_counter() - start)


def train_rate(width: int, batch: int, steps: int) -> float:
  """Images/s of the 64 px decoder's train step (forward, backward, AdamW, EMA) on this machine."""
  init, loss, data, stage = train_throughput.decoder_setup(width, batch, "float32")
  tx = optim.paper_adamw(stage)
  state = jax.jit(lambda key: training.init_state(init, tx, key))(jax.random.key(0))
  step = jax.jit(training.make_train_step(loss, tx, ema_decay=0.9999), donate_argnums=0)
  state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, data)
  jax.block_until_ready(metrics)
  return steps * batch / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--items", type=int, default=1_000_000, help="items in each index")
  parser.add_argument("--files", type=int, default=64, help="distinct JPEGs per size")
  parser.add_argument("--batches", type=int, default=8, help="timed batches per sr2 row (6x for the decoder)")
  parser.add_argument("--threads", type=int, default=2, help="decoding threads per process (2 cores here)")
  parser.add_argument("--width", type=int, default=64, help="the decoder's base channels (train step)")
  args = parser.parse_args()
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for stage, size, batch, resolution, batches in (("decoder", 512, 32, 64, 6 * args.batches),
                                                    ("sr2", 1024, 2, 1024, args.batches)):
      folder = os.path.join(tmp, stage)
      os.makedirs(folder)
      names = synthetic_jpegs(folder, args.files, size)
      start = time.perf_counter()
      indexes = {"folder + jsonl": folder_index(folder, names, args.items)}
      index_s = time.perf_counter() - start
      indexes["webdataset shards"] = shard_index(folder, names, args.items)
      example_fn = upsampler.example_fn(paper.get_config("sr2")) if stage == "sr2" else None
      for kind, records in indexes.items():
        for workers in (0, 1, 2):
          rate = input_rate(records, batch_size=batch, resolution=resolution, workers=workers,
                            threads=args.threads, batches=batches, example_fn=example_fn)
          rows.append((stage, f"{size} px JPEG -> {resolution} px" + (" + BSR 256 px" if stage == "sr2" else ""),
                       kind, len(records), workers, rate))
          print(rows[-1], flush=True)
      print(f"({stage}: indexing {args.items:,} jsonl lines took {index_s:.1f} s)", flush=True)
  train = train_rate(args.width, 8, 3)
  print(f"\n| stage | work per example | source | index items | workers x {args.threads} threads | images/s |\n"
        "|---|---|---|---|---|---|")
  for stage, work, kind, items, workers, rate in rows:
    print(f"| {stage} | {work} | {kind} | {items:,} | {workers} | {rate:.1f} |")
  print(f"| decoder | its train step (width {args.width}, batch 8, float32) | - | - | - | {train:.1f} |")
  best = [rate for stage, _, kind, _, workers, rate in rows if stage == "decoder" and workers == 2]
  print(f"ratio input/train: {min(best) / train:.1f}")


if __name__ == "__main__":
  main()
