"""Image-caption sources: folders, jsonl, webdataset shards, tfds mock data."""

import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import batches as data_batches
from unclip_jax.data import loader, ordering, sources


def _png(color, size=(40, 30)):
  buf = io.BytesIO()
  Image.new("RGB", size, color).save(buf, format="PNG")
  return buf.getvalue()


COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _sidecar_folder(root):
  for i, color in enumerate(COLORS):
    (root / f"img{i}.png").write_bytes(_png(color))
    (root / f"img{i}.txt").write_text(f"caption {i}\n")
  return root


def _batches(records, start, batch_size, resolution, **kw):
  return loader.host_batches(records, start=start, batch_size=batch_size, resolution=resolution, **kw)


def _first_pixel_to_caption(batch):
  return {tuple(img[0, 0]): cap for img, cap in zip(batch["image"], batch["caption"])}


def test_sidecar_folder_pairs_images_with_captions(tmp_path):
  source = sources.folder_source(str(_sidecar_folder(tmp_path)))
  batch = next(_batches(source, 0, 6, 16))
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.uint8
  pairs = _first_pixel_to_caption(batch)
  assert pairs == {c: f"caption {i}" for i, c in enumerate(COLORS)}  # one epoch: every example once
  as_uri = next(_batches(sources.folder_source(f"file://{tmp_path}"), 0, 6, 16))
  np.testing.assert_array_equal(as_uri["image"], batch["image"])


def test_jsonl_folder_and_clear_error_on_bad_lines(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(COLORS[0]))
  (tmp_path / "b.png").write_bytes(_png(COLORS[1]))
  (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n" +
                                       json.dumps({"image": "b.png", "caption": "green"}) + "\n")
  batch = next(_batches(sources.folder_source(str(tmp_path)), 0, 2, 8))
  assert _first_pixel_to_caption(batch) == {COLORS[0]: "red", COLORS[1]: "green"}
  (tmp_path / "data.jsonl").write_text('{"img": "a.png"}\n')
  with pytest.raises(ValueError, match=r"data.jsonl:1: expected"):
    sources.folder_source(str(tmp_path))


