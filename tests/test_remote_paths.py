"""Workdirs, exports and outputs as URIs (issue #21): a file:// run end to end, gs:// paths kept
intact, and the copy-through used for writers and readers that only take local folders."""

import os

import numpy as np
import pytest
from toy_stage import ToyStage, toy_batches, toy_config

from unclip_jax import checkpoints, imaging, paths, train_loop
from unclip_jax.cli import sample as sample_cli
from unclip_jax.stages import clip as clip_stage


def _steps(folder):
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def test_file_uri_workdir_trains_resumes_exports_and_samples(tmp_path, monkeypatch):
  cwd = tmp_path / "cwd"  # a URI passed to os.path would land here as "file:/..."
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  run = tmp_path / "run"
  uri = run.as_uri()
  assert uri.startswith("file:///")
  train_loop.train(toy_config(4, checkpoint_every=2, sample_every=2), uri, ToyStage(), toy_batches)
  assert _steps(run / "checkpoints")[-2:] == [2, 4]
  assert sorted(os.listdir(run / "samples")) == ["step_00000002.png", "step_00000004.png"]
  assert imaging.load_image(run / "samples" / "step_00000004.png").shape[-1] == 3
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(run))

  starts = []

  def recording(start, rows=None):
    starts.append(start)
    return toy_batches(start, rows)

  train_loop.train(toy_config(6, checkpoint_every=2, sample_every=2), uri, ToyStage(), recording)
  assert starts == [4 * 8]  # resumed from step 4's data position
  assert _steps(run / "checkpoints")[-3:] == [2, 4, 6]
  assert checkpoints.Checkpointer(uri, save_every=2).latest_step() == 6
  params, config = checkpoints.load_inference(f"{uri}/export")
  assert config == {"stage": "toy"} and params["dense"]["kernel"].shape == (8, 16)
  assert os.listdir(cwd) == []


def test_gs_paths_are_not_mangled():
  # No file system access: only the path objects the loop and the checkpointer would use.
  for uri in ("gs://bucket/run", "gs://bucket/run/"):
    assert paths.is_remote(uri)
    assert os.fspath(paths.as_path(uri)) == "gs://bucket/run"
    assert os.fspath(paths.absolute(uri)) == "gs://bucket/run"
    assert os.fspath(paths.as_path(uri) / "export") == "gs://bucket/run/export"
    assert os.fspath(checkpoints.checkpoint_dir(uri)) == "gs://bucket/run/checkpoints"
  assert os.fspath(paths.as_path("file:///tmp/run")) == "/tmp/run"
  assert os.fspath(paths.as_path("file://localhost/tmp/a%20b")) == "/tmp/a b"
  assert not paths.is_remote("file:///tmp/run") and not paths.is_remote("runs/x")
  assert os.fspath(paths.as_path("runs/x") / "export") == "runs/x/export"  # relative stays relative
  assert os.fspath(checkpoints.checkpoint_dir("runs/x")) == os.path.join(os.getcwd(), "runs/x/checkpoints")
  with pytest.raises(ValueError, match="this machine"):
    paths.as_path("file://otherhost/tmp/run")


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """A local folder that paths treats as remote, so the copy-through branches run without a bucket."""
  bucket = tmp_path / "bucket"
  real = paths.is_remote
  monkeypatch.setattr(paths, "is_remote", lambda p: os.fspath(p).startswith(str(bucket)) or real(p))
  return bucket


def test_local_only_writers_and_readers_go_through_a_local_copy(fake_bucket):
  tok = clip_stage.write_word_tokenizer(["red", "circle"], fake_bucket / "tokenizer", 16)
  assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= set(os.listdir(fake_bucket / "tokenizer"))
  with paths.local_copy(fake_bucket / "tokenizer") as local:
    assert not local.startswith(str(fake_bucket))
    assert sorted(os.listdir(local)) == sorted(os.listdir(fake_bucket / "tokenizer"))
  assert not os.path.exists(local)  # the temporary copy is gone
  with paths.local_copy(fake_bucket / "missing") as local:
    assert not os.path.exists(local)
  assert tok("red circle")["input_ids"][1:3] == [tok.get_vocab()["red</w>"], tok.get_vocab()["circle</w>"]]

  image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
  imaging.save_png(image, fake_bucket / "png" / "x.png")
  np.testing.assert_array_equal(imaging.load_image(str(fake_bucket / "png" / "x.png")), image)


def test_sampling_outputs_to_a_file_uri(tmp_path):
  images = np.zeros((2, 4, 4, 3), np.uint8)
  written = sample_cli.write_outputs((tmp_path / "out").as_uri(), images, [("a red circle", 0), ("a red circle", 1)],
                                     {}, {"mode": "text"})
  assert all(p.startswith(str(tmp_path / "out")) and os.path.isfile(p) for p in written)
  assert len(written) == 3 and os.path.isfile(str(tmp_path / "out" / "a_red_circle_seed0.json"))
