"""Random diffusers UnCLIPPipeline components with Karlo's component types, at two sizes.

Test support, not library code: shared by tests/test_karlo_pipeline.py (parity with
the converted checkpoint), tests/test_vs_diffusers.py and benchmarks/vs_diffusers.py
(speed against diffusers, which puts tests/ on sys.path to import it), so all of them
exercise the same architecture. It needs torch, diffusers and transformers, as the
converter does.

- "tiny": two U-Net levels, 16 -> 32 px, every width 32 or 64: the parity tests.
- "bench": Karlo's block structure (diffusers' convert_kakao_brain_unclip_to_diffusers
  configs: 4 levels with ResnetDownsampleBlock2D then SimpleCrossAttn*Block2D,
  the SimpleCrossAttn mid block, 3 layers per block, 64-channel heads,
  scale-shift time conditioning, 32 norm groups; 64 px decoder, 64 -> 256
  upsampler without attention) with channels and Transformer layers scaled down
  (decoder /5, upsampler /10, prior 512 wide x 6 layers instead of 2048 x 20),
  so that a 2-core CPU runs a 25/25/7-step call in a minute or two.

Parameters are diffusers' initialisation plus Gaussian noise (zero-initialised
tensors such as the prior's embeddings and stats get signal too), so every
tensor matters to the output.
"""

import dataclasses
import os

import torch
from diffusers import PriorTransformer, UnCLIPScheduler, UNet2DConditionModel, UNet2DModel
from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from unclip_jax.stages import clip as clip_stage

WORDS = ["a", "red", "circle", "blue", "square", "above"]  # the prompts' vocabulary (word tokenizer)


@dataclasses.dataclass(frozen=True)
class Size:
  clip_width: int  # CLIP hidden = projection = the prior's and text projection's embedding width
  text_layers: int
  text_heads: int
  text_mlp: int
  prior_heads: int
  prior_head_dim: int
  prior_layers: int
  decoder_resolution: int
  decoder_channels: tuple
  decoder_layers: int
  head_dim: int  # the decoder's attention heads
  context_dim: int  # the decoder's cross-attention width
  sr_resolution: int
  sr_channels: tuple
  sr_layers: int
  norm_groups: int


SIZES = {
    "tiny": Size(clip_width=32, text_layers=2, text_heads=4, text_mlp=37, prior_heads=2, prior_head_dim=16,
                 prior_layers=2, decoder_resolution=16, decoder_channels=(32, 64), decoder_layers=1, head_dim=16,
                 context_dim=24, sr_resolution=32, sr_channels=(32, 64), sr_layers=1, norm_groups=8),
    # Karlo: CLIP 768 x 12 layers; prior 32 x 64 heads, 20 layers; decoder (320, 640, 960, 1280) x 3,
    # context 1536; upsampler (320, 640, 960, 1280) x 3.
    "bench": Size(clip_width=256, text_layers=4, text_heads=4, text_mlp=1024, prior_heads=8, prior_head_dim=64,
                  prior_layers=6, decoder_resolution=64, decoder_channels=(64, 128, 192, 256), decoder_layers=3,
                  head_dim=64, context_dim=384, sr_resolution=256, sr_channels=(32, 64, 96, 128), sr_layers=3,
                  norm_groups=32),
}


def randomize(module, seed: int, scale: float = 0.1):
  """module's parameters plus scale * N(0, 1) noise from its own generator; in eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(scale * torch.randn(p.shape, generator=gen))
  return module.eval()


def components(tmp: str, size: str = "tiny") -> dict:
  """UnCLIPPipeline(**components(...))'s arguments: CLIP text model with projection, word tokenizer
  (written under tmp/tok), PriorTransformer, UNet2DConditionModel decoder + UnCLIPTextProjModel,
  UNet2DModel super_res_first / super_res_last, and Karlo's three UnCLIPSchedulers."""
  s = SIZES[size]
  levels = len(s.decoder_channels)
  tokenizer = clip_stage.write_word_tokenizer(WORDS, os.path.join(tmp, "tok"))
  torch.manual_seed(0)
  text_config = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=s.clip_width, projection_dim=s.clip_width,
                               intermediate_size=s.text_mlp, num_hidden_layers=s.text_layers,
                               num_attention_heads=s.text_heads, max_position_embeddings=77,
                               bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                               pad_token_id=tokenizer.pad_token_id)
  text_encoder = CLIPTextModelWithProjection(text_config).eval()
  prior = PriorTransformer(num_attention_heads=s.prior_heads, attention_head_dim=s.prior_head_dim,
                           num_layers=s.prior_layers, embedding_dim=s.clip_width, num_embeddings=77,
                           additional_embeddings=4)
  with torch.no_grad():  # zero-initialised embeddings and stats get signal too
    prior.positional_embedding.normal_(0, 0.3)
    prior.prd_embedding.normal_(0, 0.3)
    prior.clip_mean.normal_(0, 0.5)
    prior.clip_std.uniform_(0.5, 1.5)
  decoder = UNet2DConditionModel(
      sample_size=s.decoder_resolution, in_channels=3, out_channels=6, block_out_channels=s.decoder_channels,
      layers_per_block=s.decoder_layers,
      down_block_types=("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * (levels - 1),
      up_block_types=("SimpleCrossAttnUpBlock2D",) * (levels - 1) + ("ResnetUpsampleBlock2D",),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=s.context_dim,
      attention_head_dim=s.head_dim, class_embed_type="identity", resnet_time_scale_shift="scale_shift",
      norm_num_groups=s.norm_groups)
  text_proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=s.clip_width,
                                  time_embed_dim=4 * s.decoder_channels[0], cross_attention_dim=s.context_dim)

  def sr(seed):
    torch.manual_seed(seed)
    n = len(s.sr_channels)
    return randomize(UNet2DModel(
        sample_size=s.sr_resolution, in_channels=6, out_channels=3, block_out_channels=s.sr_channels,
        layers_per_block=s.sr_layers, down_block_types=("ResnetDownsampleBlock2D",) * n,
        up_block_types=("ResnetUpsampleBlock2D",) * n, add_attention=False, norm_num_groups=s.norm_groups), seed)

  return dict(
      text_encoder=randomize(text_encoder, 1, 0.02), tokenizer=tokenizer, prior=randomize(prior, 2, 0.02),
      decoder=randomize(decoder, 3), text_proj=randomize(text_proj, 4), super_res_first=sr(5),
      super_res_last=sr(6),
      prior_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="sample",
                                      clip_sample_range=5.0),
      decoder_scheduler=UnCLIPScheduler(variance_type="learned_range", prediction_type="epsilon"),
      super_res_scheduler=UnCLIPScheduler(variance_type="fixed_small_log", prediction_type="epsilon"))
