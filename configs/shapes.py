"""The Shapes-world unCLIP stack: every stage small enough to train on a CPU.

One command trains every stage in order and assembles assets/shapes_demo:
  scripts/train_shapes_demo.sh
which runs, stage by stage (each reads the CLIP the first one exports):
  python train.py --config configs/shapes.py:clip    --workdir runs/shapes/clip
  python train.py --config configs/shapes.py:prior   --workdir runs/shapes/prior
  python train.py --config configs/shapes.py:ar_prior --workdir runs/shapes/ar_prior
  python train.py --config configs/shapes.py:decoder --workdir runs/shapes/decoder
  python train.py --config configs/shapes.py:sr1     --workdir runs/shapes/sr1
  python train.py --config configs/shapes.py:sr2     --workdir runs/shapes/sr2
`ARG` may end in ",tiny" (e.g. configs/shapes.py:prior,tiny) for a seconds-long
smoke-test size.
"""

import ml_collections

from configs import common

BATCH_SIZE = {"clip": 64, "prior": 64, "ar_prior": 64, "decoder": 32, "sr1": 16, "sr2": 16}
TOTAL_STEPS = {"clip": 3000, "prior": 1500, "ar_prior": 3000, "decoder": 10500, "sr1": 2400, "sr2": 500}
# The demo checkpoint's recommended sampling settings (pipeline.json "options"; StageOptions fields):
# the fastest setting of benchmarks/time_to_quality.py's table that matched the earlier 25 / 25 / 10 / 10
# steps on R-precision, colour and relation at 35% of their time (docs/benchmarks.md, "Time to quality"),
# with the decoder since raised to 25 steps for shape.
SAMPLING_OPTIONS = {
    "prior": dict(num_steps=10, sampler="dpmpp_2m", spacing="logsnr", guidance_scale=2.0, clip_range=5.0),
    # (sample.py --prior ar; its steps are its codes) guidance 1.5 scored best of 1, 1.5, 2 and 4 on 48
    # held-out captions; at 4 the guided logits over 1,024 fine buckets collapse (docs/benchmarks.md).
    "ar_prior": dict(guidance_scale=1.5),
    # DDPM: the decoder lost R-precision under DPM-Solver++ (0.88 at 15 steps against 0.94). 25 steps
    # drew the right shapes more often than 10 (0.59 against 0.50) or 50; guidance 5 lost shape
    # (0.29), 2 relation (0.87) (docs/benchmarks.md, "Shapes demo quality").
    "decoder": dict(num_steps=25, sampler="ddpm", guidance_scale=3.0),
    "sr1": dict(num_steps=3, sampler="ddim"),
    "sr2": dict(num_steps=3, sampler="ddim"),
}
AR_CODES = 32  # PCA dimensions the AR prior keeps of the CLIP's 64 (docs/benchmarks.md)
VOCABULARY = ("a red green blue yellow purple circle square triangle left right of above below").split()


