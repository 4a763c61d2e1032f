"""scan_layers: scanned and unscanned models agree through the layout converter (outputs,
gradients, Karlo's diffusers weights), the converter round-trips exactly, and the scanned
program is much smaller (what compile time follows).

Tolerances: the scanned program runs the same float32 ops in a loop, fused differently. Outputs
(of size ~1) agree to ~1e-6; we assert rtol = atol = 1e-5. Gradients agree to 1e-4 of each leaf's
largest entry (plus 1e-6 of the largest gradient overall, for leaves that are analytically ~0).
Programs are few and small (U-Nets on 8 x 8 images; the decoder's attention is "xla", one loop
fewer than CPU's default "blocked") and compiled without most XLA optimisations: compiling
dominates these tests.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax.convert import scan_layout
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(autouse=True, scope="module")
def _fast_compiles():
  """XLA's optimisation passes take most of these tiny programs' compile time (halving it on CPU);
  scanned and unscanned are compiled alike, and the torch comparisons hold either way."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _prior_cfg(**kw):
  return prior_lib.PriorConfig(**{**dict(clip_dim=8, text_width=12, num_text_tokens=6, width=32, num_layers=3,
                                         num_heads=2, dropout=0.1), **kw})


def _decoder_cfg(**kw):
  # Level 0's down layers are one run; level 1's are single (resnets_0 widens); the up blocks mix both.
  return unet_lib.UNetConfig(**{**dict(
      block_channels=(32, 64), layers_per_block=2, attention_levels=(False, True), context_dim=24, head_dim=16,
      norm_groups=8, out_channels=6, dropout=0.1, attention_impl="xla", text_proj=unet_lib.TextProjConfig(clip_dim=16)),
      **kw})


def _sr_cfg(**kw):
  # Equal widths: single down layers, whole up blocks as one run each.
  return unet_lib.UNetConfig(**{**dict(
      block_channels=(32, 32), layers_per_block=1, attention_levels=(False,) * 2, mid_attention=False,
      low_res_channels=3, norm_groups=8, scale_shift=False, dropout=0.1), **kw})


def _scanned(cfg):
  return dataclasses.replace(cfg, scan_layers=True)


def _random_params(shapes, seed):
  """numpy params for a tree of shapes: kernels ~ N(0, 1/fan_in), norm scales ~ 1, the rest small,
  so every tensor matters (and the converter works on the host, without a compile per shape)."""
  gen = np.random.default_rng(seed)

  def leaf(path, x):
    name = path[-1].key
    noise = gen.standard_normal(x.shape).astype(np.float32)
    if name == "kernel":
      return noise / np.float32(np.sqrt(np.prod(x.shape[:-1])))
    return noise * np.float32(0.1) + np.float32(1.0 if name in ("scale", "clip_std") else 0.0)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _prior_inputs(cfg, b=2):
  k = jax.random.split(jax.random.key(1), 4)
  mask = jnp.arange(cfg.num_text_tokens)[None] < jnp.array([[2], [6]])
  return (jax.random.normal(k[0], (b, cfg.clip_dim)), jnp.array([3, 900]), jax.random.normal(k[1], (b, cfg.clip_dim)),
          jax.random.normal(k[2], (b, cfg.num_text_tokens, cfg.text_width or cfg.clip_dim)), mask)


def _unet_inputs(cfg, b=2, size=8):
  x, _, kw = unet_lib.dummy_inputs(cfg, batch=b, size=size, text_len=3)
  keys = iter(jax.random.split(jax.random.key(2), 8))
  noise = lambda v: v if v.dtype == bool else jax.random.normal(next(keys), v.shape)
  return noise(x), jnp.array([5, 700]), {k: noise(v) for k, v in kw.items()}


def _prior_fn(cfg, train=False):
  def apply(params, stats):
    return prior_lib.DiffusionPrior(cfg).apply({"params": params, "stats": stats}, *_prior_inputs(cfg),
                                               deterministic=not train, rngs={"dropout": jax.random.key(3)})
  return apply


