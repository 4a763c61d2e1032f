"""The training loop every stage shares: sharded state, resumable data, async
checkpoints, preemption-safe stops, metrics, and sample grids.

A stage supplies the model-specific parts (see `Stage`); the loop owns
everything else, so a change here reaches every stage at once.
"""

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import jax
import ml_collections
import numpy as np
import tqdm.auto
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from unclip_jax import checkpoints, imaging, init_from, optim, parallel, paths, training
from unclip_jax import resume as resume_lib


class Stage(Protocol):
  """What a stage (clip, prior, decoder, sr1, sr2) gives the loop."""

  def init_params(self, rng) -> Any:
    ...

  def loss(self, params, batch, rng) -> tuple[jax.Array, dict]:
    ...

  def encode_batch(self, host_batch: dict) -> dict[str, np.ndarray]:
    """Host batch (images, captions) -> the arrays the loss reads (e.g. CLIP encodings)."""
    ...

  def sample_images(self, params, rng) -> np.ndarray | None:
    """uint8 [N, H, W, 3] from the EMA params, for the periodic grid; None to skip."""
    ...

  def inference_config(self) -> dict:
    """What sample.py needs besides the params (architecture, diffusion settings)."""
    ...


# batches(start, rows) -> this host's `rows` of every global batch from global position `start`
# (rows: sorted offsets into the global batch, see data/ordering.py; each batch's "index" says which
# global positions it holds).
BatchesFn = Callable[[int, np.ndarray], Iterator[dict]]


class TrainingDiverged(RuntimeError):
  pass


@contextlib.contextmanager
def stop_requests():
  """Turns SIGTERM (preemption) and Ctrl-C into a stop the loop polls each step: stop_at(step).

  One process: a Python handler sets a flag. Several processes must all stop
  after the same step, so SIGTERM is left to JAX's preemption service (which
  jax.distributed starts; it agrees on a step across hosts) and Ctrl-C is
  forwarded to it as a SIGTERM.
  """
  requested = {"signal": None}
  multiprocess = jax.process_count() > 1

  def handler(signum, frame):
    del frame
    requested["signal"] = signal.Signals(signum).name
    if multiprocess:
      os.kill(os.getpid(), signal.SIGTERM)

  def stop_at(step: int) -> str | None:
    if multiprocess:
      return (requested["signal"] or "SIGTERM") if multihost_utils.reached_preemption_sync_point(step) else None
    return requested["signal"]

  names = (signal.SIGINT,) if multiprocess else (signal.SIGTERM, signal.SIGINT)
  previous = {s: signal.signal(s, handler) for s in names}
  try:
    yield stop_at
  finally:
    for s, h in previous.items():
      signal.signal(s, h)


def _check_positions(host_batch: dict, expected: np.ndarray):
  """A data source must hand this host exactly its rows of the global batch (and no more)."""
  got = host_batch.get("index")
  if got is not None and not np.array_equal(np.asarray(got), expected):
    raise ValueError(f"The data source returned positions {np.asarray(got)[:8]}... for this host; expected "
                     f"{expected[:8]}... (its rows of the global batch).")


class _CorruptImages:
  """Counts the corrupt images the sources replaced (data/loader.py) and names the first few, so
  a bad data set shows up in the logs and as the `data/corrupt` metric instead of silently."""

  NAMED = 5

  def __init__(self):
    self.count, self.named = 0, 0

  def take(self, host_batch: dict) -> dict:
    """Counts the batch's report and returns the batch without it (what the stage encodes)."""
    self.count += int(host_batch.get("corrupt", 0))
    for name in list(host_batch.get("corrupt_names", ()))[:max(self.NAMED - self.named, 0)]:
      logging.warning("Corrupt image replaced by another of its batch: %s", name)
      self.named += 1
      if self.named == self.NAMED:
        logging.warning("Further corrupt images are counted in the data/corrupt metric, not named.")
    return {k: v for k, v in host_batch.items() if k not in ("corrupt", "corrupt_names")}

  def total(self) -> int:
    """All hosts' count so far in this run (every process calls this at the same step)."""
    if jax.process_count() == 1:
      return self.count
    return int(np.sum(multihost_utils.process_allgather(np.int64(self.count))))


def make_optimizer(config: ml_collections.ConfigDict):
  o = config.optim
  lr = optim.learning_rate_schedule(o.learning_rate, o.get("warmup_steps", 0), o.get("decay", "constant"),
                                    config.total_steps)
  tx = optim.adamw(lr, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   grad_clip_norm=o.get("grad_clip_norm", 1.0))
  return tx, lr


