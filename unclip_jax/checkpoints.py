"""Training checkpoints (orbax): atomic, async, resumable, sharded; and the
inference export that sample.py reads."""

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from unclip_jax import paths


class Checkpointer:
  """Saves {state, meta} every `save_every` steps into workdir/checkpoints, keeping `keep`.

  `meta` is a JSON dict (data-iterator position, config, ...). Orbax writes each
  step into a temporary folder and renames it when complete, so a crash never
  leaves a half-written checkpoint that a resume would pick up. workdir may be a
  gs:// (or file://) URI: Orbax writes through epath and tensorstore.
  """

  def __init__(self, workdir: str, *, save_every: int, keep: int = 3, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                           enable_async_checkpointing=async_save, create=True)
    self.directory = checkpoint_dir(workdir)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

  def save(self, step: int, state, meta: dict[str, Any], *, force: bool = False) -> bool:
    return self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore(self, abstract_state=None, step: int | None = None):
    """(state, meta) of `step` (default: latest), or None if there is none.

    With abstract_state (ShapeDtypeStructs with shardings) the arrays land
    directly in those shardings; without it they come back as saved.
    """
    step = self._manager.latest_step() if step is None else step
    if step is None:
      return None
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.close()


def checkpoint_dir(workdir) -> epath.Path:
  """WORKDIR/checkpoints: absolute if local, a URI kept as it is (never os.path.abspath'd)."""
  return paths.absolute(workdir) / "checkpoints"


def gather_to_host(tree):
  """Every leaf whole, as numpy, on every process (a collective: all processes call it).

  One leaf at a time, so a sharded model never needs its whole size on one device.
  """
  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


INFERENCE_PARAMS = "params"
INFERENCE_CONFIG = "config.json"


def export_inference(path, params, config: dict[str, Any]):
  """Writes params (usually the EMA; host or addressable arrays) and a JSON config for sampling.

  path: a local folder or a URI (gs://, file://)."""
  path = paths.absolute(path)
  path.mkdir(parents=True, exist_ok=True)
  params = jax.device_get(params)
  # The calling process writes alone (train.py exports from process 0 of a multi-process run).
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  with ocp.StandardCheckpointer(multiprocessing_options=alone) as ckptr:
    ckptr.save(path / INFERENCE_PARAMS, params, force=True)
  (path / INFERENCE_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))


def load_inference(path, abstract_params=None) -> tuple[Any, dict[str, Any]]:
  """(params, config) written by export_inference (a local folder or a URI); a clear error if it is not one."""
  path = paths.absolute(path)
  config_path = path / INFERENCE_CONFIG
  params_path = path / INFERENCE_PARAMS
  if not config_path.is_file() or not params_path.is_dir():
    raise FileNotFoundError(f"{os.fspath(path)!r} is not an inference checkpoint: expected {INFERENCE_CONFIG} "
                            f"and a {INFERENCE_PARAMS}/ folder (written by train.py's export).")
  config = json.loads(config_path.read_text())
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(params_path, abstract_params)
  return params, config
