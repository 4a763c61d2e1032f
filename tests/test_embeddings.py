"""Precomputed CLIP embeddings: written once, read back equal, streamed like any source."""

import ml_collections
import numpy as np
import pytest

from unclip_jax.data import embeddings, shapes, sources
from unclip_jax.models import clip as clip_lib


def test_store_round_trip_equals_clip(tmp_path, shapes_clip_dir):
  clip = clip_lib.load_clip(shapes_clip_dir)
  embeddings.write(clip, shapes.batches(0, 32, 4), 10, str(tmp_path), progress=False)  # 10: a partial batch
  store = embeddings.EmbeddingStore(str(tmp_path))
  assert len(store) == 10
  images, captions = shapes.generate(0, range(10), 32)
  text = clip.encode_text(captions)
  got = store.get([7, 2, 9])
  assert got["caption"] == [captions[7], captions[2], captions[9]]
  np.testing.assert_allclose(got["z_t"], np.asarray(text.embedding)[[7, 2, 9]], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["tokens"], np.asarray(text.tokens)[[7, 2, 9]], rtol=1e-3, atol=1e-3)  # float16
  np.testing.assert_array_equal(got["mask"], np.asarray(text.mask)[[7, 2, 9]])
  z_i = clip.encode_image(images, value_range=(0, 255))
  np.testing.assert_allclose(got["z_i"], np.asarray(z_i)[[7, 2, 9]], rtol=1e-5, atol=1e-6)
  # As a data source: one epoch visits every example once, resumably.
  batches = sources.make_batches(ml_collections.ConfigDict({"kind": "embeddings", "path": str(tmp_path)}), 5, 0)
  stream = batches(0)
  epoch = next(stream)["caption"] + next(stream)["caption"]
  assert sorted(epoch) == sorted(captions)
  assert next(batches(5))["caption"] == epoch[5:]


def test_missing_store_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="python -m unclip_jax.data.embeddings"):
    embeddings.EmbeddingStore(str(tmp_path))
