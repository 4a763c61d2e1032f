"""diffusers PriorTransformer (safetensors + config.json, e.g. Karlo's prior/
folder) -> our DiffusionPrior config and variables {'params', 'stats'}."""

import dataclasses
import json
import os

import jax
import numpy as np

from unclip_jax.convert import scan_layout
from unclip_jax.convert.common import ConversionError, TensorReader, linear, load_safetensors
from unclip_jax.models import prior as prior_lib


def config_from_diffusers(cfg: dict) -> prior_lib.PriorConfig:
  """Our PriorConfig for a diffusers PriorTransformer config; unsupported options raise."""
  heads = cfg.get("num_attention_heads", 32)
  width = heads * cfg.get("attention_head_dim", 64)
  dim = cfg.get("embedding_dim", 768)
  problems = []
  if cfg.get("time_embed_act_fn", "silu") != "silu":
    problems.append(f"time_embed_act_fn={cfg['time_embed_act_fn']!r} (only 'silu')")
  if cfg.get("encoder_hid_proj_type", "linear") != "linear":
    problems.append(f"encoder_hid_proj_type={cfg['encoder_hid_proj_type']!r} (only 'linear': text tokens needed)")
  added = cfg.get("added_emb_type", "prd")
  if added not in ("prd", None):
    problems.append(f"added_emb_type={added!r} (only 'prd' or None)")
  for key in ("norm_in_type", "embedding_proj_norm_type"):
    if cfg.get(key) not in (None, "layer"):
      problems.append(f"{key}={cfg[key]!r} (only None or 'layer')")
  for key in ("embedding_proj_dim", "clip_embed_dim"):
    if cfg.get(key) not in (None, dim):
      problems.append(f"{key}={cfg[key]} differs from embedding_dim={dim}")
  extra = 3 + int(added == "prd")
  if cfg.get("additional_embeddings", 4) != extra:
    problems.append(f"additional_embeddings={cfg.get('additional_embeddings', 4)}; the sequence z_t, timestep, "
                    f"x_t{', prd' if added == 'prd' else ''} needs {extra}")
  if problems:
    raise ConversionError("Unsupported PriorTransformer config: " + "; ".join(problems))
  return prior_lib.PriorConfig(
      clip_dim=dim, text_width=dim, num_text_tokens=cfg.get("num_embeddings", 77), width=width,
      num_layers=cfg.get("num_layers", 20), num_heads=heads, time_embed_dim=cfg.get("time_embed_dim"),
      prd_token=added == "prd", norm_in=cfg.get("norm_in_type") == "layer",
      embedding_proj_norm=cfg.get("embedding_proj_norm_type") == "layer", dropout=cfg.get("dropout", 0.0))


def convert_state_dict(state_dict: dict, config: prior_lib.PriorConfig, source: str = "PriorTransformer"):
  """Maps diffusers tensor names onto our variables, checked against the model's shapes; the
  blocks are stacked if config.scan_layers."""
  reader = TensorReader(state_dict, source)
  p = ("params",)

  def dense(ours: tuple, theirs: str):
    reader.put(p + ours + ("kernel",), theirs + ".weight", linear)
    reader.put(p + ours + ("bias",), theirs + ".bias")

  def layer_norm(ours: tuple, theirs: str):
    reader.put(p + ours + ("scale",), theirs + ".weight")
    reader.put(p + ours + ("bias",), theirs + ".bias")

  dense(("time_embedding", "linear_1"), "time_embedding.linear_1")
  dense(("time_embedding", "linear_2"), "time_embedding.linear_2")
  dense(("proj_in",), "proj_in")
  dense(("embedding_proj",), "embedding_proj")
  dense(("encoder_hidden_states_proj",), "encoder_hidden_states_proj")
  if config.embedding_proj_norm:
    layer_norm(("embedding_proj_norm",), "embedding_proj_norm")
  if config.norm_in:
    layer_norm(("norm_in",), "norm_in")
  reader.put(p + ("positional_embedding",), "positional_embedding")
  if config.prd_token:
    reader.put(p + ("prd_embedding",), "prd_embedding")
  for i in range(config.num_layers):
    ours, theirs = (f"block_{i}",), f"transformer_blocks.{i}"
    layer_norm(ours + ("norm1",), theirs + ".norm1")
    for name in ("to_q", "to_k", "to_v"):
      dense(ours + ("attn1", name), f"{theirs}.attn1.{name}")
    dense(ours + ("attn1", "to_out"), f"{theirs}.attn1.to_out.0")
    layer_norm(ours + ("norm3",), theirs + ".norm3")
    dense(ours + ("ff_in",), f"{theirs}.ff.net.0.proj")
    dense(ours + ("ff_out",), f"{theirs}.ff.net.2")
  layer_norm(("norm_out",), "norm_out")
  dense(("proj_to_clip_embeddings",), "proj_to_clip_embeddings")
  reader.put(("stats", "clip_mean"), "clip_mean", lambda a: a.reshape(-1))
  reader.put(("stats", "clip_std"), "clip_std", lambda a: a.reshape(-1))

  unscanned = dataclasses.replace(config, scan_layers=False)  # diffusers' one-per-layer names
  target = jax.eval_shape(lambda: prior_lib.init_variables(unscanned, jax.random.key(0)))
  variables = reader.finish(target)
  return scan_layout.match_layout(jax.tree.map(np.asarray, variables), config)


def load_diffusers_prior(path: str):
  """(PriorConfig, variables) from a diffusers PriorTransformer folder (e.g. karlo-v1-alpha/prior)."""
  config_file = os.path.join(path, "config.json")
  if not os.path.exists(config_file):
    raise ConversionError(f"No config.json in {path!r}; expected a diffusers PriorTransformer folder "
                          "(e.g. the 'prior' subfolder of kakaobrain/karlo-v1-alpha).")
  with open(config_file) as f:
    cfg = json.load(f)
  if cfg.get("_class_name", "PriorTransformer") != "PriorTransformer":
    raise ConversionError(f"{config_file} describes a {cfg['_class_name']}, not a PriorTransformer.")
  config = config_from_diffusers(cfg)
  return config, convert_state_dict(load_safetensors(path), config, source=f"PriorTransformer at {path!r}")
