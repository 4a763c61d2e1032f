"""Image-caption sources: folders, jsonl, webdataset shards, tfds mock data."""

import io
import json
import tarfile

import ml_collections
import numpy as np
import pytest
from PIL import Image

from unclip_jax.data import sources


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


def _first_pixel_to_caption(batch):
  return {tuple(img[0, 0]): cap for img, cap in zip(batch["image"], batch["caption"])}


def test_sidecar_folder_pairs_images_with_captions(tmp_path):
  source = sources.folder_source(str(_sidecar_folder(tmp_path)))
  batch = next(source.batches(0, 6, 16))
  assert batch["image"].shape == (6, 16, 16, 3) and batch["image"].dtype == np.uint8
  pairs = _first_pixel_to_caption(batch)
  assert pairs == {c: f"caption {i}" for i, c in enumerate(COLORS)}  # one epoch: every example once


def test_jsonl_folder_and_clear_error_on_bad_lines(tmp_path):
  (tmp_path / "a.png").write_bytes(_png(COLORS[0]))
  (tmp_path / "b.png").write_bytes(_png(COLORS[1]))
  (tmp_path / "data.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n" +
                                       json.dumps({"image": "b.png", "caption": "green"}) + "\n")
  batch = next(sources.folder_source(str(tmp_path)).batches(0, 2, 8))
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
  batch = next(source.batches(0, 4, 8))
  assert _first_pixel_to_caption(batch) == {c: f"tar caption {i}" for i, c in enumerate(COLORS[:4])}


def test_corrupt_images_are_counted_and_replaced(tmp_path):
  _sidecar_folder(tmp_path)
  (tmp_path / "img2.png").write_bytes(b"not an image at all")
  (tmp_path / "img4.png").write_bytes(_png(COLORS[4])[:60])  # truncated
  batch = next(sources.folder_source(str(tmp_path)).batches(0, 6, 8))
  assert batch["corrupt"] == 2 and batch["image"].shape == (6, 8, 8, 3)
  assert COLORS[2] not in _first_pixel_to_caption(batch)


def test_streams_resume_and_split_across_hosts(tmp_path):
  source = sources.folder_source(str(_sidecar_folder(tmp_path)))
  stream = source.batches(0, 4, 8, seed=3)
  first, second = next(stream), next(stream)
  resumed = next(source.batches(4, 4, 8, seed=3))
  assert resumed["caption"] == second["caption"]
  # Two hosts owning interleaved rows read exactly those rows of the same global batch.
  hosts = [next(source.batches(4, 4, 8, seed=3, rows=np.arange(k, 4, 2))) for k in range(2)]
  merged = [c for pair in zip(hosts[0]["caption"], hosts[1]["caption"]) for c in pair]
  assert merged == second["caption"]
  np.testing.assert_array_equal(hosts[1]["index"], [5, 7])
  assert first["caption"] != second["caption"]


def test_tfds_mock_coco_captions():
  import tensorflow_datasets as tfds

  data = ml_collections.ConfigDict(dict(kind="tfds", name="coco_captions", split="train",
                                        image_key="image", caption_key="captions/text", data_dir=None))
  with tfds.testing.mock_data(num_examples=8):
    batch = next(sources.make_batches(data, 4, 32)(0))
  assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
  assert len(batch["caption"]) == 4 and all(isinstance(c, str) for c in batch["caption"])


def test_unknown_kind_and_missing_folder():
  with pytest.raises(ValueError, match="Unknown data kind"):
    sources.make_batches(ml_collections.ConfigDict({"kind": "laion"}), 4, 8)
  with pytest.raises(ValueError, match="does not exist"):
    sources.folder_source("/nonexistent/folder")
