"""The Shapes-world unCLIP stack: every stage small enough to train on a CPU.

Train the stages in order (each reads the CLIP the first one exports):
  python train.py --config configs/shapes.py:clip    --workdir runs/shapes/clip
  python train.py --config configs/shapes.py:prior   --workdir runs/shapes/prior
  python train.py --config configs/shapes.py:decoder --workdir runs/shapes/decoder
  python train.py --config configs/shapes.py:sr1     --workdir runs/shapes/sr1
  python train.py --config configs/shapes.py:sr2     --workdir runs/shapes/sr2
`ARG` may end in ",tiny" (e.g. configs/shapes.py:prior,tiny) for a seconds-long
smoke-test size.
"""

import ml_collections

from configs import common

VOCABULARY = ("a red green blue yellow purple circle square triangle left right of above below").split()


def get_config(arg: str = "clip") -> ml_collections.ConfigDict:
  stage, _, size = arg.partition(",")
  tiny = size == "tiny"
  c = common.base_config(stage)
  c.data = ml_collections.ConfigDict(dict(kind="shapes", seed=0))
  c.clip_dir = "runs/shapes/clip/export"
  if stage == "clip":
    c.model = ml_collections.ConfigDict(dict(
        vocabulary=list(VOCABULARY), max_length=16, image_size=32 if tiny else 64, patch_size=8,
        text_width=32 if tiny else 128, text_layers=2 if tiny else 4, text_heads=2 if tiny else 4,
        vision_width=32 if tiny else 128, vision_layers=2 if tiny else 4, vision_heads=2 if tiny else 4,
        embed_dim=16 if tiny else 64))
    c.resolution = c.model.image_size
    c.optim.update(learning_rate=1e-3 if tiny else 5e-4, weight_decay=0.1, warmup_steps=0 if tiny else 200)
  elif stage == "prior":
    # Latent and token shapes come from the CLIP; these size the Transformer.
    c.model = ml_collections.ConfigDict(dict(width=32 if tiny else 256, num_layers=2 if tiny else 6,
                                             num_heads=2 if tiny else 8))
    c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000))
    c.p_uncond = 0.1
    c.resolution = 32 if tiny else 64
    c.stats_batches = 1 if tiny else 8
    c.optim.update(learning_rate=1e-3 if tiny else 3e-4, warmup_steps=0 if tiny else 200)
  else:
    raise ValueError(f"Unknown stage {stage!r} for configs/shapes.py.")
  c.batch_size = 8 if tiny else 128
  c.total_steps = 2 if tiny else 4000
  c.log_every = 1 if tiny else 50
  c.checkpoint_every = 2 if tiny else 500
  return c