def get_config(arg: str = "clip") -> ml_collections.ConfigDict:
  a = common.parse_arg(arg, common.STAGES, tiny=False)
  stage, tiny = a.stage, a.tiny
  c = common.base_config(stage)
  c.data = common.data_config("shapes")  # or --config.data.kind=folder|embeddings --config.data.path=...
  if stage in ("prior", "ar_prior", "decoder"):  # they read the CLIP the first stage exports
    c.clip_dir = "runs/shapes/clip/export"
  if stage == "clip":
    c.model = ml_collections.ConfigDict(dict(
        vocabulary=list(VOCABULARY), max_length=16, image_size=32 if tiny else 64, patch_size=8,
        text_width=32 if tiny else 128, text_layers=2 if tiny else 4, text_heads=2 if tiny else 4,
        vision_width=32 if tiny else 128, vision_layers=2 if tiny else 4, vision_heads=2 if tiny else 4,
        embed_dim=16 if tiny else 64))
    c.resolution = c.model.image_size
    c.optim.update(learning_rate=1e-3 if tiny else 5e-4, weight_decay=0.1, warmup_steps=0 if tiny else 200)
    # Each scene's twin (objects swapped, or one word changed; data/shapes.py twin) joins the batch, so a
    # step sees 2 x batch_size pairs. Without twins the CLIP embeds "above" and "below" alike
    # (docs/benchmarks.md); the two-way term makes each example beat its own twin.
    c.twins, c.twin_loss_weight = True, 2.0
  elif stage == "prior":
    # Latent and token shapes come from the CLIP; these size the Transformer.
    c.model = ml_collections.ConfigDict(dict(width=32 if tiny else 256, num_layers=2 if tiny else 4,
                                             num_heads=2 if tiny else 8))
    c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000))
    c.p_uncond = 0.1
    c.resolution = 32 if tiny else 64
    c.stats_batches = 1 if tiny else 8
    c.optim.update(learning_rate=1e-3 if tiny else 3e-4, warmup_steps=0 if tiny else 200)
  elif stage == "ar_prior":
    # The CLIP's 64-dimensional z_i as NUM_CODES PCA codes of 1,024 buckets (the paper: 319 of 1,024
    # dimensions); a Transformer small enough to ship beside the diffusion prior (~1M parameters).
    c.model = ml_collections.ConfigDict(dict(num_codes=8 if tiny else AR_CODES, num_buckets=64 if tiny else 1024,
                                             num_dot_buckets=8 if tiny else 32, width=32 if tiny else 128,
                                             num_layers=2 if tiny else 4, num_heads=2 if tiny else 4,
                                             dropout=0.0))
    c.p_uncond = 0.1
    c.resolution = 32 if tiny else 64
    c.stats_batches = 2 if tiny else 16
    c.optim.update(learning_rate=1e-3 if tiny else 3e-4, warmup_steps=0 if tiny else 200)
  elif stage == "decoder":
    # 16 px images from z_i and the caption; CLIP sees the data at its own resolution.
    c.resolution = 32 if tiny else 64
    c.decoder_resolution = 16
    c.model = ml_collections.ConfigDict(dict(
        block_channels=(32, 32) if tiny else (48, 96, 96), layers_per_block=1,
        attention_levels=(False, True) if tiny else (False, True, True), mid_attention=True,
        head_dim=16 if tiny else 32, context_dim=32 if tiny else 96, norm_groups=8 if tiny else 16,
        dropout=0.0, extra_tokens=4))
    c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine", num_timesteps=1000,
                                                 variance_type="learned_range"))
    c.p_drop_image, c.p_drop_text = 0.1, 0.5
    # Min-SNR-gamma weighting (Hang et al. 2023) of the eps loss, so that the low-noise steps, which only
    # polish pixels, stop dominating the gradient. With batch 32 it took the decoder's relation from 0.755
    # to 0.90 and its background speckle from 14% to 0.6%; its 16 px shape fell, 0.785 -> 0.67
    # (docs/benchmarks.md, "Where shape is lost").
    c.min_snr_gamma = 5.0
    c.sample_steps, c.guidance_scale = (4 if tiny else 25), 3.0
    c.optim.update(learning_rate=1e-3 if tiny else 3e-4, warmup_steps=0 if tiny else 200)
  elif stage in ("sr1", "sr2"):
    # A two-stage cascade, 16 -> 32 (blurred conditioning) -> 64 (BSR-degraded conditioning).
    c.low_res_resolution = 16 if stage == "sr1" else 32
    c.resolution = 2 * c.low_res_resolution
    c.augmentation = "blur" if stage == "sr1" else "bsr"
    # The paper trains on quarter-size crops of 1024 px images; crops of 8-16 px starve these small
    # U-Nets of context and do not transfer to the full image, so sr1 trains on whole 32 px images
    # and sr2 on half-size (32 px) crops of its 64 px images.
    c.crop_fraction = 1.0 if stage == "sr1" else 0.5
    c.model = ml_collections.ConfigDict(dict(
        block_channels=(16, 32) if tiny else (32, 64, 64), layers_per_block=1 if tiny else 2,
        attention_levels=(False, False) if tiny else (False, False, False), mid_attention=False,
        norm_groups=8 if tiny else 16, dropout=0.0 if tiny else 0.1))
    # v-prediction: with eps, short runs learn to ignore the low-res image at high noise
    # (unclip_jax/stages/upsampler.py), and the samples come out as noise.
    c.diffusion = ml_collections.ConfigDict(dict(schedule="cosine" if stage == "sr1" else "linear",
                                                 num_timesteps=1000, prediction_type="v"))
    c.sample_steps, c.sampler = (4 if tiny else 27 if stage == "sr1" else 15), "ddim"
    c.optim.update(learning_rate=1e-3 if tiny else 3e-4, warmup_steps=0 if tiny else 200)
  else:
    raise ValueError(f"Unknown stage {stage!r} for configs/shapes.py.")
  # Steps sized so that each stage trains in about 100 minutes at most on a 2-core CPU, data-parallel over
  # its cores (docs/training.md). The decoder's batch and steps are what the demo's quality hangs on.
  c.batch_size = 8 if tiny else BATCH_SIZE[stage]
  c.total_steps = 2 if tiny else TOTAL_STEPS[stage]
  c.ema_decay = 0.999  # these runs are a few thousand steps; the paper's 0.9999 would barely move
  c.optim.decay = "constant" if tiny else "cosine"
  c.log_every = 1 if tiny else 50
  c.checkpoint_every = 2 if tiny else 500
  return c
