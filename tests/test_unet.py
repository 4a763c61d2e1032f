"""The U-Nets against diffusers: tiny random Karlo-shaped decoder (+ text
projection) and upsampler, saved as safetensors, converted, run on the same
inputs; converter errors; bf16 and remat options."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from unclip_jax.convert import diffusers_unet  # noqa: E402
from unclip_jax.convert.common import ConversionError  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402

CLIP_DIM = 16
TEXT_LEN = 5


def _randomize(module, seed):
  """Perturbs every parameter so zero-initialised ones (the null embedding,
  norms' biases) also carry signal."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return module.eval()


def _tiny_decoder(encoder_hid_dim=None):
  from diffusers import UNet2DConditionModel
  from diffusers.pipelines.unclip.text_proj import UnCLIPTextProjModel

  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      sample_size=16, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=16,
      class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8,
      encoder_hid_dim=encoder_hid_dim)
  proj = UnCLIPTextProjModel(clip_extra_context_tokens=4, clip_embeddings_dim=CLIP_DIM, time_embed_dim=128,
                             cross_attention_dim=encoder_hid_dim or 24)
  return _randomize(unet, 1), _randomize(proj, 2)


def _tiny_sr():
  from diffusers import UNet2DModel

  torch.manual_seed(0)
  unet = UNet2DModel(
      sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
      down_block_types=("ResnetDownsampleBlock2D",) * 2, up_block_types=("ResnetUpsampleBlock2D",) * 2,
      add_attention=False, norm_num_groups=8)
  return _randomize(unet, 3)


def _save(tmp_path, **models):
  for name, model in models.items():
    model.save_pretrained(os.path.join(tmp_path, name), safe_serialization=True)
  return [os.path.join(tmp_path, name) for name in models]


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


@pytest.mark.parametrize("encoder_hid_dim", [None, 20])
def test_decoder_with_text_proj_matches_diffusers(tmp_path, encoder_hid_dim):
  unet, proj = _tiny_decoder(encoder_hid_dim)
  unet_dir, proj_dir = _save(tmp_path, decoder=unet, text_proj=proj)
  cfg, params = diffusers_unet.load_diffusers_unet(unet_dir, proj_dir)
  assert cfg.attention_levels == (False, True) and cfg.scale_shift and cfg.out_channels == 6
  assert cfg.text_proj.extra_tokens == 4 and cfg.encoder_hid_dim == encoder_hid_dim

  rng = np.random.RandomState(0)
  b = 2  # images; the guided batch is [null z_i x b, z_i x b] as in UnCLIPPipeline
  z_i = rng.randn(b, CLIP_DIM).astype(np.float32)
  z_t = rng.randn(2 * b, CLIP_DIM).astype(np.float32)  # [uncond (empty prompt), cond]
  tokens = rng.randn(2 * b, TEXT_LEN, CLIP_DIM).astype(np.float32)
  mask = np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], bool)
  x = rng.randn(2 * b, 16, 16, 3).astype(np.float32)
  t = np.array([3, 999, 500, 10])

  with torch.no_grad():
    ctx, time_add = proj(image_embeddings=torch.from_numpy(z_i), prompt_embeds=torch.from_numpy(z_t),
                         text_encoder_hidden_states=torch.from_numpy(tokens), do_classifier_free_guidance=True)
    dec_mask = torch.nn.functional.pad(torch.from_numpy(mask), (4, 0), value=True)
    want = unet(sample=_nchw(x), timestep=torch.from_numpy(t), encoder_hidden_states=ctx,
                class_labels=time_add, attention_mask=dec_mask).sample.numpy().transpose(0, 2, 3, 1)

  image_embed = np.concatenate([rng.randn(b, CLIP_DIM).astype(np.float32), z_i])  # first half replaced
  drop = np.array([True] * b + [False] * b)
  got = unet_lib.UNet(cfg).apply({"params": params}, x, t, image_embed=image_embed, text_embed=z_t,
                                 text_tokens=tokens, text_mask=mask, drop_image=drop)
  assert got.shape == (2 * b, 16, 16, 6)
  assert np.abs(np.asarray(got) - want).max() < 1e-4
  assert np.abs(want).max() > 0.1  # the comparison is not between two near-zero tensors


