"""Precomputed CLIP embeddings: sharded by source item, written by several processes and resumable,
equal to CLIP's own encodings, streamed to the prior alone and joined to images for the decoder."""

import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import shapes as shapes_configs
from unclip_jax.data import batches as data_batches
from unclip_jax.data import embeddings, shapes
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import decoder, prior, text

BATCH = 3  # one encoding batch size everywhere: CLIP compiles once for the module


@pytest.fixture(scope="module")
def clip(shapes_clip_dir):
  return clip_lib.load_clip(shapes_clip_dir)


def _folder(root, n, corrupt=()):
  """Shapes scenes 0 .. n-1 as 32 px PNGs with sidecar captions, in index order; `corrupt` ones unreadable."""
  root.mkdir()
  images, captions = shapes.generate(0, range(n), 32)
  for i in range(n):
    if i in corrupt:
      (root / f"scene-{i:02d}.png").write_bytes(b"not a png")
    else:
      Image.fromarray(images[i]).save(root / f"scene-{i:02d}.png")
    (root / f"scene-{i:02d}.txt").write_text(captions[i])
  return str(root)


def _data(kind, **fields):
  """A training config's `data` (configs/common.data_config's keys that the source reads)."""
  return ml_collections.ConfigDict(dict(kind=kind, seed=0, **fields))


def _assert_equals_clip(clip, store, images, captions):
  got = {k: np.stack([store[i][k] for i in range(len(store))]) for k in embeddings.FIELDS}
  assert [store[i]["caption"] for i in range(len(store))] == captions
  text = clip.encode_text(captions)
  np.testing.assert_allclose(got["z_t"], np.asarray(text.embedding), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["tokens"], np.asarray(text.tokens), rtol=1e-3, atol=1e-3)  # float16
  np.testing.assert_array_equal(got["mask"], np.asarray(text.mask))
  z_i = clip.encode_image(images, value_range=(0, 255))
  np.testing.assert_allclose(got["z_i"], np.asarray(z_i), rtol=1e-5, atol=1e-6)


def test_two_processes_write_shards_that_resume(tmp_path, clip, monkeypatch):
  records, source = data_batches.source_records(_data("folder", path=_folder(tmp_path / "images", 10)), 32)
  out = str(tmp_path / "emb")
  kw = dict(source=source, shard_size=4, batch_size=BATCH, resolution=32, process_count=2, progress=False)
  assert not embeddings.write(clip, records, out, process_index=0, **kw)  # shards 0 and 2 (4 + 2 items)
  assert sorted(os.listdir(out)) == ["shard-00000", "shard-00002"]
  with pytest.raises(FileNotFoundError, match="has not finished"):
    embeddings.EmbeddingShards(out)
  assert embeddings.write(clip, records, out, process_index=1, **kw)  # shard 1, then the index
  store = embeddings.EmbeddingShards(out)
  assert len(store) == 10 and store.index["num_shards"] == 3 and store.index["corrupt"] == []
  images, captions = shapes.generate(0, range(10), 32)
  _assert_equals_clip(clip, store, images, captions)

  # Interrupted: shard 1 lost, a half-written attempt left behind, no index. The rerun encodes shard 1 only.
  shutil.rmtree(os.path.join(out, "shard-00001"))
  os.remove(os.path.join(out, "index.json"))
  os.makedirs(os.path.join(out, ".shard-00001.tmp-dead"))
  encoded = []
  original = embeddings._encode
  monkeypatch.setattr(embeddings, "_encode", lambda c, b, n: encoded.append(len(b["caption"])) or original(c, b, n))
  assert embeddings.write(clip, records, out, process_index=1, **kw)
  assert sum(encoded) == 4 and sorted(os.listdir(out)) == ["index.json", "shard-00000", "shard-00001", "shard-00002"]
  _assert_equals_clip(clip, embeddings.EmbeddingShards(out), images, captions)
  with pytest.raises(ValueError, match="other settings"):
    embeddings.write(clip, records, out, **dict(kw, shard_size=5, process_count=1))


def test_corrupt_images_are_skipped_alone_and_replaced_when_joined(tmp_path, clip):
  folder = _folder(tmp_path / "images", 4, corrupt=(2,))
  records, source = data_batches.source_records(_data("folder", path=folder), 32)
  out = str(tmp_path / "emb")
  assert embeddings.write(clip, records, out, source=source, shard_size=3, batch_size=BATCH, resolution=32,
                          progress=False)
  assert embeddings.EmbeddingShards(out).index["corrupt"] == [2]
  alone = embeddings.EmbeddingShards(out, skip_corrupt=True)
  assert [alone.item(i) for i in range(len(alone))] == [0, 1, 3]
  data = shapes_configs.get_config("decoder,tiny").data
  data.update(kind="folder", path=folder, embeddings=out)
  batch = next(data_batches.make_batches(data, 4, 32)(0))
  assert batch["corrupt"] == 1 and batch["corrupt_names"][0].endswith("scene-02.png")
  assert np.all(np.abs(batch["z_i"]).sum(1) > 0)  # the stand-in brought its own z_i


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory, clip):
  """Shapes scenes 0 .. 11 in shards of 5 (5, 5, 2)."""
  out = str(tmp_path_factory.mktemp("shapes_emb"))
  records, source = data_batches.source_records(_data("shapes"), 32, num_examples=12)
  assert embeddings.write(clip, records, out, source=source, shard_size=5, batch_size=BATCH, resolution=32,
                          progress=False)
  return out


