"""Settings every stage's config shares (mesh, logging, checkpoints, optimiser)."""

import ml_collections

from unclip_jax import optim, parallel

STAGES = ("clip", "prior", "decoder", "sr1", "sr2")


def data_config(kind: str, **overrides) -> ml_collections.ConfigDict:
  """Every key a data source reads (data/batches.py make_batches), whatever the kind, so any
  --config.data.* override works: kind shapes | folder | tfds | embeddings."""
  data = dict(kind=kind, path="", seed=0,
              # tfds
              name="coco_captions", split="train", image_key="image", caption_key="captions/text", data_dir="",
              # folder and tfds decoding (data/loader.py): worker processes, threads and batches buffered per process
              workers=0, threads=8, prefetch=2,
              random_flip=False,  # off: a flip contradicts "left of" / "right of" captions
              # folder, tfds and shapes: a store of precomputed CLIP embeddings of the same items (data/embeddings.py)
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
  return c