def test_upsampler_matches_diffusers_pipeline_inputs(tmp_path):
  sr = _tiny_sr()
  (sr_dir,) = _save(tmp_path, super_res_first=sr)
  cfg, params = diffusers_unet.load_diffusers_unet(sr_dir)
  assert (cfg.in_channels, cfg.low_res_channels, cfg.out_channels) == (3, 3, 3)
  assert not cfg.scale_shift and not any(cfg.attention_levels) and not cfg.mid_attention

  rng = np.random.RandomState(1)
  small = np.clip(rng.randn(2, 8, 8, 3), -1, 1).astype(np.float32)
  x = rng.randn(2, 16, 16, 3).astype(np.float32)
  t = np.array([7, 900])
  with torch.no_grad():
    # What UnCLIPPipeline does before each super-res step.
    up = torch.nn.functional.interpolate(_nchw(small), size=[16, 16], mode="bicubic", align_corners=False,
                                         antialias=True)
    want = sr(sample=torch.cat([_nchw(x), up], 1), timestep=torch.from_numpy(t)).sample.numpy()
  got = unet_lib.UNet(cfg).apply({"params": params}, x, t, low_res=small)
  assert np.abs(np.asarray(got) - want.transpose(0, 2, 3, 1)).max() < 1e-4


def test_resize_low_res_matches_torch_bicubic():
  small = np.random.RandomState(2).randn(1, 5, 7, 3).astype(np.float32)
  want = torch.nn.functional.interpolate(_nchw(small), size=[20, 28], mode="bicubic", align_corners=False,
                                         antialias=True).numpy().transpose(0, 2, 3, 1)
  got = unet_lib.resize_low_res(jnp.asarray(small), (20, 28))
  assert np.abs(np.asarray(got) - want).max() < 1e-5