def _unet_fn(cfg, train=False):
  def apply(params):
    x, t, kw = _unet_inputs(cfg)
    return unet_lib.UNet(cfg).apply({"params": params}, x, t, train=train, rngs={"dropout": jax.random.key(3)},
                                    **kw)
  return apply


@functools.partial(jax.jit, static_argnums=0)
def _output_and_grads(fn, params, *rest):
  """fn's output and the gradient of its mean square, in one program."""
  loss = lambda p: (jnp.mean(jnp.square(fn(p, *rest))), fn(p, *rest))
  (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
  return out, grads


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_grads_close(want, got):
  assert jax.tree.structure(want) == jax.tree.structure(got)
  overall = max(float(np.abs(a).max()) for a in jax.tree.leaves(want))
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * float(np.abs(a).max()) + 1e-6 * overall)


def test_layer_runs_of_the_paper_decoder():
  runs = unet_lib.layer_runs(unet_lib.paper_decoder())
  assert runs["down_blocks_0"] == [(0, 3)]  # conv_in already has level 0's width
  assert runs["down_blocks_2"] == [(0, 1), (1, 3)]  # resnets_0 widens 1024 -> 1536
  assert runs["up_blocks_0"] == [(0, 3), (3, 4)]  # mid width = level 3's; the last skip is level 2's
  assert runs["up_blocks_3"] == [(0, 1), (1, 4)]  # the last skip is conv_in's, level 0's width
  assert unet_lib.layer_runs(_sr_cfg()) == {"down_blocks_0": [(0, 1)], "down_blocks_1": [(0, 1)],
                                            "up_blocks_0": [(0, 2)], "up_blocks_1": [(0, 2)]}


@pytest.mark.parametrize("kind", ["prior", "decoder", "sr"])
def test_scanned_model_matches_unscanned_through_the_converter(kind):
  """Same outputs (dropout off), exact round trips. Gradients: the prior's, with and without remat inside
  the scan, agree numerically; the U-Net's are JAX's transpose of the same scan (compiling them takes 3x
  the forward's time), so for the decoder (with remat) only their layout is checked, by tracing. The
  upsampler's layout (no attention, low-res input, whole up blocks as one run) is checked by the
  converter alone: its layers are the decoder's minus attention."""
  if kind == "prior":
    cfg = _prior_cfg()
    variables = jax.eval_shape(lambda: prior_lib.init_variables(cfg, jax.random.key(0)))
    plain, stats = _random_params(variables["params"], 0), _random_params(variables["stats"], 1)
    scanned_shapes = jax.eval_shape(lambda: prior_lib.init_variables(_scanned(cfg), jax.random.key(0)))["params"]
    fn, rest = _prior_fn, (stats,)
  else:
    cfg = _decoder_cfg() if kind == "decoder" else _sr_cfg()
    plain = _random_params(unet_lib.param_shapes(cfg), 0)
    scanned_shapes = unet_lib.param_shapes(_scanned(cfg))
    fn, rest = _unet_fn, ()
  stacked = scan_layout.to_scanned(plain, cfg)
  # The converted tree is exactly the one a scanned model initialises.
  shape_of = lambda t: jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), t)
  assert shape_of(stacked) == shape_of(scanned_shapes)
  assert scan_layout.is_scanned(stacked, cfg) and not scan_layout.is_scanned(plain, cfg)

  if kind == "decoder":
    want, got = jax.jit(fn(cfg))(plain), jax.jit(fn(_scanned(cfg)))(stacked)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.abs(np.asarray(want)).max() > 0.1
    remat = dataclasses.replace(_scanned(cfg), remat=True)
    grads = jax.eval_shape(jax.grad(lambda p: jnp.mean(fn(remat)(p) ** 2)), stacked)
    assert shape_of(grads) == shape_of(scanned_shapes)
  if kind == "prior":
    want, g_want = _output_and_grads(fn(cfg), plain, *rest)
    got, g_got = _output_and_grads(fn(_scanned(cfg)), stacked, *rest)
    np.testing.assert_allclose(got, want, **TOL)
    assert np.abs(np.asarray(want)).max() > 0.1
    _assert_grads_close(scan_layout.to_scanned(jax.tree.map(np.asarray, g_want), cfg), g_got)
    # remat inside the scan recomputes the same function
    got, g_got = _output_and_grads(fn(dataclasses.replace(_scanned(cfg), remat=True)), stacked, *rest)
    np.testing.assert_allclose(got, want, **TOL)
    _assert_grads_close(scan_layout.to_scanned(jax.tree.map(np.asarray, g_want), cfg), g_got)

  # Exact inverses, both ways; match_layout converts only when needed.
  _assert_trees_equal(scan_layout.to_unscanned(stacked, cfg), plain)
  _assert_trees_equal(scan_layout.to_scanned(scan_layout.to_unscanned(stacked, cfg), cfg), stacked)
  _assert_trees_equal(scan_layout.match_layout(plain, _scanned(cfg)), stacked)
  _assert_trees_equal(scan_layout.match_layout(stacked, cfg), plain)
  assert scan_layout.match_layout(stacked, _scanned(cfg)) is stacked
  with pytest.raises(ValueError, match="scanned"):
    scan_layout.to_unscanned(plain, cfg)