def _model_config(stage):
  """The stage's PriorConfig or UNetConfig (what scan_layout reads), if it has one."""
  return getattr(stage, "model_config", None) or getattr(stage, "unet_config", None)


def validate_config(config: ml_collections.ConfigDict):
  """A ValueError naming the first run setting (batch size, step counts, intervals) that cannot work."""
  def need(key, minimum, default=None):
    value = config.get(key, default)
    if value is None:
      return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      raise ValueError(f"config.{key} must be an integer >= {minimum}, got {value!r} "
                       f"(set it with --config.{key}=N).")
  need("batch_size", 1)
  need("total_steps", 1)
  need("grad_accum_steps", 1, 1)
  need("log_every", 1)
  need("checkpoint_every", 1)
  need("keep_checkpoints", 1, 3)
  need("sample_every", 0, 0)
  gamma = config.get("min_snr_gamma", 0.0)
  if gamma is not None and not gamma >= 0:
    raise ValueError(f"config.min_snr_gamma must be >= 0 (0: the plain MSE), got {gamma!r}.")
  ema = config.get("ema_decay")
  if ema is not None and not 0 <= ema <= 1:
    raise ValueError(f"config.ema_decay must be in [0, 1], got {ema!r}.")


def check_workdir(workdir: str):
  """A ValueError if a local workdir cannot be a folder (paths.output_folder_problem)."""
  problem = paths.output_folder_problem("workdir", workdir)
  if problem:
    raise ValueError(problem)


def _batch_divisor(config, mesh, rules) -> int:
  divisor = parallel.batch_size_divisor(mesh, rules) * config.get("grad_accum_steps", 1)
  if config.batch_size % divisor:
    raise ValueError(f"batch_size {config.batch_size} must divide by the batch-sharding devices "
                     f"({parallel.batch_size_divisor(mesh, rules)}) times grad_accum_steps.")
  return divisor


def _rules(config) -> tuple:
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.logical_axis_rules)


def check_before_training(config: ml_collections.ConfigDict, workdir: str):
  """What can be checked before any model is built, each a one-line error: the run settings
  (ValueError), the mesh and the batch size's split over it (ValueError), the workdir (ValueError),
  the newest readable checkpoint's saved config against this one (ResumeError), and, with no
  checkpoint to resume, that config.init_from is an export of this stage (init_from.InitFromError)."""
  validate_config(config)
  _batch_divisor(config, parallel.make_mesh(dict(config.mesh)), _rules(config))
  check_workdir(workdir)
  if not resume_lib.check_checkpoints(config, workdir) and config.get("init_from"):
    init_from.check_record(config)


class _DivergenceCheck:
  """Keeps recent per-step losses on device and checks them only when the loop
  syncs anyway (logging, saving), so the check costs no extra host round trip."""

  def __init__(self):
    self._pending = []

  def add(self, step: int, loss):
    self._pending.append((step, loss))

  def check(self, last_good: int | None):
    values = jax.device_get([loss for _, loss in self._pending])
    for (step, _), value in zip(self._pending, values):
      if not math.isfinite(float(value)):
        where = f"step {last_good}" if last_good is not None else "none was written"
        raise TrainingDiverged(f"Training diverged: the loss was {float(value)} at step {step}. "
                               f"The last good checkpoint is kept ({where}); lower the learning rate "
                               f"or check the data, then resume.")
    self._pending.clear()


