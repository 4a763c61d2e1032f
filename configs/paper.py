"""The unCLIP paper's stages at full size (Table 3), on your own data and OpenAI's CLIP.

  python train.py --config configs/paper.py:decoder --workdir runs/paper/decoder \\
      --config.clip_dir=/path/to/clip-vit-large-patch14 --config.data.path=/path/to/images

ARG is prior, ar_prior (the autoregressive prior), decoder, sr1 (64 -> 256) or sr2 (256 -> 1024),
optionally with ",tiny" (e.g. configs/paper.py:decoder,tiny): the same stage with a model small
enough to try it on a CPU. The decoder has GLIDE's text transformer (the paper's 3.5B);
"decoder,text_encoder=false" reads CLIP's token encodings instead (2.25B).
Data default to a folder of image-caption pairs (or webdataset shards); set
--config.data.kind=tfds and --config.data.name=coco_captions for tensorflow-datasets. The mesh defaults
to FSDP over every device; these models do not fit one device's memory. Repeated layers are
scanned (scan_layers, docs/scaling.md: a smaller program compiles faster).
"""

import ml_collections

from configs import common
from unclip_jax.models import unet as unet_lib

# schedule, sampling steps, sampler, variance, prediction (Table 3)
_DIFFUSION = {
    "prior": ("cosine", 64, "ddpm", "fixed_small", "x0"),
    "decoder": ("cosine", 250, "ddpm", "learned_range", "eps"),
    "sr1": ("cosine", 27, "ddim", "fixed_small", "eps"),
    "sr2": ("linear", 15, "ddim", "fixed_small", "eps"),
}
_BATCH = {"prior": 4096, "ar_prior": 4096, "decoder": 2048, "sr1": 1024, "sr2": 512}
_ITERATIONS = {"prior": 600_000, "ar_prior": 1_000_000, "decoder": 800_000, "sr1": 1_000_000, "sr2": 1_000_000}


def get_config(arg: str = "decoder") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, tuple(_BATCH), tiny=False, text_encoder=True)
  stage = a.stage
  c = common.base_config(stage)
  c.mesh.update(data=1, fsdp=-1, tensor=1)
  c.compute_dtype = "bfloat16"
  if stage in ("prior", "ar_prior", "decoder"):  # the stages that read CLIP
    c.clip_dir = ""  # e.g. a saved openai/clip-vit-large-patch14
  c.data = common.data_config("folder", workers=8)
  if stage in _DIFFUSION:
    schedule, sample_steps, sampler, variance, prediction = _DIFFUSION[stage]
    c.diffusion = ml_collections.ConfigDict(dict(schedule=schedule, num_timesteps=1000, variance_type=variance,
                                                 prediction_type=prediction))
    c.sample_steps, c.sampler = sample_steps, sampler
  c.batch_size = _BATCH[stage]
  c.total_steps = _ITERATIONS[stage]
  c.log_every, c.checkpoint_every, c.sample_every = 100, 5000, 5000
  if stage == "ar_prior":
    # 319 PCA codes of 1,024 buckets (ViT-L/14's z_i has 768 dimensions; the paper's ViT-H, 1,024);
    # ~1B parameters (Table 3). The codebook's PCA needs more embeddings than CLIP has dimensions.
    c.model = ml_collections.ConfigDict(dict(num_codes=319, num_buckets=1024, num_dot_buckets=64, width=2048,
                                             num_layers=20, num_heads=32, scan_layers=True, remat=False))
    c.p_uncond = 0.1
    c.resolution = 224
    c.stats_batches = 4
  elif stage == "prior":
    c.model = ml_collections.ConfigDict(dict(width=2048, num_layers=24, num_heads=32, scan_layers=True, remat=False))
    c.p_uncond = 0.1
    c.resolution = 224  # what CLIP embeds
    c.stats_batches = 16
  elif stage == "decoder":
    # text_encoder=false: CLIP's token encodings in place of GLIDE's text transformer (2.25B, not 3.5B).
    c.model = common.unet_model(unet_lib.paper_decoder(**({} if a.text_encoder else {"text_encoder": None})),
                                extra_tokens=4)
    c.resolution, c.decoder_resolution = 224, 64
    c.p_drop_image, c.p_drop_text = 0.1, 0.5
    c.guidance_scale = 3.0
  else:
    factory = unet_lib.paper_sr_64_256 if stage == "sr1" else unet_lib.paper_sr_256_1024
    c.model = common.unet_model(factory())
    c.low_res_resolution, c.resolution = (64, 256) if stage == "sr1" else (256, 1024)
    c.augmentation = "blur" if stage == "sr1" else "bsr"
    c.crop_fraction = 0.25
  if a.tiny:
    shrink(c)
  return c


def shrink(c: ml_collections.ConfigDict) -> None:
  """",tiny": the stage's shapes and settings with a model small enough to try the whole pipeline on
  a CPU (common.tiny_unet; a 2-layer, 64-wide prior)."""
  if c.stage in ("prior", "ar_prior"):
    c.model.update(width=64, num_layers=2, num_heads=2)
    if c.stage == "ar_prior":
      c.model.update(num_codes=8, num_buckets=64, num_dot_buckets=8)
    c.stats_batches = 2 if c.stage == "ar_prior" else 1
  else:
    fields = {k: v for k, v in c.model.to_dict().items() if k != "extra_tokens"}
    c.model = common.unet_model(common.tiny_unet(unet_lib.UNetConfig.from_dict(fields)),
                                **({"extra_tokens": c.model.extra_tokens} if "extra_tokens" in c.model else {}))
  common.tiny_run(c)
