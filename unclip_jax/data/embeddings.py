"""Precomputed CLIP embeddings keyed by source item: row i holds item i's z_t, z_i, token encodings
and caption, so the prior trains without images or CLIP, and the decoder reads item i's image
beside its encodings (data.embeddings) instead of running CLIP each step.

  unclip-embed --clip DIR --out DIR --data_kind folder --data_path IMAGES [--num_examples N] ...
  (unclip_jax/cli/embed.py; python -m unclip_jax.cli.embed in a checkout)

Layout of --out (items in source order, never shuffled; N = num_examples, S = shard_size):
  shard-00000/ .. shard-K/   rows k*S .. min((k+1)*S, N) - 1 of:
      z_t.npy float32 [n, D], z_i.npy float32 [n, D], tokens.npy float16 [n, L, W], mask.npy bool [n, L],
      caption_bytes.npy uint8 [total] + caption_offsets.npy int64 [n + 1] (UTF-8, random access),
      shard.json (the settings it was written under, its corrupt items)
  index.json                 num_examples, shard_size, fields (dtype, shape), clip, source, corrupt items

Processes: process p of P writes the shards k with k % P == p (one command per process, on any
machines that share the folder). A shard is written under a temporary name and renamed once complete,
so an interrupted run resumes by running the same command again: complete shards are skipped. Whichever
process finds every shard complete writes index.json (the same content whoever writes it), so a reader
sees either no index or a complete store; rerunning any process after the others finished writes it too.

A corrupt image's row keeps its caption's text encodings and a zero z_i and is listed in index.json:
kind=embeddings skips it; joined to the images, it reads as a corrupt image, which the loader replaces.
Shards are memory-mapped (local or mounted paths), so a store larger than RAM reads fine.
"""

import collections
import dataclasses
import functools
import glob
import json
import math
import os
import shutil
import threading
import uuid
from typing import Any

import grain
import numpy as np
import tqdm.auto
from absl import flags

from unclip_jax.data import loader

FIELDS = {"z_t": np.float32, "z_i": np.float32, "tokens": np.float16, "mask": np.bool_}
INDEX = "index.json"
MAX_OPEN_SHARDS = 128  # each open shard holds 6 memory maps (file descriptors)


def shard_name(k: int) -> str:
  return f"shard-{k:05d}"


# ------------------------------------------------------------------------------------------ writing


def store_spec(clip, num_examples: int, shard_size: int, source: dict) -> dict:
  """What a store is written under; every shard records it, so a resume with other settings fails."""
  shapes_ = {"z_t": [clip.embed_dim], "z_i": [clip.embed_dim], "tokens": [clip.max_length, clip.text_width],
             "mask": [clip.max_length]}
  return {"num_examples": int(num_examples), "shard_size": int(shard_size),
          "num_shards": math.ceil(num_examples / shard_size),
          "fields": {k: {"dtype": np.dtype(t).name, "shape": shapes_[k]} for k, t in FIELDS.items()},
          "clip": str(clip.path), "source": source}


def _read_item(records, i):
  return int(i), records[int(i)]


def _decoded_batches(records, lo: int, hi: int, *, batch_size: int, resolution: int, workers: int, threads: int):
  """Items lo .. hi - 1 in index order, decoded at resolution, in batches (the last one short)."""
  ds = grain.MapDataset.range(lo, hi).map(functools.partial(_read_item, records))
  ds = ds.map(functools.partial(loader.decode_example, resolution=resolution)).batch(batch_size)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(threads, 1), prefetch_buffer_size=2))
  if workers > 0:
    if not flags.FLAGS.is_parsed():  # grain reads its absl flags; a library caller has none
      flags.FLAGS.mark_as_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2))
  return it


def _encode(clip, batch: dict, batch_size: int) -> dict:
  """A decoded batch -> its FIELDS; padded to batch_size so CLIP compiles once; corrupt rows' z_i zero."""
  captions = [str(c) for c in batch["caption"]]
  n, pad = len(captions), batch_size - len(captions)
  images = np.asarray(batch["image"])  # uint8 [n, R, R, 3]
  if pad:
    images = np.concatenate([images, np.repeat(images[-1:], pad, axis=0)])
  text = clip.encode_text(captions + captions[-1:] * pad)
  z_i = np.array(clip.encode_image(images, value_range=(0, 255)))[:n]
  z_i[~np.asarray(batch["ok"], bool)] = 0
  return {"z_t": np.asarray(text.embedding)[:n], "z_i": z_i, "tokens": np.asarray(text.tokens)[:n],
          "mask": np.asarray(text.mask)[:n]}


