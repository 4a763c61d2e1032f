"""Fine-tuning: a new run starts from a stage export (config.init_from) instead of a random init.

An export is train.py's WORKDIR/export or a stage folder that `python -m unclip_jax.convert` writes
(e.g. Karlo's decoder): params/ and config.json, the stage's record (stages/contract.py). Its params
become the run's params and its EMA; the optimizer state is fresh and the step 0. A run's own
checkpoint always wins (train_loop.train resumes it and ignores init_from), so rerunning the same
command resumes the fine-tuning rather than starting it over.

Checked twice, each a one-line InitFromError: before any model is built, that the folder is an
export of this config's stage (check_record); before the first step, that its params tree is the
one the config builds, path for path and shape for shape (load_params).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from unclip_jax import checkpoints, paths
from unclip_jax.convert import scan_layout
from unclip_jax.stages import PRIORS, SAMPLING_STAGES, contract


class InitFromError(ValueError):
  """config.init_from names no export of this stage, or one whose params do not fit the config."""


def _where(path: str) -> str:
  return f"config.init_from {os.fspath(path)!r}"


def read_record(path: str) -> contract.StageExport:
  """The export's stage record (its config.json), without reading any params."""
  folder = paths.absolute(path)
  config_path = folder / checkpoints.INFERENCE_CONFIG
  if not config_path.is_file() or not (folder / checkpoints.INFERENCE_PARAMS).is_dir():
    raise InitFromError(f"{_where(path)} is not a stage export: expected {checkpoints.INFERENCE_CONFIG} and a "
                        f"{checkpoints.INFERENCE_PARAMS}/ folder (train.py's WORKDIR/export, or a stage folder of "
                        f"python -m unclip_jax.convert).")
  try:
    return contract.read(json.loads(config_path.read_text()))
  except (ValueError, KeyError, TypeError) as e:
    raise InitFromError(f"{_where(path)}: its {checkpoints.INFERENCE_CONFIG} is no stage record ({e}).") from None


def check_record(config) -> None:
  """What can be checked before the stage is built: the folder is an export of config.stage."""
  if config.stage not in SAMPLING_STAGES:
    raise InitFromError(f"{_where(config.init_from)}: only the {', '.join(SAMPLING_STAGES)} stages start from an "
                        f"export; the {config.stage} stage starts from a random init.")
  record = read_record(config.init_from)
  if record.stage != config.stage:
    raise InitFromError(f"{_where(config.init_from)} is a {record.stage} export; this config trains the "
                        f"{config.stage} stage.")


def _flat(tree) -> dict[str, tuple]:
  """{"a/b/kernel": shape} of a nested dict of arrays (or ShapeDtypeStructs)."""
  return {"/".join(map(str, k)): tuple(np.shape(v)) for k, v in traverse_util.flatten_dict(tree).items()}


def first_mismatch(exported, expected) -> str | None:
  """The first parameter path (sorted) that the two trees lack, hold extra or shape differently, with
  both shapes; None when they fit."""
  got, want = _flat(exported), _flat(expected)
  for name in sorted(got.keys() | want.keys()):
    if got.get(name) != want.get(name):
      return f"{name}: export {got.get(name, 'absent')}, config {want.get(name, 'absent')}"
  return None


def trainable(params, record: contract.StageExport):
  """The part of an export's params tree that training updates: a prior's {"params", "stats"} (the
  AR prior's {"params", "codebook"}) holds the network in "params"; Karlo's upsampler pair {"first",
  "last"} trains "first" (the network of every step but the last, which a fine-tuned export then
  also runs)."""
  if record.stage in PRIORS:
    return params["params"]
  if getattr(record, "params_last", False):
    logging.warning("The export runs a separate network for the last upsampling step (Karlo's "
                    "super_res_last): fine-tuning starts from the other one (super_res_first), which the "
                    "fine-tuned export runs at every step.")
    return params["first"]
  return params


def load_params(path: str, expected, model_config=None):
  """(params, record, exported): the export's trainable params as host arrays in the layout, shapes and
  dtypes of `expected` (the config's params, e.g. jax.eval_shape of the stage's init), its record and
  its whole params tree. An InitFromError names the first parameter that does not fit."""
  record = read_record(path)
  exported, _ = checkpoints.load_inference(path)
  params = trainable(exported, record)
  if model_config is not None and hasattr(model_config, "scan_layers"):
    try:
      params = scan_layout.match_layout(params, model_config)  # e.g. an unscanned export into a scanned config
    except (KeyError, ValueError):
      pass  # another architecture: the comparison below names where
  mismatch = first_mismatch(params, expected)
  if mismatch is not None:
    raise InitFromError(f"{_where(path)} ({record.stage}) does not fit this config's architecture: {mismatch}.")
  params = jax.tree.map(lambda p, e: np.asarray(p, e.dtype), params, expected)
  return params, record, exported


def _place(host_params, shardings):
  """Host arrays into their shardings, each device taking its own slice (never whole on one device)."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda index: x[index]),
                      host_params, shardings)


def start_from(path: str, stage, state, tx, shardings, model_config=None):
  """`state` (a fresh one: step 0) with params and EMA from the export at `path` and a fresh optimizer
  state for them. Raises InitFromError before any array is placed if the export does not fit."""
  expected = jax.eval_shape(lambda p: p, state.params)
  params, record, exported = load_params(path, expected, model_config)
  data_stats = exported.get("stats", exported.get("codebook")) if record.stage in PRIORS else None
  if data_stats is not None:  # the latent space (or codes) its network learned
    stage.adopt_stats(data_stats)
  fresh = lambda s, p: s.replace(params=p, opt_state=tx.init(p), ema_params=jax.tree.map(jnp.copy, p))
  state = jax.jit(fresh, out_shardings=shardings, donate_argnums=0)(state, _place(params, shardings.params))
  logging.info("Started from the %s export %s (params and EMA; fresh optimizer state, step 0).", record.stage,
               os.fspath(path))
  return state
