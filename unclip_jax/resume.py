"""Resuming a run: the newest checkpoint that restores (a broken one set aside, never deleted), in
either parameter layout (scan_layers flipped since it was saved), and only under a config that
shapes the same model (STATE_KEYS; anything else may change between runs).
"""

import json
import os
from typing import Any

import jax
import ml_collections
from absl import logging

from unclip_jax import checkpoints, parallel, training
from unclip_jax.convert import scan_layout


class ResumeError(RuntimeError):
  """The workdir's checkpoints cannot resume this run: none restores, or they hold another model."""


def restore_in_any_layout(ckpt: checkpoints.Checkpointer, abstract: training.TrainState, model_config, mesh,
                          rules=parallel.DEFAULT_RULES, step: int | None = None):
  """(state, meta) of `step` (default: the latest checkpoint), or None if there is none. A checkpoint
  written before the config's scan_layers was flipped (e.g. configs/paper.py:prior's, now scanned)
  holds the other layout: it is restored in that layout, sharded by the same rules, and converted
  (params, EMA, Adam moments)."""
  try:
    return ckpt.restore(abstract, step=step)
  except ValueError as e:
    if model_config is None or not hasattr(model_config, "scan_layers") or "do not match" not in str(e):
      raise
    error = e
  to_saved = scan_layout.to_unscanned if model_config.scan_layers else scan_layout.to_scanned
  saved = jax.eval_shape(lambda s: training.map_param_trees(s, lambda p: to_saved(p, model_config)), abstract)
  try:
    state, meta = ckpt.restore(training.with_shardings(saved, training.state_shardings(saved, mesh, rules)), step=step)
  except ValueError:
    raise error from None
  convert = jax.jit(lambda s: training.map_param_trees(s, lambda p: scan_layout.match_layout(p, model_config)),
                    out_shardings=jax.tree.map(lambda s: s.sharding, abstract))
  logging.info("Converted the checkpoint's params to scan_layers=%s.", model_config.scan_layers)
  return convert(state), meta


# Config keys whose values shape the trained state (params, optimizer moments, EMA): a checkpoint resumes
# only under the same values. Every other key may change between runs (data and paths, batch size,
# total_steps, intervals, mesh, optimiser settings). model.scan_layers is converted on restore
# (restore_in_any_layout); remat, dropout and the CLIP's init change no shape.
STATE_KEYS = ("stage", "model", "diffusion.variance_type")
SHAPELESS_MODEL_KEYS = ("model.scan_layers", "model.remat", "model.dropout", "model.init")


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _under(key: str, prefixes) -> bool:
  return any(key == p or key.startswith(p + ".") for p in prefixes)


def state_config_differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """(key, saved value, current value) for every STATE_KEYS key that both configs (as JSON) set and
  set differently. A key only one of them has is not a difference: configs gain and lose keys
  that default to the old behaviour."""
  saved, current = _flatten(saved), _flatten(current)
  return [(k, saved[k], current[k]) for k in sorted(saved.keys() & current.keys())
          if _under(k, STATE_KEYS) and not _under(k, SHAPELESS_MODEL_KEYS) and saved[k] != current[k]]


def _short(value, limit: int = 40) -> str:
  text = json.dumps(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def check_saved_config(meta: dict, config_json: dict, step: int, directory):
  """A ResumeError naming the keys if the checkpoint's saved config shapes another model."""
  saved = meta.get("config") if isinstance(meta, dict) else None
  if not isinstance(saved, dict):
    return  # written without a config (or by hand): the restore itself checks the shapes
  differences = state_config_differences(saved, config_json)
  if differences:
    listed = ", ".join(f"{k} {_short(a)} -> {_short(b)}" for k, a, b in differences)
    raise ResumeError(f"the checkpoint at step {step} in {os.fspath(directory)} was trained with another model "
                      f"config ({listed}): rerun with the values it was saved with, or use a new --workdir "
                      f"for the new config.")


def check_checkpoints(config: ml_collections.ConfigDict, workdir: str) -> bool:
  """Whether the workdir holds checkpoints; a ResumeError if the newest readable one shapes another model."""
  if not checkpoints.checkpoint_dir(workdir).exists():
    return False
  ckpt = checkpoints.Checkpointer(workdir, save_every=config.checkpoint_every, keep=config.get("keep_checkpoints", 3))
  try:
    config_json = json.loads(config.to_json_best_effort())
    for step in ckpt.all_steps():
      try:
        meta = ckpt.restore_meta(step)
      except Exception:  # a broken checkpoint: resume() skips it
        continue
      check_saved_config(meta, config_json, step, ckpt.directory)
      break
    return bool(ckpt.all_steps())
  finally:
    ckpt.close()


def _reason(error: BaseException, limit: int = 200) -> str:
  lines = str(error).strip().splitlines()
  text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
  return text if len(text) <= limit else text[:limit - 3] + "..."


def resume(ckpt: checkpoints.Checkpointer, abstract: training.TrainState, model_config, mesh, rules,
           config_json: dict | None = None):
  """(state, meta) of the newest checkpoint that restores, or None if there is none.

  A checkpoint that does not restore (truncated or damaged files: any error while reading that one
  step) is skipped for the next older one. Once one restores, each skipped step is moved aside to
  checkpoints/broken-STEP-TIME (never deleted; later saves of the same step number go to a fresh
  folder) and logged in one line. If none restores, a ResumeError names each step's error and
  nothing is moved. A checkpoint whose saved config shapes another model (config_json differs in
  STATE_KEYS) stops the resume with a ResumeError: it is not broken, the config is.
  """
  skipped = []
  for step in ckpt.all_steps():
    try:
      meta = ckpt.restore_meta(step)
    except Exception as e:  # any error reading this one step: orbax, tensorstore and JSON raise many types
      skipped.append((step, f"its meta does not read: {_reason(e)}"))
      continue
    if config_json is not None:
      check_saved_config(meta, config_json, step, ckpt.directory)
    try:
      restored = restore_in_any_layout(ckpt, abstract, model_config, mesh, rules, step=step)
    except Exception as e:  # likewise
      skipped.append((step, f"its state does not read: {_reason(e)}"))
      continue
    for bad, reason in skipped:
      kept = ckpt.set_aside(bad)
      logging.warning("Checkpoint step %d does not restore (%s): resuming from step %d instead; its files are "
                      "kept in %s.", bad, reason, step, os.fspath(kept))
    return restored
  if skipped:
    listed = "; ".join(f"step {s}: {r}" for s, r in skipped)
    raise ResumeError(f"no checkpoint in {os.fspath(ckpt.directory)} restores ({listed}). If their files are "
                      f"intact the config may shape another model than they hold: rerun with the config they were "
                      f"saved with; else move the step folders aside to start afresh.")
  return None
