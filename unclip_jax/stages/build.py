"""From a config to (stage, batches): the one place train.py asks for a stage."""

import ml_collections

from unclip_jax.data import batches as data_batches
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import PRIORS, STAGES, UPSAMPLERS, ar_prior, clip, decoder, prior, text, upsampler


def build(config: ml_collections.ConfigDict, workdir: str):
  """The stage object the training loop drives, and its data stream."""
  # The upsamplers' degraded low-res input is made in the data workers.
  example_fn = upsampler.example_fn(config) if config.stage in UPSAMPLERS else None
  batches = data_batches.make_batches(config.data, config.batch_size, config.resolution, example_fn)
  if config.stage == "clip":
    return clip.ClipStage(config, workdir), batches
  if config.stage in UPSAMPLERS:
    return upsampler.UpsamplerStage(config, next(batches(0))), batches
  clip_model = _load_frozen_clip(config)
  if config.stage in PRIORS:  # latent stats / codebook from the stream's first batches
    stream = batches(0)
    first = [text.encode_batch(clip_model, next(stream)) for _ in range(config.get("stats_batches", 4))]
    stage_class = prior.PriorStage if config.stage == "prior" else ar_prior.ARPriorStage
    return stage_class(config, clip_model, first), batches
  if config.stage == "decoder":
    return decoder.DecoderStage(config, clip_model, next(batches(0))), batches
  raise ValueError(f"Unknown stage {config.stage!r}; expected one of {', '.join(STAGES)}.")


def _load_frozen_clip(config):
  if not config.get("clip_dir"):
    raise ValueError(f"Stage {config.stage!r} needs config.clip_dir, a CLIP folder (for the Shapes world: "
                     "train configs/shapes.py:clip first).")
  try:
    return clip_lib.load_clip(config.clip_dir)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"config.clip_dir: {e}") from e
