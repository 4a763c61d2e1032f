"""Fine-tuning from an export (config.init_from, issue #25): a new run's first step computes the exported
model's loss from the exported params and EMA; a checkpoint in the workdir wins; an export of another
stage or architecture is a one-line error before training."""

import jax
import numpy as np
import pytest
from test_train_errors import train_py_error

from configs import shapes
from unclip_jax import checkpoints, init_from, train_loop, training
from unclip_jax.stages import ar_prior as ar_prior_stage
from unclip_jax.stages import build
from unclip_jax.stages import prior as prior_stage


def _config(stage_name: str, clip_dir: str, **overrides):
  config = shapes.get_config(f"{stage_name},tiny")
  if "clip_dir" in config:
    config.clip_dir = clip_dir
  config.update(overrides)
  return config


def _export(stage_name: str, folder, clip_dir: str) -> str:
  """A tiny stage's export with params other than a new run's random init (and, for the priors, latent
  stats or a codebook other than the data's)."""
  stage, _ = build.build(_config(stage_name, clip_dir), str(folder / "source"))
  params = stage.init_params(jax.random.key(7))
  if stage_name == "prior":
    stage.stats = {"clip_mean": stage.stats["clip_mean"] + 0.1, "clip_std": 2 * stage.stats["clip_std"]}
  if stage_name == "ar_prior":
    stage.codebook = dict(stage.codebook, mean=stage.codebook["mean"] + 0.1, scale=2 * stage.codebook["scale"])
  train_loop.export(stage, params, str(folder / "export"))
  return str(folder / "export")


def _record_steps(monkeypatch) -> list[dict]:
  """Each train step's incoming state (host copies), batch and loss, as train() runs them."""
  seen = []
  jit_train_step = training.jit_train_step

  def recording(step_fn, *args, **kwargs):
    jitted = jit_train_step(step_fn, *args, **kwargs)

    def run(state, batch):
      before = jax.device_get({"state": state, "batch": batch})  # the state's buffers are donated
      state, metrics = jitted(state, batch)
      seen.append(dict(before, loss=float(metrics["loss"])))
      return state, metrics

    return run

  monkeypatch.setattr(training, "jit_train_step", recording)
  return seen


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


# The U-Net stages compile a train step and a loss of their own (~3 min on a busy 2-core CPU): slow.
@pytest.mark.parametrize("stage_name", ["prior", "ar_prior", pytest.param("decoder", marks=pytest.mark.slow),
                                        pytest.param("sr1", marks=pytest.mark.slow)])
def test_a_new_run_starts_from_the_export(stage_name, tmp_path, shapes_clip_dir, monkeypatch):
  export_dir = _export(stage_name, tmp_path, shapes_clip_dir)
  exported, record_json = checkpoints.load_inference(export_dir)
  params = init_from.trainable(exported, init_from.read_record(export_dir))
  config = _config(stage_name, shapes_clip_dir, total_steps=1, init_from=export_dir)
  stage, batches = build.build(config, str(tmp_path / "run"))
  seen = _record_steps(monkeypatch)
  train_loop.train(config, str(tmp_path / "run"), stage, batches)

  first = seen[0]["state"]
  assert int(first.step) == 0
  _assert_equal_trees(first.params, params)  # the params before the first update are the export's
  _assert_equal_trees(first.ema_params, params)
  moments = [x for x in jax.tree.leaves(first.opt_state) if np.asarray(x).dtype.kind == "f"]
  assert moments and all(not np.any(x) for x in moments)  # a fresh AdamW state
  # The first loss is the exported model's loss on that batch, from the stage's loss function.
  rng = jax.random.fold_in(jax.random.wrap_key_data(first.rng), first.step)
  if stage_name == "prior":  # normalised with the export's latent stats, not the new data's
    loss_fn = lambda p, b, r: prior_stage.prior_loss(p, b, r, model=stage.model, stats=exported["stats"],
                                                     schedule=stage.schedule, uncond=stage.uncond,
                                                     p_uncond=config.p_uncond)
  elif stage_name == "ar_prior":  # coded with the export's codebook
    loss_fn = lambda p, b, r: ar_prior_stage.ar_prior_loss(p, b, r, model=stage.model, codebook=exported["codebook"],
                                                           uncond=stage.uncond, p_uncond=config.p_uncond)
  else:
    loss_fn = stage.loss
  expected, _ = jax.jit(loss_fn)(params, seen[0]["batch"], rng)
  np.testing.assert_allclose(seen[0]["loss"], float(expected), rtol=1e-5)
  assert record_json["stage"] == stage_name

  if stage_name != "prior":
    return
  # Rerun with more steps: the run's own checkpoint (step 1) wins over init_from (the loop's order is the
  # same for every stage: one suffices).
  config.total_steps = 2
  stage, batches = build.build(config, str(tmp_path / "run"))
  train_loop.train(config, str(tmp_path / "run"), stage, batches)
  assert int(seen[1]["state"].step) == 1
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(seen[1]["state"].params),
                                                      jax.tree.leaves(params)))


def test_an_export_of_another_architecture_is_one_line_before_training(tmp_path, shapes_clip_dir, monkeypatch):
  export_dir = _export("prior", tmp_path, shapes_clip_dir)
  base = ["--config", "configs/shapes.py:prior,tiny", "--workdir", str(tmp_path / "run"),
          f"--config.clip_dir={shapes_clip_dir}", f"--config.init_from={export_dir}"]
  started = []
  monkeypatch.setattr(training, "jit_train_step", lambda *a, **k: started.append(1))
  message = train_py_error(base + ["--config.model.width=64"], monkeypatch, model_work=True)
  assert message.startswith(f"error: config.init_from {export_dir!r} (prior) does not fit this config's "
                            "architecture: "), message
  name, _, shapes_text = message.partition("architecture: ")[2].partition(": ")
  assert "/" in name and shapes_text.startswith("export (") and "32" in shapes_text and "64" in shapes_text, message
  assert not started  # before any train step was built
  # Another stage's export: a one-line error before any model is built.
  message = train_py_error(["--config", "configs/shapes.py:decoder,tiny", "--workdir", str(tmp_path / "run2"),
                            f"--config.clip_dir={shapes_clip_dir}", f"--config.init_from={export_dir}"], monkeypatch)
  assert message == f"error: config.init_from {export_dir!r} is a prior export; this config trains the decoder stage."


def test_first_mismatch_names_missing_extra_and_reshaped_params():
  want = {"a": {"kernel": np.zeros((2, 3))}, "b": {"bias": np.zeros(3)}}
  assert init_from.first_mismatch(want, want) is None
  assert init_from.first_mismatch({"a": want["a"]}, want) == "b/bias: export absent, config (3,)"
  assert init_from.first_mismatch(dict(want, c={"x": np.zeros(1)}), want) == "c/x: export (1,), config absent"
  assert (init_from.first_mismatch({"a": {"kernel": np.zeros((2, 4))}, "b": want["b"]}, want)
          == "a/kernel: export (2, 4), config (2, 3)")