def _write_shard(clip, records, out_dir: str, k: int, spec: dict, *, batch_size: int, resolution: int,
                 workers: int, threads: int, bar) -> None:
  """Shard k under a temporary name, renamed to shard-k once every file is complete."""
  lo, hi = k * spec["shard_size"], min((k + 1) * spec["shard_size"], spec["num_examples"])
  for stale in glob.glob(os.path.join(out_dir, f".{shard_name(k)}.tmp-*")):  # an interrupted attempt
    shutil.rmtree(stale, ignore_errors=True)
  tmp = os.path.join(out_dir, f".{shard_name(k)}.tmp-{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  arrays = {f: np.lib.format.open_memmap(os.path.join(tmp, f"{f}.npy"), mode="w+", dtype=FIELDS[f],
                                         shape=(hi - lo, *spec["fields"][f]["shape"])) for f in FIELDS}
  captions, corrupt, row = [], [], 0
  for batch in _decoded_batches(records, lo, hi, batch_size=batch_size, resolution=resolution, workers=workers,
                                threads=threads):
    values = _encode(clip, batch, batch_size)
    n = len(values["z_t"])
    for f, v in values.items():
      arrays[f][row:row + n] = v
    captions += [str(c) for c in batch["caption"]]
    corrupt += [lo + row + j for j in np.flatnonzero(~np.asarray(batch["ok"], bool))]
    row += n
    bar.update(n)
  if row != hi - lo:
    raise RuntimeError(f"{shard_name(k)}: encoded {row} items, expected {hi - lo}.")
  for a in arrays.values():
    a.flush()
  del arrays
  encoded = [c.encode("utf-8") for c in captions]
  np.save(os.path.join(tmp, "caption_offsets.npy"), np.cumsum([0] + [len(c) for c in encoded], dtype=np.int64))
  np.save(os.path.join(tmp, "caption_bytes.npy"), np.frombuffer(b"".join(encoded), np.uint8))
  _write_json(os.path.join(tmp, "shard.json"), {"spec": spec, "rows": hi - lo, "corrupt": [int(c) for c in corrupt]})
  try:
    os.rename(tmp, os.path.join(out_dir, shard_name(k)))
  except OSError:
    if not os.path.isdir(os.path.join(out_dir, shard_name(k))):  # else another writer finished it first
      raise
    shutil.rmtree(tmp, ignore_errors=True)


def _write_json(path: str, value) -> None:
  """Atomically: a reader sees the old file or the new one, never half of it."""
  tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _complete_shard(out_dir: str, k: int, spec: dict) -> dict | None:
  """shard.json of a complete shard k (None if not written yet), checked against this run's settings."""
  info = _read_json(os.path.join(out_dir, shard_name(k), "shard.json"))
  if info is not None and info["spec"] != spec:
    raise ValueError(f"{out_dir}/{shard_name(k)} was written with other settings ({_changes(info['spec'], spec)}); "
                     "write to a fresh --out folder.")
  return info


def _changes(written: dict, now: dict) -> str:
  return ", ".join(f"{k}: {written.get(k)} -> {now.get(k)}" for k in sorted(set(written) | set(now))
                   if written.get(k) != now.get(k))


def finalize(out_dir: str, spec: dict) -> bool:
  """Writes index.json if every shard is complete; True if the store is complete."""
  infos = [_complete_shard(out_dir, k, spec) for k in range(spec["num_shards"])]
  if any(info is None for info in infos):
    return False
  corrupt = sorted(c for info in infos for c in info["corrupt"])
  _write_json(os.path.join(out_dir, INDEX), dict(spec, corrupt=corrupt))
  return True


def write(clip, records, out_dir: str, *, source: dict, num_examples: int | None = None, shard_size: int = 65536,
          batch_size: int = 64, resolution: int = 0, process_index: int = 0, process_count: int = 1,
          workers: int = 0, threads: int = 8, progress: bool = True) -> bool:
  """Encodes this process's shards of records[:num_examples] (all by default), skipping complete ones.

  source: how the records were made (index.json keeps it); resolution: the size images are decoded
  at before CLIP (0: CLIP's input size, so CLIP does not resample). Returns True once the whole
  store is complete (index.json written, by this process or an earlier one).
  """
  n = len(records) if num_examples is None else int(num_examples)
  if not 0 < n <= len(records):
    raise ValueError(f"num_examples must be in [1, {len(records)}] (the source's size), got {n}.")
  if shard_size < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"need shard_size >= 1 and 0 <= process_index < process_count, got {shard_size}, "
                     f"{process_index}, {process_count}.")
  if clip.preprocess is None:
    raise ValueError(f"{clip.path!r} is a text encoder only; z_i needs a full CLIP folder (its vision tower).")
  resolution = resolution or clip.preprocess.crop_size[0]
  spec = store_spec(clip, n, shard_size, dict(source, resolution=resolution))
  os.makedirs(out_dir, exist_ok=True)
  index = _read_json(os.path.join(out_dir, INDEX))
  if index is not None:
    written = {k: v for k, v in index.items() if k != "corrupt"}
    if written != spec:
      raise ValueError(f"{out_dir} holds embeddings written with other settings ({_changes(written, spec)}); "
                       "write to a fresh --out folder.")
    return True
  todo = [k for k in range(process_index, spec["num_shards"], process_count)
          if _complete_shard(out_dir, k, spec) is None]
  rows = sum(min((k + 1) * shard_size, n) - k * shard_size for k in todo)
  with tqdm.auto.tqdm(total=rows, desc="CLIP embeddings", disable=not progress) as bar:
    for k in todo:
      _write_shard(clip, records, out_dir, k, spec, batch_size=batch_size, resolution=resolution, workers=workers,
                   threads=threads, bar=bar)
  return finalize(out_dir, spec)


