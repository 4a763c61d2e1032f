"""Settings every stage's config shares (mesh, logging, checkpoints, optimiser)."""

import dataclasses

import ml_collections

from unclip_jax import optim, parallel
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import DIFFUSION_STAGES, STAGES


def parse_arg(arg: str, stages, **options) -> ml_collections.ConfigDict:
  """A config file's ARG ("prior", "decoder,tiny", "sr1,tiny=True") -> {stage, *options}: the first
  word names the stage (one of `stages`), later words set options declared here with their defaults
  ("tiny" alone is tiny=True). Anything else is an error, so a typo ("prior,tine") never silently
  trains another model."""
  stage, *words = [w.strip() for w in (arg or "").split(",")]
  if stage not in stages:
    raise ValueError(f"unknown stage {stage!r} in config arg {arg!r}; expected one of {', '.join(stages)}.")
  parsed = dict(options)
  for word in words:
    name, eq, value = word.partition("=")
    if name not in options:
      known = ", ".join(options) or "none"
      raise ValueError(f"unknown option {name!r} in config arg {arg!r}; known options: {known}.")
    default = options[name]
    if not eq:
      if not isinstance(default, bool):
        raise ValueError(f"option {name!r} in config arg {arg!r} needs a value ({name}=...).")
      parsed[name] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"option {name!r} in config arg {arg!r} is true or false, got {value!r}.")
      parsed[name] = value.lower() in ("true", "1")
    else:
      try:
        parsed[name] = type(default)(value)
      except ValueError:
        raise ValueError(f"option {name!r} in config arg {arg!r} takes a {type(default).__name__}, "
                         f"got {value!r}.") from None
  return ml_collections.ConfigDict(dict(parsed, stage=stage))


# UNetConfig fields that the stage sets (from the CLIP and its role), not the config.
DERIVED_UNET_FIELDS = ("in_channels", "out_channels", "low_res_channels", "text_proj", "dtype")
DERIVED_TEXT_ENCODER_FIELDS = ("vocab_size", "num_tokens")  # the CLIP tokenizer's


def unet_model(cfg: unet_lib.UNetConfig, **extra) -> ml_collections.ConfigDict:
  """A UNetConfig as a config's `model`, the stage-derived fields left out. Tuples stay tuples, so
  `--config.model.block_channels='(128, 256)'` overrides them from the command line."""
  fields = {k: v for k, v in cfg.to_dict().items() if k not in DERIVED_UNET_FIELDS}
  if fields.get("text_encoder"):
    fields["text_encoder"] = {k: v for k, v in fields["text_encoder"].items() if k not in DERIVED_TEXT_ENCODER_FIELDS}
  else:
    fields.pop("text_encoder", None)  # (None, the default: a config without it names no such key)
  return ml_collections.ConfigDict(dict(fields, **extra))


def tiny_unet(cfg: unet_lib.UNetConfig) -> unet_lib.UNetConfig:
  """The same U-Net shape (levels, attention, conditioning) at a size a laptop trains in seconds:
  16 channels per unit of the original's channel multipliers, one layer per level."""
  base = cfg.block_channels[0]
  text_encoder = cfg.text_encoder and dataclasses.replace(cfg.text_encoder, width=32, num_layers=2, num_heads=2)
  return dataclasses.replace(cfg, block_channels=tuple(16 * max(1, c // base) for c in cfg.block_channels),
                             layers_per_block=1, head_dim=8, norm_groups=8,
                             context_dim=32 if cfg.context_dim else None, time_embed_dim=None,
                             text_encoder=text_encoder)


def tiny_run(c: ml_collections.ConfigDict) -> None:
  """A paper-shaped config's ",tiny" run settings: small batch, a few steps, every device on data."""
  c.batch_size, c.total_steps = 8, 4
  c.log_every, c.checkpoint_every, c.sample_every = 1, 2, 0
  c.mesh.update(data=-1, fsdp=1)
  c.compute_dtype = "float32"


def data_config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """Every key a data source reads (data/batches.py make_batches), whatever the kind, so any
  --config.data.* override works: kind shapes | folder | tfds | embeddings."""
  data = dict(kind=kind, path="", seed=0,
              # tfds
              name="coco_captions", split="train", image_key="image", caption_key="captions/text", data_dir="",
              # folder and tfds decoding (data/loader.py): worker processes, threads and batches buffered per process
              workers=0, threads=8, prefetch=2,
              random_flip=False,  # off: a flip contradicts "left of" / "right of" captions
              # folder, tfds and shapes: a store of precomputed CLIP embeddings of the same items
              # (unclip-embed, data/embeddings.py)
              embeddings="")
  unknown = set(overrides) - set(data)
  if unknown:
    raise ValueError(f"unknown data keys {sorted(unknown)}")
  return ml_collections.ConfigDict(dict(data, **overrides))


def base_config(stage: str) -> ml_collections.ConfigDict:
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r}; expected one of {STAGES}.")
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  # Mesh axis sizes within a slice (-1 takes the remaining devices), and dcn_*: each axis's further
  # split across slices (multislice) or processes; see parallel.make_mesh.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
  # Logical axis -> mesh axes (parallel.DEFAULT_RULES); which parameter dimension has which logical
  # name is declared in parallel.PARAM_RULES.
  c.logical_axis_rules = [[name, list(axes) if isinstance(axes, tuple) else axes]
                          for name, axes in parallel.DEFAULT_RULES]
  c.batch_size = 64
  c.total_steps = 1000
  c.grad_accum_steps = 1
  if stage in DIFFUSION_STAGES:
    # > 0: weight the MSE by min-SNR-gamma (Hang et al. 2023, who use gamma 5) instead of the plain
    # MSE (losses.min_snr_weight); 0: off.
    c.min_snr_gamma = 0.0
  c.compute_dtype = "float32"  # "bfloat16": bf16 compute, fp32 params and optimizer state
  hp = optim.PAPER_HPARAMS.get(stage, optim.PAPER_HPARAMS["prior"])
  c.optim = ml_collections.ConfigDict(dict(
      learning_rate=hp["learning_rate"], b1=0.9, b2=hp["b2"], eps=hp["eps"], weight_decay=hp["weight_decay"],
      grad_clip_norm=1.0, warmup_steps=0, decay="constant"))
  c.ema_decay = hp["ema_decay"]
  c.log_every = 50
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3
  c.sample_every = 0
  c.export_dir = ""
  # Fine-tuning: a stage export (train.py's WORKDIR/export, a converted Karlo stage) to start a new run
  # from, params and EMA, instead of a random init; a checkpoint in the workdir wins (unclip_jax/init_from.py).
  c.init_from = ""
  return c
