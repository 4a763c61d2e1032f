"""Training checkpoints (orbax): atomic, async, resumable, sharded; and the
inference export that sample.py reads."""

import json
import os
import time
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

  def all_steps(self) -> list[int]:
    """Every step in the folder, newest first (whether or not it restores)."""
    return sorted(self._manager.all_steps(), reverse=True)

  def restore_meta(self, step: int) -> dict[str, Any]:
    """The meta dict of `step` alone (no arrays read): what a resume checks before restoring."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def set_aside(self, step: int) -> epath.Path:
    """Moves the folder of `step` (one that does not restore) to checkpoints/broken-STEP-TIME and returns
    that path. Orbax ignores the new name, so it never deletes it (max_to_keep) and a later save of
    the same step neither collides with it nor replaces it. Process 0 moves it; all processes return
    after the move, seeing the steps that are left."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    if jax.process_count() > 1:  # one name on every process
      stamp = multihost_utils.broadcast_one_to_all(np.frombuffer(stamp.encode(), np.uint8)).tobytes().decode()
    target = self.directory / f"broken-{step}-{stamp}"
    if jax.process_index() == 0:
      source = self.directory / str(step)
      try:
        source.rename(target)
      except Exception:  # some stores (gs://) rename no folders: copy, then remove the original
        paths.copy_tree(source, target)
        source.rmtree()
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"set_aside_{step}")
    self._manager.reload()
    return target

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
