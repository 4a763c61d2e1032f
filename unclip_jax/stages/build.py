"""From a config to (stage, batches): the one place train.py asks for a stage."""

import ml_collections

from unclip_jax.data import sources


def build(config: ml_collections.ConfigDict, workdir: str):
  """The stage object the training loop drives, and its data stream."""
  if config.stage == "clip":
    from unclip_jax.stages import clip
    stage = clip.ClipStage(config, workdir)
  else:
    raise ValueError(f"Stage {config.stage!r} cannot be trained by train.py yet.")
  return stage, sources.make_batches(config.data, config.batch_size, config.resolution)