# ------------------------------------------------------------------------------------------ reading


def read_index(path: str) -> dict:
  index = _read_json(os.path.join(path, INDEX))
  if index is not None:
    return index
  started = glob.glob(os.path.join(path, "shard-*"))
  if started:
    raise FileNotFoundError(f"{path!r} holds {len(started)} complete shards but no {INDEX}: its writer has not "
                            "finished; run unclip-embed again with the same flags.")
  raise FileNotFoundError(f"{path!r} holds no embeddings (no {INDEX}); write them with "
                          "unclip-embed (python -m unclip_jax.cli.embed).")


class EmbeddingShards:
  """records[i] -> {"z_t": float32 [D], "z_i": float32 [D], "tokens": float16 [L, W], "mask": bool [L],
  "caption": str, "name": str} for source item i, read from memory-mapped shards.

  skip_corrupt: number only the items whose image encoded (kind=embeddings); the join keeps every
  index. Shards open lazily in each process (grain workers receive the path, not the maps), at
  most MAX_OPEN_SHARDS at once.
  """

  def __init__(self, path: str, *, skip_corrupt: bool = False):
    self.path = os.fspath(path)
    self.index = read_index(self.path)
    self.corrupt = np.asarray(self.index["corrupt"], np.int64)  # sorted item indices
    # Kept item j is item j + #(corrupt items before it): kept_before[t] kept items precede corrupt[t].
    self._kept_before = self.corrupt - np.arange(len(self.corrupt)) if skip_corrupt else None
    self._open, self._lock = collections.OrderedDict(), threading.Lock()

  def __len__(self) -> int:
    skipped = len(self.corrupt) if self._kept_before is not None else 0
    return self.index["num_examples"] - skipped

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_open", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state, _open=collections.OrderedDict(), _lock=threading.Lock())

  def item(self, i: int) -> int:
    """The source item behind record i."""
    if not 0 <= i < len(self):
      raise IndexError(f"record {i} of {len(self)}")
    if self._kept_before is None:
      return i
    return i + int(np.searchsorted(self._kept_before, i, side="right"))

  def _shard(self, k: int) -> dict:
    with self._lock:
      shard = self._open.pop(k, None)
      if shard is None:
        folder = os.path.join(self.path, shard_name(k))
        names = (*FIELDS, "caption_bytes", "caption_offsets")
        shard = {f: np.load(os.path.join(folder, f"{f}.npy"), mmap_mode="r") for f in names}
      self._open[k] = shard  # most recently used last
      while len(self._open) > MAX_OPEN_SHARDS:
        self._open.popitem(last=False)
    return shard

  def __getitem__(self, i: int) -> dict:
    item = self.item(int(i))
    k, row = divmod(item, self.index["shard_size"])
    shard = self._shard(k)
    out = {f: np.array(shard[f][row]) for f in FIELDS}
    a, b = shard["caption_offsets"][row:row + 2]
    out.update(caption=bytes(shard["caption_bytes"][a:b]).decode("utf-8"), name=f"{self.path}[{item}]")
    return out


@dataclasses.dataclass
class JoinedRecords:
  """Item i of an image source with row i of its precomputed embeddings: the decoder's data.

  An item whose image was corrupt when the store was written reads as a corrupt image (empty
  bytes), so the loader replaces it, embeddings included, as it does any corrupt image.
  """
  images: Any
  embeddings: EmbeddingShards

  def __post_init__(self):
    if len(self.images) != len(self.embeddings):
      raise ValueError(f"data.embeddings {self.embeddings.path!r} holds {len(self.embeddings)} items but the image "
                       f"source has {len(self.images)}; write them from this source with the same data flags.")
    self._corrupt = frozenset(int(c) for c in self.embeddings.corrupt)

  def __len__(self) -> int:
    return len(self.images)

  def __getitem__(self, i: int) -> dict:
    record, emb = self.images[int(i)], self.embeddings[int(i)]
    if str(record["caption"]) != emb["caption"]:
      raise ValueError(f"item {int(i)}: the embeddings' caption {emb['caption'][:60]!r} differs from the source's "
                       f"{str(record['caption'])[:60]!r}; they were written from another source or order.")
    out = dict(record, **{f: emb[f] for f in FIELDS})
    if int(i) in self._corrupt:
      out["image"] = b""
    return out