def test_webdataset_shards_as_img2dataset_writes_them(tmp_path):
  shard = tmp_path / "00000.tar"
  with tarfile.open(shard, "w") as tar:
    for i, color in enumerate(COLORS[:4]):
      for suffix, data in ((".jpg", _png(color)), (".txt", f"tar caption {i}".encode()),
                           (".json", b"{}")):
        info = tarfile.TarInfo(f"{i:09d}{suffix}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
  source = sources.folder_source(str(tmp_path))
  assert len(source) == 4
  batch = next(_batches(source, 0, 4, 8))
  assert _first_pixel_to_caption(batch) == {c: f"tar caption {i}" for i, c in enumerate(COLORS[:4])}


def test_corrupt_images_are_counted_and_replaced(tmp_path):
  _sidecar_folder(tmp_path)
  (tmp_path / "img2.png").write_bytes(b"not an image at all")
  (tmp_path / "img4.png").write_bytes(_png(COLORS[4])[:60])  # truncated
  batch = next(_batches(sources.folder_source(str(tmp_path)), 0, 6, 8))
  assert batch["corrupt"] == 2 and batch["image"].shape == (6, 8, 8, 3)
  assert COLORS[2] not in _first_pixel_to_caption(batch)
  assert sorted(batch["corrupt_names"]) == [str(tmp_path / "img2.png"), str(tmp_path / "img4.png")]


def test_streams_resume_and_split_across_hosts(tmp_path):
  source = sources.folder_source(str(_sidecar_folder(tmp_path)))
  stream = _batches(source, 0, 4, 8, seed=3)
  first, second = next(stream), next(stream)
  resumed = next(_batches(source, 4, 4, 8, seed=3))
  assert resumed["caption"] == second["caption"]
  # Two hosts owning interleaved rows read exactly those rows of the same global batch.
  hosts = [next(_batches(source, 4, 4, 8, seed=3, rows=np.arange(k, 4, 2))) for k in range(2)]
  merged = [c for pair in zip(hosts[0]["caption"], hosts[1]["caption"]) for c in pair]
  assert merged == second["caption"]
  np.testing.assert_array_equal(hosts[1]["index"], [5, 7])
  assert first["caption"] != second["caption"]


def test_worker_processes_do_not_change_the_stream(tmp_path):
  """grain hands each worker whole batches: 0 or 2 decoding processes, the same batches."""
  _sidecar_folder(tmp_path)
  (tmp_path / "img1.png").write_bytes(b"corrupt")
  source = sources.folder_source(str(tmp_path))
  take = lambda it: [next(it) for _ in range(4)]  # noqa: E731
  inline, workers = (take(_batches(source, 2, 4, 8, seed=5, workers=w)) for w in (0, 2))
  for a, b in zip(inline, workers):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["caption"] == b["caption"] and a["corrupt"] == b["corrupt"]
    np.testing.assert_array_equal(a["index"], b["index"])
  assert sum(b["corrupt"] for b in inline) >= 1


def test_random_flip_mirrors_about_half_the_images_by_position(tmp_path):
  rng = np.random.default_rng(0)
  for i in range(16):
    Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(tmp_path / f"{i}.png")
    (tmp_path / f"{i}.txt").write_text(str(i))
  source = sources.folder_source(str(tmp_path))
  plain, flipped = (next(_batches(source, 0, 16, 8, random_flip=f)) for f in (False, True))
  mirrored = [not np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"])]
  assert all(np.array_equal(a[:, ::-1], b) or np.array_equal(a, b) for a, b in zip(plain["image"], flipped["image"]))
  assert 3 <= sum(mirrored) <= 13 and flipped["caption"] == plain["caption"]
  again = next(_batches(source, 0, 16, 8, random_flip=True, workers=0))
  np.testing.assert_array_equal(again["image"], flipped["image"])  # a function of the seed and position


def test_shuffled_order_is_a_fresh_permutation_each_epoch_at_any_size():
  order = ordering.shuffled_order(50, seed=7)
  epochs = [[order[e * 50 + i] for i in range(50)] for e in range(3)]
  assert all(sorted(e) == list(range(50)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  assert [ordering.shuffled_order(50, seed=7)[i] for i in range(50)] == epochs[0]  # a function of the seed
  # A trillion-item index: one position's item without building a permutation (which would need 8 TB).
  huge = ordering.shuffled_order(10**12, seed=0)
  assert 0 <= huge[5 * 10**12 + 3] < 10**12


def test_tfds_random_access_resumes_and_splits_across_hosts():
  """tfds through tfds.data_source: a resumed stream is the same stream (nothing replayed), and
  two hosts owning interleaved rows read exactly those rows."""
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=10):
    records = sources.TfdsRecords("coco_captions", "train")
    stream = _batches(records, 0, 4, 16, seed=1)
    batches = [next(stream) for _ in range(4)]  # crosses an epoch (10 examples)
    resumed = next(_batches(records, 8, 4, 16, seed=1))
    hosts = [next(_batches(records, 8, 4, 16, seed=1, rows=np.arange(k, 4, 2))) for k in range(2)]
  assert len(records) == 10
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  assert resumed["caption"] == batches[2]["caption"]
  np.testing.assert_array_equal(np.stack([hosts[0]["image"], hosts[1]["image"]], 1).reshape(4, 16, 16, 3),
                                batches[2]["image"])
  np.testing.assert_array_equal(hosts[1]["index"], [9, 11])


def test_tfds_mock_coco_captions():
  import tensorflow_datasets as tfds

  data = ml_collections.ConfigDict(dict(kind="tfds", name="coco_captions", split="train",
                                        image_key="image", caption_key="captions/text", data_dir=None))
  with tfds.testing.mock_data(num_examples=8):
    batch = next(data_batches.make_batches(data, 4, 32)(0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])


@pytest.mark.parametrize("stage", ["clip", "prior", "decoder", "sr1"])
def test_shapes_configs_take_a_folder_of_images(stage, tmp_path):
  """docs/training.md: --config.data.kind=folder --config.data.path=... on any Shapes config."""
  from configs import shapes as shapes_configs

  config = shapes_configs.get_config(f"{stage},tiny")
  config.data.update(kind="folder", path=str(_sidecar_folder(tmp_path)), workers=0)
  batch = next(data_batches.make_batches(config.data, 6, config.resolution)(0))
  assert batch["image"].shape == (6, config.resolution, config.resolution, 3)
  assert sorted(batch["caption"]) == [f"caption {i}" for i in range(6)]
  config.data.kind = "embeddings"
  with pytest.raises(FileNotFoundError, match="holds no embeddings"):
    data_batches.make_batches(config.data, 6, config.resolution)


def test_unknown_kind_and_missing_folder():
  with pytest.raises(ValueError, match="unknown data kind"):
    data_batches.make_batches(ml_collections.ConfigDict({"kind": "laion"}), 4, 8)
  with pytest.raises(ValueError, match="does not exist"):
    sources.folder_source("/nonexistent/folder")