def test_scanned_dropout_is_on_in_training_only():
  """Dropout on: reproducible, and a different function from dropout off."""
  cfg = _scanned(_prior_cfg())
  shapes = jax.eval_shape(lambda: prior_lib.init_variables(cfg, jax.random.key(0)))
  params, stats = _random_params(shapes["params"], 0), _random_params(shapes["stats"], 1)
  train = jax.jit(_prior_fn(cfg, train=True))
  on = train(params, stats)
  np.testing.assert_array_equal(on, train(params, stats))
  assert np.abs(np.asarray(on - jax.jit(_prior_fn(cfg))(params, stats))).max() > 1e-3


def _hlo_lines(fn, *args) -> int:
  return len(jax.jit(fn).lower(*args).as_text().splitlines())


def test_scanned_program_does_not_grow_with_depth():
  """Lowered value_and_grad programs (what compile time follows): the unscanned one grows with
  every layer, the scanned one traces each run once whatever its length."""
  def prior_lines(c):
    variables = jax.eval_shape(lambda: prior_lib.init_variables(c, jax.random.key(0)))
    loss = lambda p: jnp.mean(_prior_fn(c)(p, variables["stats"]) ** 2)
    return _hlo_lines(jax.value_and_grad(loss), variables["params"])

  shallow, deep = _prior_cfg(num_layers=2, dropout=0.0), _prior_cfg(num_layers=8, dropout=0.0)
  plain = prior_lines(shallow), prior_lines(deep)
  scanned = prior_lines(_scanned(shallow)), prior_lines(_scanned(deep))
  assert scanned[1] == scanned[0] and plain[1] > 2.4 * plain[0], (plain, scanned)  # measured: 1403 -> 3521
  assert scanned[1] * 2.2 < plain[1], (plain, scanned)

  def unet_lines(c):
    loss = lambda p: jnp.mean(_unet_fn(c)(p) ** 2)
    return _hlo_lines(jax.value_and_grad(loss), unet_lib.param_shapes(c))

  # One attention level: its down and up blocks are one run each, beside the fixed mid block and text projection.
  unet_cfg = functools.partial(_decoder_cfg, block_channels=(32,), attention_levels=(True,), dropout=0.0)
  shallow, deep = unet_cfg(layers_per_block=2), unet_cfg(layers_per_block=5)
  plain = unet_lines(shallow), unet_lines(deep)
  scanned = unet_lines(_scanned(shallow)), unet_lines(_scanned(deep))
  # Stacking and unstacking the skips adds a line or two per layer; the layers themselves add none.
  # Measured: plain 4394 -> 7559 (+1055 a layer), scanned 4092 -> 4119.
  assert scanned[1] < 1.02 * scanned[0] and plain[1] > 1.6 * plain[0], (plain, scanned)
  assert scanned[1] * 1.6 < plain[1], (plain, scanned)