def train(config: ml_collections.ConfigDict, workdir: str, stage: Stage, batches: BatchesFn
          ) -> training.TrainState:
  """Trains until config.total_steps (resuming from workdir; a new run starts from config.init_from's
  export if set, else from a random init), then exports the EMA params.

  workdir (and config.export_dir) may be a local folder or a URI: gs://, file://."""
  check_before_training(config, workdir)
  paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = parallel.make_mesh(dict(config.mesh))
  rules = _rules(config)
  tx, lr = make_optimizer(config)
  rng = jax.random.key(config.seed)
  meta_config = json.loads(config.to_json_best_effort())
  state, shardings = training.create_train_state(stage.init_params, tx, rng, mesh, rules)
  logging.info("Mesh %s; parameter shardings:\n%s", dict(mesh.shape), parallel.describe(state.params, shardings.params))
  ckpt = checkpoints.Checkpointer(workdir, save_every=config.checkpoint_every,
                                  keep=config.get("keep_checkpoints", 3))
  position = 0
  try:
    restored = resume_lib.resume(ckpt, training.abstract_state(stage.init_params, tx, rng, shardings),
                                 _model_config(stage), mesh, rules, meta_config)
  except BaseException:
    ckpt.close()
    raise
  if restored is not None:
    state, meta = restored
    position = meta["position"]
    logging.info("Resumed from step %d (data position %d)%s.", int(state.step), position,
                 "; config.init_from is not used" if config.get("init_from") else "")
  elif config.get("init_from"):  # fine-tuning: a new run's params and EMA from an export
    state = init_from.start_from(config.init_from, stage, state, tx, shardings, _model_config(stage))
  start_step = int(state.step)

  step_fn = training.jit_train_step(
      training.make_train_step(stage.loss, tx, ema_decay=config.ema_decay, learning_rate=lr,
                               grad_accum_steps=config.get("grad_accum_steps", 1)), shardings, mesh, rules)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  rows = parallel.host_rows(batch_sharding, config.batch_size)  # this host's rows of every global batch
  data = batches(position, rows)
  # TensorBoard's writer takes a string and reads gs:// itself; file:// is made a local path.
  writer = metric_writers.create_default_writer(os.fspath(paths.as_path(workdir)),
                                                just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: str(v) for k, v in config.items()})
  divergence = _DivergenceCheck()
  corrupt = _CorruptImages()
  bar = tqdm.auto.tqdm(total=config.total_steps, initial=start_step, desc=f"train {config.stage}",
                       disable=jax.process_index() > 0)
  last_log_time, last_log_step = time.perf_counter(), start_step

  def save(step, force=False):
    if ckpt.latest_step() == step:
      return
    if force or ckpt.should_save(step):
      divergence.check(ckpt.latest_step())
      ckpt.save(step, state, {"position": position, "config": meta_config}, force=force)

  try:
    with stop_requests() as stop_at:
      step = start_step
      while step < config.total_steps:
        host_batch = next(data)
        _check_positions(host_batch, position + rows)
        host_batch = corrupt.take(host_batch)
        batch = parallel.global_batch(stage.encode_batch(host_batch), mesh, rules, batch_size=config.batch_size,
                                      rows=rows)
        state, metrics = step_fn(state, batch)
        step += 1
        position += config.batch_size
        divergence.add(step, metrics["loss"])
        bar.update(1)
        if step % config.log_every == 0 or step == config.total_steps:
          divergence.check(ckpt.latest_step())
          now = time.perf_counter()
          scalars = {k: float(v) for k, v in jax.device_get(metrics).items()}
          scalars["steps_per_sec"] = (step - last_log_step) / (now - last_log_time)
          scalars["images_per_sec"] = scalars["steps_per_sec"] * config.batch_size
          scalars["data/corrupt"] = corrupt.total()  # replaced so far in this run, all hosts
          last_log_time, last_log_step = now, step
          writer.write_scalars(step, scalars)
          bar.set_postfix(loss=f"{scalars['loss']:.4g}")
        save(step)
        if config.get("sample_every") and step % config.sample_every == 0:
          write_samples(stage, state, workdir, writer, step, mesh)
        stop = stop_at(step)
        if stop is not None:
          logging.info("%s received: saving step %d and stopping.", stop, step)
          save(step, force=True)
          break
      else:
        save(step, force=True)
  finally:  # also on errors: let in-flight saves finish so they are usable
    ckpt.wait()
    ckpt.close()
    bar.close()
    writer.flush()
  if int(state.step) >= config.total_steps:
    export_dir = config.get("export_dir") or os.fspath(paths.as_path(workdir) / "export")
    host_params = checkpoints.gather_to_host(state.ema_params)  # every process takes part in the gather
    if jax.process_index() == 0:
      export(stage, host_params, export_dir)
      logging.info("Exported EMA params for sampling to %s", export_dir)
    multihost_utils.sync_global_devices("export")  # no process exits before the export is written
  return state


def export(stage: Stage, params, export_dir: str):
  """What sample.py reads: the stage's own export (CLIP: a Hugging Face folder; the
  prior: params and latent stats) or the params with the stage's inference config."""
  if hasattr(stage, "export"):
    stage.export(params, export_dir)
  else:
    checkpoints.export_inference(export_dir, params, stage.inference_config())


def write_samples(stage: Stage, state: training.TrainState, workdir: str, writer, step: int, mesh=None):
  params = state.ema_params
  if jax.process_count() > 1 and mesh is not None:
    # Sampling code reads whole arrays on the host: with several processes every device takes a copy.
    params = jax.jit(lambda p: p, out_shardings=parallel.replicated(mesh))(params)
  images = stage.sample_images(params, jax.random.fold_in(jax.random.key(0), step))
  if images is None or jax.process_index() > 0:
    return
  grid = imaging.make_grid(images, getattr(stage, "grid_columns", None))
  imaging.save_png(grid, paths.as_path(workdir) / "samples" / f"step_{step:08d}.png")
  writer.write_images(step, {"samples": grid[None]})
