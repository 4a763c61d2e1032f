"""benchmarks/vs_diffusers.py's "bench" model is Karlo's architecture with fewer channels and layers:
its diffusers configs carry Karlo's block types and options (diffusers'
scripts/convert_kakao_brain_unclip_to_diffusers.py), and our converter maps every
tensor of its saved prior, decoder + text_proj and upsampler (4 levels x 3 layers,
which the tiny parity model does not reach) and reads them as Karlo's configs up
to the widths."""

import dataclasses

import pytest

pytest.importorskip("torch")
pytest.importorskip("diffusers")

import random_karlo  # noqa: E402

from unclip_jax.convert import diffusers_prior, diffusers_unet  # noqa: E402
from unclip_jax.models import prior as prior_lib  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402

# Karlo's structural settings (DECODER_CONFIG, SUPER_RES_UNET_FIRST_STEPS_CONFIG, PRIOR_CONFIG = defaults).
KARLO = {
    "decoder": {"sample_size": 64, "layers_per_block": 3, "in_channels": 3, "out_channels": 6,
                "down_block_types": ("ResnetDownsampleBlock2D",) + ("SimpleCrossAttnDownBlock2D",) * 3,
                "up_block_types": ("SimpleCrossAttnUpBlock2D",) * 3 + ("ResnetUpsampleBlock2D",),
                "mid_block_type": "UNetMidBlock2DSimpleCrossAttn", "class_embed_type": "identity",
                "attention_head_dim": 64, "resnet_time_scale_shift": "scale_shift", "norm_num_groups": 32},
    "super_res_first": {"sample_size": 256, "layers_per_block": 3, "in_channels": 6, "out_channels": 3,
                        "down_block_types": ("ResnetDownsampleBlock2D",) * 4,
                        "up_block_types": ("ResnetUpsampleBlock2D",) * 4, "add_attention": False,
                        "resnet_time_scale_shift": "default", "norm_num_groups": 32},
    "prior": {"attention_head_dim": 64, "num_embeddings": 77, "additional_embeddings": 4},
}


@pytest.mark.slow  # Karlo parity: builds and converts the bench-size diffusers models
def test_bench_model_is_karlos_scaled_down(tmp_path):
  size = random_karlo.SIZES["bench"]
  parts = random_karlo.components(str(tmp_path), "bench")
  for name, want in KARLO.items():
    got = {k: tuple(v) if isinstance(v, list) else v for k, v in parts[name].config.items() if k in want}
    assert got == want, name
  for channels in (size.decoder_channels, size.sr_channels):  # Karlo's (320, 640, 960, 1280) ratios
    assert [c / channels[0] for c in channels] == [1, 2, 3, 4]

  folder = lambda name: str(tmp_path / name)
  for name in ("prior", "decoder", "text_proj", "super_res_first"):
    parts[name].save_pretrained(folder(name), safe_serialization=True)
  # Each load raises a ConversionError naming any missing, unused or mis-shaped tensor.
  decoder, _ = diffusers_unet.load_diffusers_unet(folder("decoder"), folder("text_proj"))
  text_proj = dataclasses.replace(unet_lib.karlo_decoder().text_proj, clip_dim=size.clip_width)
  assert decoder == unet_lib.karlo_decoder(block_channels=size.decoder_channels, context_dim=size.context_dim,
                                           text_proj=text_proj)
  sr, _ = diffusers_unet.load_diffusers_unet(folder("super_res_first"))
  assert sr == unet_lib.karlo_super_res(block_channels=size.sr_channels)
  prior, _ = diffusers_prior.load_diffusers_prior(folder("prior"))
  assert prior == dataclasses.replace(
      prior_lib.karlo_config(), clip_dim=size.clip_width, text_width=size.clip_width,
      width=size.prior_heads * size.prior_head_dim, num_layers=size.prior_layers, num_heads=size.prior_heads)
