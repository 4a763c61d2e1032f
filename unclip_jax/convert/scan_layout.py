"""Converts params between the scanned and unscanned layouts (the `scan_layers` config flag).

Karlo's converters and checkpoints written before scanning produce the
unscanned layout; a model built with scan_layers=True stacks identical layers'
params on a leading axis (docs/prior.md, docs/unet.md):

  prior:  block_{i}/...                      <-> blocks/...  [num_layers, ...]
          (the AR prior: the same under transformer/)
  U-Net:  {down,up}_blocks_k/resnets_{j}/...  <-> {down,up}_blocks_k/layers_{a}_to_{b}/resnets/...  [b - a + 1, ...]
          (and attentions_{j} likewise), for each run a..b of unet_config.layer_runs.

to_scanned and to_unscanned are exact inverses (stacking and indexing copy
values bit for bit). They take a params tree or a variables dict with a
"params" entry, and keep numpy leaves numpy. Both read only the config's
structure, never its scan_layers flag; match_layout converts to what the flag asks.
"""

import re

import jax.numpy as jnp
import numpy as np

from unclip_jax.models import ar_prior as ar_lib
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet_config

_SCANNED_NAME = re.compile(r"^(blocks|layers_\d+_to_\d+)$")


def _stack(leaves: list):
  if all(isinstance(x, np.ndarray) for x in leaves):
    return np.stack(leaves)
  return jnp.stack(leaves)


def _stack_trees(trees: list):
  """[tree, ...] with equal structure -> one tree whose leaves are stacked on a new axis 0."""
  if isinstance(trees[0], dict):
    if any(set(t) != set(trees[0]) for t in trees):
      raise ValueError(f"Layers to stack differ in their params: {[sorted(t) for t in trees]}.")
    return {k: _stack_trees([t[k] for t in trees]) for k in trees[0]}
  shapes = {(np.shape(x), np.asarray(x).dtype if isinstance(x, np.ndarray) else x.dtype) for x in trees}
  if len(shapes) != 1:
    raise ValueError(f"Layers to stack have different shapes/dtypes: {shapes}.")
  return _stack(trees)


def _index_tree(tree, i: int):
  if isinstance(tree, dict):
    return {k: _index_tree(v, i) for k, v in tree.items()}
  return tree[i]


def _length(tree) -> int:
  while isinstance(tree, dict):
    tree = next(iter(tree.values()))
  return tree.shape[0]


def _on_params(tree, fn):
  """Applies fn to tree["params"] if tree is a variables dict, else to tree; returns a new dict."""
  if "params" in tree:
    return {**tree, "params": fn(dict(tree["params"]))}
  return fn(dict(tree))


def _prior_to_scanned(params: dict, cfg: prior_lib.PriorConfig) -> dict:
  names = [f"block_{i}" for i in range(cfg.num_layers)]
  missing = [n for n in names if n not in params]
  if missing or "blocks" in params:
    raise ValueError(f"Not an unscanned prior with {cfg.num_layers} layers (missing {missing[:3]}, "
                     f"has 'blocks': {'blocks' in params}).")
  params["blocks"] = _stack_trees([params.pop(n) for n in names])
  return params


def _prior_to_unscanned(params: dict, cfg: prior_lib.PriorConfig) -> dict:
  if "blocks" not in params or _length(params["blocks"]) != cfg.num_layers:
    raise ValueError(f"Not a scanned prior with {cfg.num_layers} layers (no 'blocks' of that length).")
  blocks = params.pop("blocks")
  for i in range(cfg.num_layers):
    params[f"block_{i}"] = _index_tree(blocks, i)
  return params


def _layer_names(block: dict, j: int) -> list[str]:
  return [n for n in (f"resnets_{j}", f"attentions_{j}") if n in block]


def _unet_to_scanned(params: dict, cfg: unet_config.UNetConfig) -> dict:
  for block_name, segments in unet_config.layer_runs(cfg).items():
    block = dict(params[block_name])
    for a, b in segments:
      if b - a < 2:
        continue
      layers = [{n.rpartition("_")[0]: block.pop(n) for n in _layer_names(block, j)} for j in range(a, b)]
      if not layers[0]:
        raise ValueError(f"{block_name} has no resnets_{a}: not the unscanned layout of this config.")
      block[unet_config.scan_name(a, b)] = _stack_trees(layers)
    params[block_name] = block
  return params


def _unet_to_unscanned(params: dict, cfg: unet_config.UNetConfig) -> dict:
  for block_name, segments in unet_config.layer_runs(cfg).items():
    block = dict(params[block_name])
    for a, b in segments:
      if b - a < 2:
        continue
      name = unet_config.scan_name(a, b)
      if name not in block or _length(block[name]) != b - a:
        raise ValueError(f"{block_name} has no {name} of length {b - a}: not the scanned layout of this config.")
      stacked = block.pop(name)
      for j in range(a, b):
        for kind, tree in stacked.items():  # "resnets", "attentions"
          block[f"{kind}_{j}"] = _index_tree(tree, j - a)
    params[block_name] = block
  return params


def _blocks_fn(cfg, prior_fn, unet_fn):
  """fn(params) converting a config's layer stack: a prior's blocks, the AR prior's (under
  "transformer") or a U-Net's runs of layers."""
  if isinstance(cfg, prior_lib.PriorConfig):
    return lambda p: prior_fn(p, cfg)
  if isinstance(cfg, ar_lib.ARPriorConfig):
    return lambda p: dict(p, transformer=prior_fn(dict(p["transformer"]), cfg))
  return lambda p: unet_fn(p, cfg)


def to_scanned(params, cfg):
  """Unscanned -> scanned params for a PriorConfig, ARPriorConfig or UNetConfig (its scan_layers flag
  is ignored)."""
  return _on_params(params, _blocks_fn(cfg, _prior_to_scanned, _unet_to_scanned))


def to_unscanned(params, cfg):
  """Scanned -> unscanned params; the exact inverse of to_scanned."""
  return _on_params(params, _blocks_fn(cfg, _prior_to_unscanned, _unet_to_unscanned))


def is_scanned(params, cfg) -> bool:
  """Whether params (or variables) hold a stacked layer. False for a config with nothing to
  scan, where both layouts are the same tree."""
  p = params.get("params", params)
  if isinstance(cfg, prior_lib.PriorConfig):
    return "blocks" in p
  if isinstance(cfg, ar_lib.ARPriorConfig):
    return "blocks" in p["transformer"]
  return any(unet_config.scan_name(a, b) in p[block]
             for block, segments in unet_config.layer_runs(cfg).items() for a, b in segments if b - a > 1)


def match_layout(params, cfg):
  """params in the layout cfg.scan_layers asks for, converting if needed (e.g. Karlo's converted
  weights or an old checkpoint into a scanned config)."""
  if cfg.scan_layers and not is_scanned(params, cfg):
    return to_scanned(params, cfg)
  if not cfg.scan_layers and is_scanned(params, cfg):
    return to_unscanned(params, cfg)
  return params


def is_stacked_path(path) -> bool:
  """Whether a leaf at this path has a leading layer axis (sharding rules should leave that axis
  unsplit and name the others as for one layer). path: names (flax.traverse_util.flatten_dict) or a
  jax key path (jax.tree_util.tree_map_with_path), of params or of an optimizer state over them."""
  names = (getattr(p, "key", getattr(p, "name", p)) for p in path)
  return any(isinstance(n, str) and _SCANNED_NAME.match(n) for n in names)
