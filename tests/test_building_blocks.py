"""Shared pieces: timestep embedding, GroupNorm, attention, the tensor reader's errors, AdamW and EMA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding

from unclip_jax import optim
from unclip_jax.convert import common
from unclip_jax.models import layers


@pytest.mark.parametrize("dim,flip,shift", [(32, True, 0.0), (33, False, 1.0)])
def test_timestep_embedding_matches_diffusers(dim, flip, shift):
  t = np.array([0, 1, 17, 500, 999], np.float32)
  ours = layers.timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
  # sin/cos of arguments up to ~1000 rad: float32 range reduction differs by a few ulp of 1000.
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 64), 32), ((3, 5, 7, 12), 4), ((2, 9, 48), 16)])
def test_group_norm_matches_torch_and_flax(shape, groups):
  rng = np.random.default_rng(0)
  x = (rng.normal(size=shape) * 3 + 2).astype(np.float32)
  scale, bias = rng.normal(size=shape[-1]).astype(np.float32), rng.normal(size=shape[-1]).astype(np.float32)
  params = {"params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)}}
  ours = layers.GroupNorm(groups).apply(params, jnp.asarray(x))
  tgn = torch.nn.GroupNorm(groups, shape[-1], eps=1e-5)
  with torch.no_grad():
    tgn.weight.copy_(torch.from_numpy(scale))
    tgn.bias.copy_(torch.from_numpy(bias))
    ref = tgn(torch.from_numpy(np.moveaxis(x, -1, 1).copy())).numpy()
  np.testing.assert_allclose(np.asarray(ours), np.moveaxis(ref, 1, -1), rtol=0, atol=2e-5)
  # Gradients too (training): against flax's grouped-reshape GroupNorm.
  flax_gn = nn.GroupNorm(num_groups=groups, use_fast_variance=False)
  loss = lambda f: lambda p, x: jnp.sum(jnp.sin(f.apply(p, x)))
  g_ours = jax.grad(loss(layers.GroupNorm(groups)), argnums=(0, 1))(params, jnp.asarray(x))
  g_flax = jax.grad(loss(flax_gn), argnums=(0, 1))(params, jnp.asarray(x))
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_flax)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  assert layers.GroupNorm(groups, dtype=jnp.bfloat16).apply(params, jnp.asarray(x)).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="not divisible"):
    layers.GroupNorm(5).init(jax.random.PRNGKey(0), jnp.asarray(x))


@pytest.mark.parametrize("mask_kind", ["none", "keys", "per_query"])
def test_blocked_attention_equals_one_shot_softmax(mask_kind):
  """The CPU default splits queries into blocks; any block size gives the same attention."""
  b, t, s, n, d = 2, 96, 40, 3, 8
  q, k, v = (jax.random.normal(key, (b, length, n, d))
             for key, length in zip(jax.random.split(jax.random.PRNGKey(0), 3), (t, s, s)))
  masks = {"none": None,
           "keys": jnp.arange(s)[None, None, None, :] < jnp.array([s, 7])[:, None, None, None],  # [B, 1, 1, S]
           "per_query": jax.random.bernoulli(jax.random.PRNGKey(1), 0.7, (b, n, t, s)).at[..., 0].set(True)}
  mask = masks[mask_kind]
  ref = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  for block in (32, 64, 96, 256):  # 64 -> gcd 32; 256 -> one block of 96
    ours = layers.dot_product_attention(q, k, v, mask=mask, implementation="blocked", query_block=block)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=2e-6)
  if mask_kind == "keys":  # masked keys get no weight: changing their values changes nothing
    v2 = v.at[1, 7:].set(100.0)
    np.testing.assert_allclose(layers.dot_product_attention(q, k, v2, mask=mask, implementation="blocked"),
                               ref, rtol=0, atol=2e-6)
  grads = [jax.grad(lambda q, f=f: jnp.sum(jnp.sin(f(q))))(q) for f in (
      lambda q: layers.dot_product_attention(q, k, v, mask=mask, implementation="blocked", query_block=32),
      lambda q: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla"))]
  np.testing.assert_allclose(np.asarray(grads[0]), np.asarray(grads[1]), rtol=0, atol=1e-5)


def test_tensor_reader_names_every_problem():
  target = {"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}, "norm": {"scale": jnp.zeros(4)}}
  state = {"fc.weight": np.zeros((4, 5)), "fc.bias": np.zeros(4), "extra.weight": np.zeros(1)}
  reader = common.TensorReader(state, source="test.safetensors")
  reader.put(("dense", "kernel"), "fc.weight", common.linear)
  reader.put(("dense", "bias"), "fc.bias")
  reader.put(("norm", "scale"), "ln.weight")
  with pytest.raises(common.ConversionError) as err:
    reader.finish(target)
  msg = str(err.value)
  assert "test.safetensors" in msg
  assert "missing tensor 'ln.weight'" in msg
  assert "dense/kernel: checkpoint shape (5, 4), model expects (3, 4)" in msg
  assert "unused tensor 'extra.weight'" in msg
  assert "model parameter norm/scale was not filled" in msg


def test_tensor_reader_converts_layouts():
  w = np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2)  # torch conv [out, in, kh, kw]
  reader = common.TensorReader({"conv.weight": w, "fc.weight": np.ones((4, 3))})
  reader.put(("conv", "kernel"), "conv.weight", common.conv2d)
  reader.put(("fc", "kernel"), "fc.weight", common.linear)
  params = reader.finish({"conv": {"kernel": np.zeros((2, 2, 3, 2))}, "fc": {"kernel": np.zeros((3, 4))}})
  assert params["conv"]["kernel"][1, 0, 2, 1] == w[1, 2, 1, 0]


def test_paper_adamw_is_adamw_with_table_3_settings():
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.array([1.0, 1.0])}
  grads = {"w": jnp.array([[0.1, -0.2], [0.3, 0.05]]), "b": jnp.array([0.2, -0.1])}
  tx = optim.paper_adamw("prior", learning_rate=1e-2, grad_clip_norm=None)
  updates, _ = tx.update(grads, tx.init(params), params)
  hp = optim.PAPER_HPARAMS["prior"]
  for name, decay in (("w", hp["weight_decay"]), ("b", 0.0)):  # no decay on vectors
    g, p = grads[name], params[name]
    m, v = 0.1 * g / (1 - 0.9), (1 - hp["b2"]) * g ** 2 / (1 - hp["b2"])
    expected = -1e-2 * (m / (jnp.sqrt(v) + hp["eps"]) + decay * p)
    np.testing.assert_allclose(updates[name], expected, rtol=1e-5)


def test_global_norm_clipping_and_schedules():
  tx = optim.adamw(1.0, grad_clip_norm=0.5)
  state = tx.init({"w": jnp.zeros(2)})
  clipped, _ = tx.update({"w": jnp.array([3.0, 4.0])}, state, {"w": jnp.zeros(2)})
  assert np.all(np.isfinite(clipped["w"]))
  sched = optim.learning_rate_schedule(1.0, warmup_steps=10, decay="cosine", total_steps=110)
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)], [0, 0.5, 1, 0.5, 0],
                             atol=1e-6)
  with pytest.raises(ValueError, match="total_steps"):
    optim.learning_rate_schedule(1.0, decay="cosine")


def test_ema_update_closed_form():
  ema, params = {"w": jnp.zeros(3)}, {"w": jnp.ones(3)}
  for _ in range(10):
    ema = optim.ema_update(ema, params, 0.9)
  np.testing.assert_allclose(ema["w"], 1 - 0.9 ** 10, rtol=1e-6)


@pytest.mark.parametrize("stage,lr,b2,eps,batch", [("prior", 1.1e-4, 0.96, 1e-6, 4096),
                                                   ("decoder", 1.2e-4, 0.999, 1e-8, 2048),
                                                   ("sr1", 1.2e-4, 0.999, 1e-8, 1024),
                                                   ("sr2", 1.0e-4, 0.999, 1e-8, 512)])
def test_paper_configs_carry_table_3(stage, lr, b2, eps, batch):
  import dataclasses

  from configs import paper
  from unclip_jax.models import unet

  c = paper.get_config(stage)
  assert (c.optim.learning_rate, c.optim.b2, c.optim.eps, c.batch_size) == (lr, b2, eps, batch)
  assert c.diffusion.schedule == ("linear" if stage == "sr2" else "cosine")
  if stage != "prior":
    model = {k: v for k, v in c.model.to_dict().items() if k != "extra_tokens"}
    named = {"decoder": unet.paper_decoder, "sr1": unet.paper_sr_64_256, "sr2": unet.paper_sr_256_1024}[stage]()
    derived = {f: getattr(named, f) for f in ("in_channels", "out_channels", "low_res_channels", "text_proj")}
    assert dataclasses.replace(unet.UNetConfig.from_dict(model), **derived) == named