def test_decoder_reads_precomputed_embeddings_equal_to_clip(shapes_store, clip, tmp_path):
  config = shapes_configs.get_config("decoder,tiny")
  config.data.embeddings = shapes_store  # kind stays shapes: scenes 0 .. 11 joined to their rows
  host = next(data_batches.make_batches(config.data, 8, config.resolution)(0))
  assert host["image"].shape == (8, 32, 32, 3) and host["tokens"].dtype == np.float16
  stage = decoder.DecoderStage(config, clip, host)
  pre = stage.encode_batch(host)
  run = stage.encode_batch({"image": host["image"], "caption": host["caption"]})  # CLIP on the same items
  assert {k: (v.shape, v.dtype) for k, v in pre.items()} == {k: (v.shape, v.dtype) for k, v in run.items()}
  np.testing.assert_array_equal(pre["image"], run["image"])
  np.testing.assert_array_equal(pre["mask"], run["mask"])
  for k in ("z_i", "z_t"):
    np.testing.assert_allclose(pre[k], run[k], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(pre["tokens"], run["tokens"], rtol=1e-3, atol=1e-3)  # stored as float16
  # An image source of another size is refused in one line.
  config.data.update(kind="folder", path=_folder(tmp_path / "images", 10))
  with pytest.raises(ValueError, match="holds 12 items but the image source has 10"):
    data_batches.make_batches(config.data, 8, config.resolution)


def test_prior_streams_shards_once_per_epoch_and_resumes(shapes_store, clip):
  config = shapes_configs.get_config("prior,tiny")
  config.data.update(kind="embeddings", path=shapes_store)
  batches = data_batches.make_batches(config.data, 4, config.resolution)
  stream = batches(0)
  epoch = [text.encode_batch(clip, next(stream)) for _ in range(3)]  # 12 items
  store = embeddings.EmbeddingShards(shapes_store)
  rows = np.concatenate([b["z_i"] for b in epoch])
  np.testing.assert_array_equal(np.sort(rows, axis=0), np.sort(np.stack([store[i]["z_i"] for i in range(12)]), axis=0))
  assert len({r.tobytes() for r in rows}) == 12
  assert epoch[0]["tokens"].dtype == np.float32 and epoch[0]["mask"].dtype == bool
  resumed = text.encode_batch(clip, next(batches(4)))
  for k, v in resumed.items():
    np.testing.assert_array_equal(v, epoch[1][k])
  stage = prior.PriorStage(config, clip, epoch)  # latent stats from the stream, as build.build takes them
  np.testing.assert_allclose(stage.stats["clip_mean"], rows.mean(0), rtol=1e-5, atol=1e-7)


def test_missing_store_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="unclip-embed"):
    embeddings.EmbeddingShards(str(tmp_path))


def test_unclip_embed_writes_the_store_training_reads(shapes_store, shapes_clip_dir, tmp_path):
  """The command writes the rows the library writes (another shard and batch size), and says what
  is wrong with bad flags in one line."""
  out = str(tmp_path / "cli")
  command = [sys.executable, "-m", "unclip_jax.cli.embed", "--clip", shapes_clip_dir, "--out", out,
             "--data_kind", "shapes", "--num_examples", "4", "--shard_size", "3", "--batch_size", "2",
             "--resolution", "32"]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  store, reference = embeddings.EmbeddingShards(out), embeddings.EmbeddingShards(shapes_store)
  assert len(store) == 4 and store.index["num_shards"] == 2 and store.index["source"] == reference.index["source"]
  for i in range(4):
    assert store[i]["caption"] == reference[i]["caption"]
    for k in embeddings.FIELDS:
      np.testing.assert_allclose(np.asarray(store[i][k], np.float32), np.asarray(reference[i][k], np.float32),
                                 rtol=1e-3, atol=1e-3)
  bad = subprocess.run(command[:-8], env=env, capture_output=True, text=True, timeout=600)  # no --num_examples
  assert bad.returncode != 0 and "Traceback" not in bad.stderr
  last_line = bad.stderr.strip().splitlines()[-1]
  assert last_line == "error: a Shapes world is endless: say how many scenes (--num_examples)."
