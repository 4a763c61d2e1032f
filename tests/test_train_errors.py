"""What the training side does when things break (issue #23): bad command lines and configs are one-line
errors before any model work; a corrupt newest checkpoint is skipped, kept, and resumed past."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from toy_stage import ToyStage, toy_batches, toy_config

from configs import shapes
from unclip_jax import checkpoints, resume, train_loop
from unclip_jax.cli import train as train_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params(workdir):
  return checkpoints.load_inference(os.path.join(workdir, "export"))[0]


def _write_checkpoint(workdir, config_json: dict, step: int = 2):
  """A checkpoint whose meta holds config_json (the state is a stand-in: only the meta is read)."""
  ckpt = checkpoints.Checkpointer(str(workdir), save_every=1, async_save=False)
  ckpt.save(step, {"x": np.zeros(2, np.float32)}, {"position": 16, "config": config_json}, force=True)
  ckpt.close()


def _config_json(arg: str = "prior,tiny", **changes) -> dict:
  config = shapes.get_config(arg)
  for key, value in changes.items():
    node = config
    *parents, last = key.split(".")
    for p in parents:
      node = node[p]
    node[last] = value
  return json.loads(config.to_json_best_effort())


# --- the command line: each case is one line, a non-zero exit, no traceback, and no model work -------------

def _prepare_file(tmp_path):
  (tmp_path / "a_file").write_text("not a folder")
  return {}


def _prepare_changed_model(tmp_path):
  _write_checkpoint(tmp_path / "run", _config_json(**{"model.width": 64, "model.num_heads": 4}))
  return {}


TINY = "configs/shapes.py:prior,tiny"
CASES = {
    # id: (arguments after train.py ({tmp} is tmp_path), what the message must say, preparation)
    "unknown stage": (["--config", "configs/shapes.py:bogus", "--workdir", "{tmp}/run"],
                      "--config=configs/shapes.py:bogus: unknown stage 'bogus'", None),
    "unknown config option": (["--config", "configs/shapes.py:prior,tine", "--workdir", "{tmp}/run"],
                              "unknown option 'tine'", None),
    "missing config file": (["--config", "configs/nope.py:prior", "--workdir", "{tmp}/run"],
                            "no config file 'configs/nope.py'", None),
    "workdir is a file": (["--config", TINY, "--workdir", "{tmp}/a_file"], "is a file: name a folder", _prepare_file),
    "workdir inside a file": (["--config", TINY, "--workdir", "{tmp}/a_file/run"], "which is a file", _prepare_file),
    "batch_size 0": (["--config", TINY, "--workdir", "{tmp}/run", "--config.batch_size=0"],
                     "config.batch_size must be an integer >= 1, got 0", None),
    "batch_size -1": (["--config", TINY, "--workdir", "{tmp}/run", "--config.batch_size=-1"],
                      "config.batch_size must be an integer >= 1, got -1", None),
    "log_every 0": (["--config", TINY, "--workdir", "{tmp}/run", "--config.log_every=0"],
                    "config.log_every must be an integer >= 1", None),
    "checkpoint_every 0": (["--config", TINY, "--workdir", "{tmp}/run", "--config.checkpoint_every=0"],
                           "config.checkpoint_every must be an integer >= 1", None),
    "batch_size not split over devices": (["--config", TINY, "--workdir", "{tmp}/run", "--config.batch_size=6"],
                                          "batch_size 6 must divide", None),
    "model changed since the checkpoint": (["--config", TINY, "--workdir", "{tmp}/run"],
                                           "model.num_heads 4 -> 2, model.width 64 -> 32", _prepare_changed_model),
    "init_from no export": (["--config", TINY, "--workdir", "{tmp}/run", "--config.init_from={tmp}/nope"],
                            "/nope' is not a stage export: expected config.json and a params/ folder", None),
    "init_from the clip stage": (["--config", "configs/shapes.py:clip,tiny", "--workdir", "{tmp}/run",
                                  "--config.init_from={tmp}/nope"], "the clip stage starts from a random init", None),
}


def train_py_error(args, monkeypatch, *, model_work: bool = False) -> str:
  """train.py's message for `args`, in-process through its own parse_flags and main (what app.run
  calls), checked to be one line: SystemExit with a one-line string is what app.run prints as
  `error: ...` with exit status 1 and no traceback. Unless model_work, building a stage or training
  fails the test (the error must come before)."""
  from unclip_jax.stages import build

  def no_model_work(*a, **k):
    raise AssertionError("model work started before the error")

  if not model_work:
    monkeypatch.setattr(build, "build", no_model_work)
    monkeypatch.setattr(train_loop, "train", no_model_work)
  monkeypatch.chdir(ROOT)
  argv = ["train.py", *args]
  monkeypatch.setattr(sys, "argv", argv)  # ml_collections reads the --config.* overrides from sys.argv
  try:
    with pytest.raises(SystemExit) as exit_info:
      train_cli.main(train_cli.parse_flags(argv))
  finally:
    flags.FLAGS.unparse_flags()
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # the overrides' flags, defined per parse
      delattr(flags.FLAGS, name)
  message = exit_info.value.code
  assert isinstance(message, str) and message.startswith("error: "), message  # exit status 1
  assert "\n" not in message and "Traceback" not in message, message
  return message


@pytest.mark.parametrize("case", list(CASES))
def test_train_py_bad_input_is_one_line_before_any_model_work(case, tmp_path, monkeypatch, capsys):
  args, expected, prepare = CASES[case]
  if prepare:
    prepare(tmp_path)
  message = train_py_error([a.format(tmp=tmp_path) for a in args], monkeypatch)
  assert expected in message, message
  assert "Traceback" not in capsys.readouterr().err


def test_train_py_bad_input_as_a_subprocess(tmp_path):
  """The real entry point, once: `python train.py` with a file as --workdir."""
  (tmp_path / "a_file").write_text("")
  out = subprocess.run([sys.executable, "train.py", "--config", TINY, "--workdir", str(tmp_path / "a_file")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 1
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (f"error: --workdir {str(tmp_path / 'a_file')!r} is a file: "
                                                 "name a folder (it is created if missing).")


def test_host_only_config_changes_resume(tmp_path):
  """Data, paths, steps, intervals, batch size and scan_layers may differ from the checkpoint's config;
  a key only one side has is no difference."""
  saved = _config_json(**{"total_steps": 99, "log_every": 7, "batch_size": 16, "data.path": "elsewhere",
                          "clip_dir": "other/clip", "optim.learning_rate": 0.5})
  saved["model"]["scan_layers"] = True
  saved["model"]["retired_key"] = 1
  _write_checkpoint(tmp_path, saved)
  train_loop.check_before_training(shapes.get_config("prior,tiny"), str(tmp_path))
  with pytest.raises(resume.ResumeError, match=r"\(stage \"prior\" -> \"decoder\""):
    train_loop.check_before_training(shapes.get_config("decoder,tiny"), str(tmp_path))


# --- a corrupt newest checkpoint ----------------------------------------------------------------------------

def _files(folder):
  return {os.path.relpath(os.path.join(root, f), folder): os.path.getsize(os.path.join(root, f))
          for root, _, files in os.walk(folder) for f in files}


def _truncate_all(folder, under=""):
  for name, size in _files(folder).items():
    if name.startswith(under):
      with open(os.path.join(folder, name), "r+b") as f:
        f.truncate(size // 2)
  return _files(folder)


# every file (the meta JSON fails first), or only the state's array data (Orbax's OCDBT data files)
@pytest.mark.parametrize("under,why", [("", "its meta does not read"), ("state/d/", "its state does not read")])
def test_corrupt_newest_checkpoint_is_kept_and_resumed_past(under, why, tmp_path, caplog):
  """Truncating files of the newest checkpoint (step 6): the resume falls back to step 3, logs one line
  naming step 6 and why, moves step 6 aside (kept, not deleted), saves a fresh step 6 and ends bit for
  bit where the uninterrupted run ended."""
  run = tmp_path / "run"
  train_loop.train(toy_config(6), str(run), ToyStage(), toy_batches)
  straight = jax.tree.map(np.asarray, _params(run))
  shutil.rmtree(run / "export")
  ckpt_dir = run / "checkpoints"
  assert checkpoints.Checkpointer(str(run), save_every=3).all_steps()[:2] == [6, 3]
  intact = _files(ckpt_dir / "6")
  broken_files = _truncate_all(ckpt_dir / "6", under)
  assert broken_files != intact

  with caplog.at_level("WARNING"):
    train_loop.train(toy_config(6), str(run), ToyStage(), toy_batches)
  lines = [r.getMessage() for r in caplog.records if "does not restore" in r.getMessage()]
  assert len(lines) == 1 and "\n" not in lines[0], lines
  assert lines[0].startswith(f"Checkpoint step 6 does not restore ({why}: ") and "resuming from step 3" in lines[0]
  jax.tree.map(np.testing.assert_array_equal, straight, _params(run))

  kept = [p for p in os.listdir(ckpt_dir) if p.startswith("broken-6-")]
  assert len(kept) == 1 and kept[0] in lines[0]
  assert _files(ckpt_dir / kept[0]) == broken_files  # the evidence, as it was
  assert checkpoints.Checkpointer(str(run), save_every=3).all_steps()[:2] == [6, 3]  # a fresh step 6


def test_no_checkpoint_restores_is_one_line_and_moves_nothing(tmp_path):
  run = tmp_path / "run"
  train_loop.train(toy_config(3), str(run), ToyStage(), toy_batches)
  steps = checkpoints.Checkpointer(str(run), save_every=3).all_steps()
  for step in steps:
    _truncate_all(run / "checkpoints" / str(step))
  before = sorted(os.listdir(run / "checkpoints"))
  with pytest.raises(resume.ResumeError) as error:
    train_loop.train(toy_config(6), str(run), ToyStage(), toy_batches)
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"no checkpoint in {run / 'checkpoints'} restores (step 3: ")
  assert sorted(os.listdir(run / "checkpoints")) == before


def test_changed_model_stops_the_resume_before_restoring(tmp_path):
  run = tmp_path / "run"
  train_loop.train(toy_config(3, model={"hidden": 0}), str(run), ToyStage(), toy_batches)
  with pytest.raises(resume.ResumeError, match=r"step 3 .* another model config \(model.hidden 0 -> 4\)"):
    train_loop.train(toy_config(6, model={"hidden": 4}), str(run), ToyStage(hidden=4), toy_batches)
  assert sorted(os.listdir(run / "checkpoints")) == ["1", "3"]  # nothing skipped or moved
