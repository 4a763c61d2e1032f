"""The tiny random unCLIP stack the pipeline tests sample from (tests/conftest.py's stack_dir and pipe
fixtures), and the sampling options and images they use."""

import jax
import numpy as np

from configs import shapes
from unclip_jax import pipeline, train_loop
from unclip_jax.pipeline import StageOptions
from unclip_jax.stages import build

FAST = {"prior": StageOptions(3, "ddpm", guidance_scale=4.0, clip_range=5.0),
        "decoder": StageOptions(3, "ddpm", guidance_scale=3.0), "sr1": StageOptions(2, "ddim"),
        "sr2": StageOptions(2, "ddim")}
# The deterministic decoder of interpolations and text diffs (what options_for makes of FAST).
DDIM = dict(FAST, decoder=StageOptions(3, "ddim", guidance_scale=3.0))


def _image(h, w, background, box, colour):
  image = np.full((h, w, 3), background, np.uint8)
  image[box[0]:box[1], box[2]:box[3]] = colour
  return image


IMAGE_A = _image(24, 24, 128, (6, 18, 4, 14), (220, 30, 30))
IMAGE_B = _image(20, 28, 40, (2, 12, 10, 20), (30, 200, 60))  # not square: CLIP and the decoder centre-crop



def build_stack(root, clip_dir: str) -> str:
  """Every stage of configs/shapes.py at its tiny size, randomly initialised (each with its own key, then
  perturbed so that no weight is exactly its init), exported and assembled into a checkpoint under root."""
  folders = {"clip": clip_dir}
  for i, stage_name in enumerate(pipeline.STAGES):
    config = shapes.get_config(f"{stage_name},tiny")
    config.clip_dir = clip_dir
    stage, _ = build.build(config, str(root / stage_name))
    params = stage.init_params(jax.random.key(i))
    params = jax.tree.map(lambda p, i=i: p + 0.02 * np.random.default_rng(i).standard_normal(p.shape), params)
    train_loop.export(stage, params, str(root / stage_name / "export"))
    folders[stage_name] = str(root / stage_name / "export")
  return pipeline.assemble(str(root / "checkpoint"), **folders)
