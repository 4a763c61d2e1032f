"""The unCLIP pipeline: text -> z_t -> prior -> z_i -> decoder -> upsamplers,
and the paper's applications on top of the decoder half: variations,
interpolations and text diffs of images.

  pipe = pipeline.Pipeline.load(CHECKPOINT)
  images = pipe.text_to_image(["a red circle"], seeds=[0])
  frames = pipeline.interpolate(pipe, "a.png", "b.png", num_frames=8)
  frames = pipeline.interpolate_captions(pipe, "a red circle", "a blue square", num_frames=8)

By job: options.py (StageOptions per stage, presets, what each mode samples
with), loading.py (the checkpoint layout, reading and assembling one),
core.py (the Pipeline: prior (text to z_i), decode, invert, compiled loops, devices),
applications.py (variations, interpolate, interpolate_captions, text_diff, inpaint). The stages build their
own sampling loops from their exports (unclip_jax/stages/contract.py).
"""

from unclip_jax.pipeline.applications import (
           InputError,
           inpaint,
           interpolate,
           interpolate_captions,
           text_diff,
           variations,
)
from unclip_jax.pipeline.core import RNG_STREAMS, Pipeline, stage_keys
from unclip_jax.pipeline.loading import PIPELINE_FILE, CheckpointError, assemble
from unclip_jax.pipeline.options import PRESETS, STAGES, StageOptions, stage_options

__all__ = ["PIPELINE_FILE", "PRESETS", "RNG_STREAMS", "STAGES", "CheckpointError", "InputError", "Pipeline",
           "StageOptions", "assemble", "inpaint", "interpolate", "interpolate_captions", "stage_keys", "stage_options",
           "text_diff", "variations"]