def test_stacked_paths_name_the_layer_axis():
  flat = jax.tree_util.tree_flatten_with_path(unet_lib.param_shapes(_scanned(_decoder_cfg())))[0]
  paths = [tuple(k.key for k in path) for path, _ in flat]
  stacked = [p for p in paths if scan_layout.is_stacked_path(p)]
  assert ("down_blocks_0", "layers_0_to_1", "resnets", "conv1", "kernel") in stacked
  assert ("up_blocks_0", "layers_0_to_1", "attentions", "to_q", "kernel") in stacked
  assert all(p[1].startswith("layers_") for p in stacked) and len(stacked) < len(paths)
  assert scan_layout.is_stacked_path(("blocks", "attn1", "to_q", "kernel"))
  # jax key paths, e.g. of an optimizer state over the params
  state = {"mu": {"blocks": {"kernel": 1}, "block_0": {"kernel": 2}}}
  marked = jax.tree_util.tree_map_with_path(lambda path, _: scan_layout.is_stacked_path(path), state)
  assert marked == {"mu": {"blocks": {"kernel": True}, "block_0": {"kernel": False}}}


def test_karlo_diffusers_weights_load_into_scanned_configs(tmp_path):
  """Karlo's path: diffusers weights (one module per layer) convert straight into scanned models:
  the U-Net's into exactly the stacked unscanned conversion, the prior's into a model that matches
  diffusers' own forward pass."""
  torch = pytest.importorskip("torch")
  from diffusers import PriorTransformer, UNet2DConditionModel

  from unclip_jax.convert import diffusers_prior, diffusers_unet

  def saved(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
      for p in module.parameters():
        p.add_(0.1 * torch.randn(p.shape, generator=gen))
    module.save_pretrained(str(tmp_path / str(seed)), safe_serialization=True)
    return module.eval(), str(tmp_path / str(seed))

  torch.manual_seed(0)
  # Karlo's block types with 2 layers per block, so that both down and up blocks have runs to scan.
  _, unet_dir = saved(UNet2DConditionModel(
      sample_size=8, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=2,
      down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
      up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
      mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=24, attention_head_dim=16,
      class_embed_type="identity", resnet_time_scale_shift="scale_shift", norm_num_groups=8), 1)
  cfg, params = diffusers_unet.load_diffusers_unet(unet_dir, scan_layers=True)
  assert cfg.scan_layers and scan_layout.is_scanned(params, cfg)
  assert "layers_0_to_1" in params["down_blocks_0"] and "layers_0_to_1" in params["up_blocks_0"]
  # Exactly the unscanned conversion (whose forward pass tests/test_unet.py checks against diffusers) in
  # the scanned layout, which the scanned model runs as the unscanned one (the "decoder" case above).
  plain_cfg, plain = diffusers_unet.load_diffusers_unet(unet_dir)
  assert dataclasses.replace(plain_cfg, scan_layers=True) == cfg
  _assert_trees_equal(params, scan_layout.to_scanned(plain, plain_cfg))

  prior, prior_dir = saved(PriorTransformer(num_attention_heads=2, attention_head_dim=16, num_layers=3,
                                            embedding_dim=8, num_embeddings=6, additional_embeddings=4), 2)
  pcfg, plain = diffusers_prior.load_diffusers_prior(prior_dir)
  scfg = _scanned(pcfg)
  stacked = diffusers_prior.convert_state_dict(diffusers_prior.load_safetensors(prior_dir), scfg)
  _assert_trees_equal(scan_layout.to_scanned(plain, pcfg), stacked)
  x_t, t, z_t, tokens, mask = _prior_inputs(pcfg)
  with torch.no_grad():
    want = prior(*(torch.from_numpy(np.array(a)) for a in (x_t, t, z_t, tokens, mask))).predicted_image_embedding
  got = jax.jit(prior_lib.DiffusionPrior(scfg).apply)(stacked, x_t, t, z_t, tokens, mask)
  np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-5)
