"""diffusers UNet2DConditionModel / UNet2DModel / UnCLIPTextProjModel folders
(config.json + safetensors) -> our UNetConfig and params.

Karlo's pipeline folder has decoder/ + text_proj/ (the decoder) and
super_res_first/ + super_res_last/ (the 64 -> 256 upsampler, same shape, two
weight sets). Our parameter names are diffusers' with "." before an index
replaced by "_", so the tensor for each of our leaves is found by renaming;
TensorReader then names every missing, mis-shaped or unused tensor.
"""

import dataclasses
import json
import os

import jax.numpy as jnp
from flax import traverse_util

from unclip_jax.convert import scan_layout
from unclip_jax.convert.common import ConversionError, TensorReader, conv2d, linear, load_safetensors
from unclip_jax.models import unet as unet_lib

_RESNET_DOWN, _ATTN_DOWN = "ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"
_RESNET_UP, _ATTN_UP = "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"

# Options whose non-default values change the computation in ways we do not implement.
_MUST_BE = {
    "center_input_sample": (False, None),
    "time_embedding_type": ("positional", None),
    "act_fn": ("silu", "swish", None),
    "only_cross_attention": (False, None),
    "dual_cross_attention": (False, None),
    "class_embeddings_concat": (False, None),
    "addition_embed_type": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False, None),
    "resnet_out_scale_factor": (1, 1.0, None),
    "mid_block_scale_factor": (1, 1.0, None),
    "conv_in_kernel": (3, None),
    "conv_out_kernel": (3, None),
    "upcast_attention": (False, None),
    "mid_block_only_cross_attention": (False, None),
    "downsample_type": ("conv", None),  # UNet2DModel; ignored by Resnet*sample blocks
    "upsample_type": ("conv", None),
    "num_class_embeds": (None,),
}


def read_config(folder: str) -> dict:
  path = os.path.join(folder, "config.json")
  if not os.path.exists(path):
    raise ConversionError(f"No config.json in {folder!r}.")
  with open(path) as f:
    return json.load(f)


def _single(value, name):
  """diffusers allows per-block lists for some options; we need them uniform."""
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ConversionError(f"{name}={value}: per-block values are not supported, only a single value.")
    return value[0]
  return value


def config_from_diffusers(unet_config: dict, text_proj_config: dict | None = None, **overrides
                          ) -> unet_lib.UNetConfig:
  """Our UNetConfig for a diffusers UNet (+ UnCLIPTextProjModel) config.json dict.

  UNet2DModel with in_channels > out_channels is read as an upsampler whose
  extra input channels are the low-res image. `overrides` (dtype, remat, ...)
  are applied last.
  """
  # Without _class_name (a config dict taken from a live model), add_attention marks a UNet2DModel.
  cls = unet_config.get("_class_name", "UNet2DModel" if "add_attention" in unet_config else "UNet2DConditionModel")
  if cls not in ("UNet2DConditionModel", "UNet2DModel"):
    raise ConversionError(f"Unsupported model class {cls!r}; expected UNet2DConditionModel or UNet2DModel.")
  for key, allowed in _MUST_BE.items():
    if unet_config.get(key) not in allowed:
      raise ConversionError(f"{cls} option {key}={unet_config[key]!r} is not supported (need one of {allowed}).")
  down = list(unet_config["down_block_types"])
  up = list(unet_config["up_block_types"])
  channels = tuple(unet_config["block_out_channels"])
  if len(down) != len(channels) or len(up) != len(channels):
    raise ConversionError(f"{len(down)} down / {len(up)} up block types for {len(channels)} block_out_channels.")
  for kind in down:
    if kind not in (_RESNET_DOWN, _ATTN_DOWN):
      raise ConversionError(f"Unsupported down block {kind!r}; expected {_RESNET_DOWN} or {_ATTN_DOWN}.")
  attention = tuple(kind == _ATTN_DOWN for kind in down)
  expected_up = [_ATTN_UP if a else _RESNET_UP for a in reversed(attention)]
  if up != expected_up:
    raise ConversionError(f"up_block_types {up} do not mirror down_block_types {down} (expected {expected_up}).")
  layers = _single(unet_config.get("layers_per_block", 2), "layers_per_block")
  scale_shift = {"default": False, "scale_shift": True}.get(unet_config.get("resnet_time_scale_shift", "default"))
  if scale_shift is None:
    raise ConversionError(f"resnet_time_scale_shift={unet_config['resnet_time_scale_shift']!r} is not supported.")

  in_ch, out_ch = unet_config.get("in_channels", 3), unet_config.get("out_channels", 3)
  kw = dict(block_channels=channels, layers_per_block=layers, attention_levels=attention,
            scale_shift=scale_shift, norm_groups=unet_config.get("norm_num_groups", 32),
            norm_eps=unet_config.get("norm_eps", 1e-5), dropout=unet_config.get("dropout", 0.0),
            flip_sin_to_cos=unet_config.get("flip_sin_to_cos", True),
            freq_shift=float(unet_config.get("freq_shift", 0)),
            time_embed_dim=unet_config.get("time_embedding_dim"))
  if cls == "UNet2DModel":
    if unet_config.get("mid_block_type", "UNetMidBlock2D") is not None and unet_config.get("add_attention", True):
      raise ConversionError("UNet2DModel with add_attention=True is not supported (the upsamplers have none).")
    if unet_config.get("mid_block_type", "UNetMidBlock2D") not in ("UNetMidBlock2D",):
      raise ConversionError(f"Unsupported mid_block_type {unet_config.get('mid_block_type')!r}.")
    if unet_config.get("class_embed_type") is not None:
      raise ConversionError("UNet2DModel with a class embedding is not supported.")
    if text_proj_config is not None:
      raise ConversionError("A text projection belongs with a UNet2DConditionModel, not a UNet2DModel.")
    low_res = max(in_ch - out_ch, 0)
    kw.update(in_channels=in_ch - low_res, low_res_channels=low_res, out_channels=out_ch, mid_attention=False)
  else:
    mid = unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid != "UNetMidBlock2DSimpleCrossAttn":
      raise ConversionError(f"Unsupported mid_block_type {mid!r}; expected UNetMidBlock2DSimpleCrossAttn.")
    if unet_config.get("num_attention_heads") is not None:
      raise ConversionError(
          "num_attention_heads is not supported; diffusers reads attention_head_dim as head size here.")
    hid_type = unet_config.get("encoder_hid_dim_type")
    if hid_type not in (None, "text_proj"):
      raise ConversionError(f"encoder_hid_dim_type={hid_type!r} is not supported.")
    class_embed = unet_config.get("class_embed_type")
    if class_embed not in (None, "identity"):
      raise ConversionError(f"class_embed_type={class_embed!r} is not supported (Karlo uses 'identity').")
    if text_proj_config is not None and class_embed != "identity":
      raise ConversionError("A text projection needs class_embed_type 'identity' to add its time embedding.")
    kw.update(in_channels=in_ch, out_channels=out_ch, mid_attention=True,
              head_dim=_single(unet_config.get("attention_head_dim", 8), "attention_head_dim"),
              context_dim=_single(unet_config.get("cross_attention_dim", 1280), "cross_attention_dim"),
              encoder_hid_dim=unet_config.get("encoder_hid_dim"))
    if text_proj_config is not None:
      tp = text_proj_config
      tpc = unet_lib.TextProjConfig(clip_dim=tp.get("clip_embeddings_dim", 768),
                                    extra_tokens=tp.get("clip_extra_context_tokens", 4))
      temb_dim = kw["time_embed_dim"] or 4 * channels[0]
      if tp.get("time_embed_dim") != temb_dim:
        raise ConversionError(f"text_proj time_embed_dim {tp.get('time_embed_dim')} != the U-Net's {temb_dim}.")
      ctx_in = kw["encoder_hid_dim"] or kw["context_dim"]
      if tp.get("cross_attention_dim") != ctx_in:
        raise ConversionError(f"text_proj cross_attention_dim {tp.get('cross_attention_dim')} != the U-Net's "
                              f"context input width {ctx_in}.")
      kw["text_proj"] = tpc
  kw.update(overrides)
  try:
    return unet_lib.UNetConfig(**kw).validate()
  except ValueError as e:
    raise ConversionError(f"The diffusers config gives an invalid U-Net: {e}") from e


