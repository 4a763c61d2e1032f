"""Karlo v1 alpha's architecture (kakaobrain/karlo-v1-alpha, the diffusers release), as training
configs for fine-tuning or re-training at Karlo's shapes:

  python train.py --config configs/karlo.py:decoder --workdir runs/karlo/decoder \\
      --config.clip_dir=/path/to/clip-vit-large-patch14 --config.data.path=/path/to/images

ARG is prior, decoder or sr1, optionally with ",tiny" as in configs/paper.py (Karlo has one
64 -> 256 upsampler; its release carries two weight sets, super_res_first for every step but the
last and super_res_last for the last, which the converter puts into one sr1 export). To run the
released weights, convert them instead (docs/karlo.md):
  python -m unclip_jax.convert --from diffusers --src karlo-v1-alpha --dst karlo

Everything but the architecture and the diffusion settings (data, batch, optimiser, mesh) is
configs/paper.py's. Sampling defaults are UnCLIPPipeline's: 25 / 25 / 7 DDPM steps, prior
guidance 4 (x_0 clamped to +-5 in the prior's normalised space), decoder guidance 8.
"""

import ml_collections

from configs import common, paper
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib

# Karlo's UnCLIPSchedulers: cosine ("squaredcos_cap_v2"), 1000 training steps;
# (sampling steps, variance, prediction, x_0 clamp) per stage.
DIFFUSION = {
    "prior": (25, "fixed_small", "x0", 5.0),
    "decoder": (25, "learned_range", "eps", 1.0),
    "sr1": (7, "fixed_small", "eps", 1.0),
}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}


def get_config(arg: str = "decoder") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, tuple(DIFFUSION), tiny=False)  # Karlo has no 256 -> 1024 upsampler
  stage = a.stage
  steps, variance, prediction, clip_range = DIFFUSION[stage]
  c = paper.get_config(stage)
  c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000, variance_type=variance,
                                               prediction_type=prediction))
  c.sample_steps, c.sampler, c.clip_range = steps, "ddpm", clip_range
  if stage == "prior":
    karlo = prior_lib.karlo_config()  # width 2048, 20 layers, 32 heads, ViT-L/14's 768-d latents
    c.model = ml_collections.ConfigDict(dict(width=karlo.width, num_layers=karlo.num_layers,
                                             num_heads=karlo.num_heads))
  elif stage == "decoder":
    c.model = common.unet_model(unet_lib.karlo_decoder(), extra_tokens=4)
  else:
    c.model = common.unet_model(unet_lib.karlo_super_res())
  if stage in GUIDANCE:
    c.guidance_scale = GUIDANCE[stage]
  if a.tiny:
    paper.shrink(c)
  return c
