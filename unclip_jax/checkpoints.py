"""Training checkpoints (orbax): atomic, async, resumable, sharded; and the
inference export that sample.py reads."""

import asyncio
import contextlib
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


class ExportError(ValueError):
  """An inference export whose files are there but do not read (damaged, or not what the export writes)."""


_REDO = "copy it again, or export it again"


def one_line(error: BaseException) -> str:
  """An exception as one line: its type and the first line of its message."""
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


class _DrainingLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes.

  Orbax runs each restore on a fresh loop and closes it as soon as one read fails; TensorStore then
  completes the reads still in flight from its own threads, and each posts its result to the closed
  loop: one "RuntimeError: Event loop is closed" traceback per read (sys.unraisablehook), after the
  real error."""

  def close(self):
    pending = asyncio.all_tasks(self)
    if pending and not self.is_running() and not self.is_closed():
      self.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    super().close()


class _DrainingPolicy(asyncio.AbstractEventLoopPolicy):
  """The current policy (its loops per thread kept), except that new loops are _DrainingLoops."""

  def __init__(self, base: asyncio.AbstractEventLoopPolicy):
    self._base = base

  def get_event_loop(self):
    return self._base.get_event_loop()

  def set_event_loop(self, loop):
    self._base.set_event_loop(loop)

  def new_event_loop(self):
    return _DrainingLoop()


@contextlib.contextmanager
def _draining_event_loops():
  """New event loops (Orbax's) are _DrainingLoops inside the block."""
  previous = asyncio.get_event_loop_policy()
  asyncio.set_event_loop_policy(_DrainingPolicy(previous))
  try:
    yield
  finally:
    asyncio.set_event_loop_policy(previous)


def read_json(path: epath.Path, what: str) -> dict[str, Any]:
  """A JSON object file, or ExportError naming the file and what is wrong with it."""
  try:
    value = json.loads(path.read_text())
  except UnicodeDecodeError as e:
    problem = f"is not UTF-8 text (byte {e.start})"
  except json.JSONDecodeError as e:
    problem = f"is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
  else:
    if isinstance(value, dict):
      return value
    problem = f"holds a JSON {type(value).__name__}, not an object"
  raise ExportError(f"{os.fspath(path)!r} {problem}: the {what} is damaged; {_REDO}.")


def _check_finite(params, params_path):
  """Damaged array data that still decodes (flipped bytes in an uncompressed chunk) is mostly NaN or inf."""
  for key, leaf in jax.tree_util.tree_leaves_with_path(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      continue  # a multi-process restore into shardings: each process holds part of it
    leaf = np.asarray(leaf)
    if np.issubdtype(leaf.dtype, np.floating) and not np.isfinite(leaf).all():
      raise ExportError(f"{os.fspath(params_path)!r}: {jax.tree_util.keystr(key)} holds NaN or infinite values: "
                        f"the export is damaged ({_REDO}), or its training diverged.")


def load_inference(path, abstract_params=None) -> tuple[Any, dict[str, Any]]:
  """(params, config) written by export_inference (a local folder or a URI).

  FileNotFoundError if it is not an export; ExportError (one line, naming the file) if its files do not
  read: bad JSON, array data that does not restore, NaN or infinite parameters."""
  path = paths.absolute(path)
  config_path = path / INFERENCE_CONFIG
  params_path = path / INFERENCE_PARAMS
  if not config_path.is_file() or not params_path.is_dir():
    raise FileNotFoundError(f"{os.fspath(path)!r} is not an inference checkpoint: expected {INFERENCE_CONFIG} "
                            f"and a {INFERENCE_PARAMS}/ folder (written by train.py's export).")
  config = read_json(config_path, "export")
  try:
    with _draining_event_loops(), ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_path, abstract_params)
  except Exception as e:  # Orbax, TensorStore, JSON, zstd: whatever a damaged file makes them raise
    raise ExportError(f"{os.fspath(params_path)!r} does not restore ({one_line(e)}): the export is damaged or "
                      f"incomplete; {_REDO}.") from e
  _check_finite(params, params_path)
  return params, config