def _torch_name(path: tuple[str, ...]) -> tuple[str, object]:
  """Our param path -> (diffusers tensor name, transform)."""
  parts = []
  for p in path[:-1]:
    head, _, idx = p.rpartition("_")
    if idx.isdigit() and head in ("down_blocks", "up_blocks", "resnets", "attentions", "downsamplers",
                                  "upsamplers", "to_out"):
      parts += [head, idx]
    else:
      parts.append(p)
  leaf = path[-1]
  if leaf == "kernel":
    return ".".join(parts + ["weight"]), "kernel"
  if leaf == "scale":
    return ".".join(parts + ["weight"]), None
  return ".".join(parts + [leaf]), None


def _fill(reader: TensorReader, target):
  """Takes one tensor per leaf of `target` (a nested dict of shapes) from `reader`."""
  for path, leaf in traverse_util.flatten_dict(target).items():
    name, kind = _torch_name(path)
    transform = None
    if kind == "kernel":
      transform = conv2d if len(leaf.shape) == 4 else linear
    reader.put(path, name, transform)


def convert_state_dicts(cfg: unet_lib.UNetConfig, unet_state: dict, text_proj_state: dict | None = None,
                        *, source: str = "diffusers U-Net"):
  """Our params for `cfg` from diffusers state dicts (numpy arrays by name); stacked if cfg.scan_layers."""
  target = dict(unet_lib.param_shapes(dataclasses.replace(cfg, scan_layers=False)))  # diffusers' one-per-layer names
  tp_target = target.pop("text_proj", None)
  if (tp_target is None) != (text_proj_state is None):
    raise ConversionError("The config has a text projection but no text_proj weights were given, or the reverse.")
  reader = TensorReader(unet_state, source)
  _fill(reader, target)
  params = dict(reader.finish(target))
  if tp_target is not None:
    tp_reader = TensorReader(text_proj_state, "diffusers UnCLIPTextProjModel")
    _fill(tp_reader, tp_target)
    params["text_proj"] = tp_reader.finish(tp_target)
  return scan_layout.match_layout(_cast(params, cfg), cfg)


def _cast(params, cfg):
  dtype = jnp.dtype(cfg.param_dtype)
  return traverse_util.unflatten_dict({k: jnp.asarray(v, dtype) for k, v in
                                       traverse_util.flatten_dict(params).items()})


def load_diffusers_unet(unet_dir: str, text_proj_dir: str | None = None, **overrides):
  """(config, params) from a diffusers model folder (and, for the decoder, the
  text_proj folder next to it). E.g. Karlo: ("karlo/decoder", "karlo/text_proj"),
  ("karlo/super_res_first",), ("karlo/super_res_last",)."""
  text_proj_config = read_config(text_proj_dir) if text_proj_dir else None
  cfg = config_from_diffusers(read_config(unet_dir), text_proj_config, **overrides)
  tp_state = load_safetensors(text_proj_dir) if text_proj_dir else None
  params = convert_state_dicts(cfg, load_safetensors(unet_dir), tp_state, source=f"{unet_dir!r}")
  return cfg, params