def test_converter_names_dropped_and_misshaped_tensors():
  sr = _tiny_sr()
  state = {k: v.numpy() for k, v in sr.state_dict().items()}
  cfg = diffusers_unet.config_from_diffusers(dict(sr.config))
  params = diffusers_unet.convert_state_dicts(cfg, state)  # the clean dict converts
  assert params["conv_in"]["kernel"].shape == (3, 3, 6, 32)
  del state["down_blocks.0.resnets.0.conv1.weight"]
  state["up_blocks.1.resnets.0.time_emb_proj.weight"] = np.zeros((7, 128), np.float32)
  state["extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ConversionError) as err:
    diffusers_unet.convert_state_dicts(cfg, state, source="tiny SR")
  msg = str(err.value)
  assert "missing tensor 'down_blocks.0.resnets.0.conv1.weight'" in msg
  assert "up_blocks_1/resnets_0/time_emb_proj/kernel: checkpoint shape (128, 7)" in msg
  assert "unused tensor 'extra.weight'" in msg


def test_config_from_diffusers_rejects_unsupported_options():
  base = dict(_class_name="UNet2DModel", in_channels=6, out_channels=3, block_out_channels=[32, 64],
              down_block_types=["ResnetDownsampleBlock2D"] * 2, up_block_types=["ResnetUpsampleBlock2D"] * 2,
              add_attention=False, norm_num_groups=8)
  assert diffusers_unet.config_from_diffusers(base).low_res_channels == 3
  with pytest.raises(ConversionError, match="add_attention"):
    diffusers_unet.config_from_diffusers(dict(base, add_attention=True))
  with pytest.raises(ConversionError, match="DownBlock2D"):
    diffusers_unet.config_from_diffusers(dict(base, down_block_types=["DownBlock2D"] * 2))
  with pytest.raises(ConversionError, match="resnet_out_scale_factor"):
    diffusers_unet.config_from_diffusers(dict(base, resnet_out_scale_factor=2.0))


def test_karlo_configs_from_diffusers_json_equal_the_named_configs():
  # config.json values of Karlo's decoder / text_proj / super_res_{first,last} folders (diffusers' defaults omitted).
  decoder_json = dict(
      _class_name="UNet2DConditionModel", sample_size=64, layers_per_block=3, in_channels=3, out_channels=6,
      down_block_types=["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
      up_block_types=["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=[320, 640, 960, 1280],
      cross_attention_dim=1536, class_embed_type="identity", attention_head_dim=64,
      resnet_time_scale_shift="scale_shift")
  text_proj_json = dict(clip_extra_context_tokens=4, clip_embeddings_dim=768, time_embed_dim=1280,
                        cross_attention_dim=1536)
  sr_json = dict(_class_name="UNet2DModel", sample_size=256, layers_per_block=3, in_channels=6, out_channels=3,
                 down_block_types=["ResnetDownsampleBlock2D"] * 4, up_block_types=["ResnetUpsampleBlock2D"] * 4,
                 block_out_channels=[320, 640, 960, 1280], add_attention=False)
  assert diffusers_unet.config_from_diffusers(decoder_json, text_proj_json) == unet_lib.karlo_decoder()
  assert diffusers_unet.config_from_diffusers(sr_json) == unet_lib.karlo_super_res()
  with pytest.raises(ConversionError, match="time_embed_dim"):
    diffusers_unet.config_from_diffusers(decoder_json, dict(text_proj_json, time_embed_dim=1024))


def _tiny_decoder_config(**kw):
  return unet_lib.UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                             mid_attention=True, head_dim=16, out_channels=6, context_dim=24, norm_groups=8,
                             text_proj=unet_lib.TextProjConfig(clip_dim=CLIP_DIM), **kw)


def _decoder_inputs(b=2, size=16):
  rng = np.random.RandomState(3)
  return (rng.randn(b, size, size, 3).astype(np.float32), np.array([5, 700])[:b],
          dict(image_embed=rng.randn(b, CLIP_DIM).astype(np.float32),
               text_embed=rng.randn(b, CLIP_DIM).astype(np.float32),
               text_tokens=rng.randn(b, TEXT_LEN, CLIP_DIM).astype(np.float32),
               text_mask=np.array([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], bool)[:b]))


@pytest.fixture(scope="module")
def tiny_params():
  """One init for the tests below (compiling an init costs ~10 s on 2 cores)."""
  return unet_lib.init_params(_tiny_decoder_config(), jax.random.PRNGKey(0))


def test_bf16_compute_stays_close_to_fp32(tiny_params):
  cfg = _tiny_decoder_config()
  params = tiny_params
  # Make the zero-initialised params (null embedding, biases, norm shifts) non-trivial too.
  noise = np.random.RandomState(1)
  params = jax.tree.map(lambda p: p + 0.05 * noise.randn(*p.shape).astype(np.float32), params)
  x, t, kw = _decoder_inputs()
  run = lambda c: jax.jit(lambda p: unet_lib.UNet(c).apply({"params": p}, x, t, **kw))(params)
  f32 = run(cfg)
  bf16 = run(dataclasses.replace(cfg, dtype="bfloat16"))
  assert bf16.dtype == jnp.float32  # outputs are returned in float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  # Tolerance: bf16 has an 8-bit mantissa (~0.4% per op); through ~20 layers we
  # accept 5% of the output scale at worst and 1% on average.
  scale = float(jnp.abs(f32).max())
  err = jnp.abs(bf16 - f32)
  assert float(err.max()) < 0.05 * scale, (float(err.max()), scale)
  assert float(err.mean()) < 0.01 * scale
  assert not np.allclose(np.asarray(bf16), np.asarray(f32), atol=1e-6)  # bf16 really was used


def test_remat_gives_identical_outputs_and_gradients(tiny_params):
  cfg = _tiny_decoder_config()
  params = tiny_params
  x, t, kw = _decoder_inputs()

  def loss(p, c):
    return jnp.mean(unet_lib.UNet(c).apply({"params": p}, x, t, **kw) ** 2)

  plain, g_plain = jax.jit(jax.value_and_grad(lambda p: loss(p, cfg)))(params)
  remat, g_remat = jax.jit(jax.value_and_grad(lambda p: loss(p, dataclasses.replace(cfg, remat=True))))(params)
  np.testing.assert_allclose(remat, plain, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_plain), jax.tree.leaves(g_remat)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(g_plain["text_proj"]["clip_image_embeddings_project_to_time_embeddings"]["kernel"]).max()) > 0


def test_drop_image_uses_learned_null_and_bad_inputs_raise(tiny_params):
  cfg = _tiny_decoder_config()
  params = dict(tiny_params, text_proj=dict(tiny_params["text_proj"]))
  params["text_proj"]["learned_classifier_free_guidance_embeddings"] = jnp.arange(CLIP_DIM) / CLIP_DIM
  x, t, kw = _decoder_inputs()
  model = unet_lib.UNet(cfg)
  dropped = model.apply({"params": params}, x, t, drop_image=np.array([True, False]), **kw)
  null_kw = dict(kw, image_embed=np.stack([np.arange(CLIP_DIM) / CLIP_DIM, kw["image_embed"][1]]))
  explicit = model.apply({"params": params}, x, t, **null_kw)
  np.testing.assert_allclose(dropped, explicit, atol=1e-6)
  plain = model.apply({"params": params}, x, t, **kw)
  assert np.abs(np.asarray(plain[0] - dropped[0])).max() > 1e-3
  np.testing.assert_allclose(plain[1], dropped[1], atol=1e-6)

  with pytest.raises(ValueError, match="divisible by 2"):
    model.apply({"params": params}, x[:, :15, :15], t, **kw)
  with pytest.raises(ValueError, match="NHWC"):
    model.apply({"params": params}, x.transpose(0, 3, 1, 2), t, **kw)
  with pytest.raises(ValueError, match="needs image_embed"):
    model.apply({"params": params}, x, t, **dict(kw, image_embed=None))
  with pytest.raises(ValueError, match="not divisible by norm_groups"):
    unet_lib.UNetConfig(block_channels=(30,), attention_levels=(False,), mid_attention=False).validate()


def test_named_configs_have_the_papers_shapes():
  n = {name: sum(x.size for x in jax.tree.leaves(unet_lib.param_shapes(f())))
       for name, f in unet_lib.CONFIGS.items()}
  # Karlo: decoder ~900M, each SR U-Net ~700M; paper: 64->256 700M, 256->1024 300M.
  assert 0.85e9 < n["karlo_decoder"] < 0.95e9
  assert 0.65e9 < n["karlo_super_res"] < 0.75e9
  assert 0.65e9 < n["paper_sr_64_256"] < 0.75e9
  assert 0.25e9 < n["paper_sr_256_1024"] < 0.32e9
  # The paper's 3.5B decoder: the 2.25B U-Net with GLIDE's text transformer (24 x 2048, ~1.2B), within 5%.
  assert abs(n["paper_decoder"] / 3.5e9 - 1) < 0.05, n["paper_decoder"]
  assert 2.2e9 < sum(x.size for x in jax.tree.leaves(unet_lib.param_shapes(unet_lib.paper_decoder(text_encoder=None))))
  assert unet_lib.paper_decoder().block_channels == (512, 1024, 1536, 2048)
  assert unet_lib.paper_sr_256_1024().block_channels == (192, 192, 384, 384, 768, 768)


def test_a_decoder_with_its_own_text_encoder_reads_the_captions_tokens_and_not_padding():
  """config.text_encoder (GLIDE's transformer): the output follows the caption's token ids, but not the
  ids at padded positions (their learned padding embedding stands in), and takes no CLIP token encodings;
  the text transformer's parameters get gradients through the context and the time embedding."""
  encoder = unet_lib.TextEncoderConfig(vocab_size=50, num_tokens=TEXT_LEN, width=24, num_layers=2, num_heads=2)
  cfg = _tiny_decoder_config(text_encoder=encoder)
  params = unet_lib.init_params(cfg, jax.random.PRNGKey(0))
  x, t, kw = _decoder_inputs()
  ids = np.array([[3, 7, 0, 0, 0], [4, 9, 11, 2, 5]], np.int32)
  kw = dict(image_embed=kw["image_embed"], text_ids=ids, text_mask=kw["text_mask"])
  run = jax.jit(lambda p, ids: unet_lib.UNet(cfg).apply({"params": p}, x, t, **dict(kw, text_ids=ids)))
  base = run(params, ids)
  np.testing.assert_allclose(run(params, ids.copy() + np.array([[0, 0, 5, 6, 7], [0] * 5])), base, atol=1e-6)
  changed = run(params, ids + np.array([[1, 0, 0, 0, 0], [0] * 5]))
  assert np.abs(np.asarray(changed[0] - base[0])).max() > 1e-4
  np.testing.assert_allclose(changed[1], base[1], atol=1e-6)
  assert "text_encoder" in params and "encoder_hidden_states_proj" not in params["text_proj"]
  grads = jax.grad(lambda p: jnp.mean(run(p, ids) ** 2))(params)
  for name in ("token_embedding", "final_ln"):
    assert float(max(jnp.abs(g).max() for g in jax.tree.leaves(grads["text_encoder"][name]))) > 0
  assert float(jnp.abs(grads["text_proj"]["transformer_proj"]["kernel"]).max()) > 0
  with pytest.raises(ValueError, match="needs text_ids"):
    unet_lib.UNet(cfg).apply({"params": params}, x, t, image_embed=kw["image_embed"], text_mask=kw["text_mask"])
