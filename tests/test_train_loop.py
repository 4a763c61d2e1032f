"""The shared training loop: resume, preemption, divergence, export, visibility."""

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util
from toy_stage import ToyStage, toy_batches, toy_config

from unclip_jax import checkpoints, train_loop

TOY = os.path.join(os.path.dirname(__file__), "toy_stage.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script_env():
  # conftest.py's XLA_FLAGS (8 devices, its compile settings): the programs this process compiles.
  return dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")


def _params(workdir):
  return checkpoints.load_inference(os.path.join(workdir, "export"))[0]


@pytest.mark.slow
def test_resume_in_a_new_process_equals_a_straight_run(tmp_path):
  straight = tmp_path / "straight"
  train_loop.train(toy_config(6), str(straight), ToyStage(), toy_batches)
  resumed = tmp_path / "resumed"
  # Steps 1-3 here (what `python tests/toy_stage.py DIR 3` runs), then steps 4-6 in a new process.
  train_loop.train(toy_config(3), str(resumed), ToyStage(), toy_batches)
  assert checkpoints.Checkpointer(str(resumed), save_every=1).latest_step() == 3
  subprocess.run([sys.executable, TOY, str(resumed), "6"], check=True, env=_script_env(), capture_output=True)
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen([sys.executable, TOY, str(workdir), "400", "0.05"], env=_script_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.time() + 120
  while time.time() < deadline and not (ckpt_dir.exists() and any(p.name.isdigit() for p in ckpt_dir.iterdir())):
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err.decode()[-2000:]
  assert b"finished" in out
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 400
  # Resume from the preempted run and finish: same params as an uninterrupted run.
  train_loop.train(toy_config(steps[-1] + 2, checkpoint_every=1), str(workdir), ToyStage(), toy_batches)
  straight = tmp_path / "straight"
  train_loop.train(toy_config(steps[-1] + 2, checkpoint_every=1), str(straight), ToyStage(), toy_batches)
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(workdir))


def _batches_going_bad_at_step_5(start, rows=None):
  for batch in toy_batches(start, rows):
    if start >= 4 * 8:  # the 5th batch onwards holds a corrupt value
      batch["x"][0, 0] = np.nan
    start += 8
    yield batch


def test_divergence_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
  with pytest.raises(train_loop.TrainingDiverged, match=r"at step 5\b.*step 3"):
    train_loop.train(toy_config(6, log_every=10), str(tmp_path), ToyStage(), _batches_going_bad_at_step_5)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=3)
  assert ckpt.latest_step() == 3  # step 6 was never saved: its params are NaN
  state, meta = ckpt.restore(step=3)
  assert meta["position"] == 3 * 8
  assert np.all(np.isfinite(state["params"]["dense"]["kernel"]))


def test_metrics_samples_and_export_are_written(tmp_path):
  train_loop.train(toy_config(4, sample_every=2), str(tmp_path), ToyStage(), toy_batches)
  assert sorted(os.listdir(tmp_path / "samples")) == ["step_00000002.png", "step_00000004.png"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  params, config = checkpoints.load_inference(str(tmp_path / "export"))
  assert config == {"stage": "toy"} and params["dense"]["kernel"].shape == (8, 16)


def test_corrupt_images_are_named_and_counted_in_the_metrics(tmp_path, caplog):
  """The sources replace a corrupt image and report it (data/loader.py); the loop names the first five
  in the log and writes the running count as data/corrupt."""
  def with_corrupt(start, rows=None):
    for batch in toy_batches(start, rows):
      k = int(batch["index"][0]) // 8  # step k reports k corrupt images
      yield dict(batch, corrupt=k, corrupt_names=[f"bad_{k}_{j}.jpg" for j in range(k)])

  with caplog.at_level("WARNING"):
    train_loop.train(toy_config(4), str(tmp_path), ToyStage(), with_corrupt)
  named = [r.getMessage().rsplit(" ", 1)[-1] for r in caplog.records if "Corrupt image" in r.getMessage()]
  assert named == ["bad_1_0.jpg", "bad_2_0.jpg", "bad_2_1.jpg", "bad_3_0.jpg", "bad_3_1.jpg"]
  events = event_accumulator.EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
  events.Reload()
  counts = {e.step: tf_value(e) for e in events.Tensors("data/corrupt")}
  assert counts == {2: 0 + 1, 4: 0 + 1 + 2 + 3}


def tf_value(event) -> float:
  return float(tensor_util.make_ndarray(event.tensor_proto))


def test_batch_size_must_split_over_devices(tmp_path):
  with pytest.raises(ValueError, match="batch_size 6 must divide"):
    train_loop.train(toy_config(2, batch_size=6), str(tmp_path), ToyStage(), toy_batches)
