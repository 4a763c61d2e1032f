"""Decoder and upsampler stages: conditioning drops, crops, and overfitting a
fixed tiny batch with the paper's optimiser (the loss must fall below 30% of
its start, measured on fixed timesteps and noise)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unclip_jax import optim, training
from unclip_jax.diffusion import gaussian, samplers
from unclip_jax.diffusion.schedules import make_schedule
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import decoder, upsampler

CLIP_DIM, TEXT_LEN, TEXT_W = 8, 4, 8


def _decoder_cfg():
  return unet_lib.UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, True),
                             mid_attention=True, head_dim=16, out_channels=6, context_dim=16, norm_groups=8,
                             text_proj=unet_lib.TextProjConfig(clip_dim=CLIP_DIM, text_dim=TEXT_W))


def _sr_cfg():
  return unet_lib.UNetConfig(block_channels=(32, 64), layers_per_block=1, attention_levels=(False, False),
                             mid_attention=False, low_res_channels=3, out_channels=3, norm_groups=8,
                             scale_shift=True)


@pytest.fixture(scope="module")
def decoder_params():
  return unet_lib.init_params(_decoder_cfg(), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def sr_params():
  return unet_lib.init_params(_sr_cfg(), jax.random.PRNGKey(0))


def _images(b, size, seed=0):
  """Smooth, distinct images in [-1, 1]."""
  yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
  rng = np.random.RandomState(seed)
  out = []
  for _ in range(b):
    f = rng.uniform(1, 3, 3)
    ph = rng.uniform(0, 6, 3)
    out.append(np.stack([np.sin(f[c] * (xx + yy) * 2 + ph[c]) * 0.8 for c in range(3)], -1))
  return np.asarray(out, np.float32)


def _decoder_batch(b=2):
  rng = np.random.RandomState(1)
  batch = dict(image=_images(b, 16), z_i=rng.randn(b, CLIP_DIM).astype(np.float32),
               z_t=rng.randn(b, CLIP_DIM).astype(np.float32),
               tokens=rng.randn(b, TEXT_LEN, TEXT_W).astype(np.float32),
               mask=np.array([[1, 1, 0, 0], [1, 1, 1, 0]], bool)[:b])
  uncond = dict(z_t=rng.randn(1, CLIP_DIM).astype(np.float32),
                tokens=rng.randn(1, TEXT_LEN, TEXT_W).astype(np.float32),
                mask=np.array([[1, 0, 0, 0]], bool))
  return batch, uncond


def test_drop_conditioning_rates_and_values():
  b = 4000
  batch = dict(image=np.zeros((b, 1, 1, 3), np.float32), z_i=np.ones((b, 2), np.float32),
               z_t=np.ones((b, 2), np.float32), tokens=np.ones((b, 3, 2), np.float32), mask=np.ones((b, 3), bool),
               ids=np.full((b, 3), 7, np.int32))
  uncond = dict(z_t=np.full((1, 2), -1.0, np.float32), tokens=np.full((1, 3, 2), -1.0, np.float32),
                mask=np.array([[True, False, False]]), ids=np.array([[1, 2, 0]], np.int32))
  with pytest.raises(ValueError, match="uncond has no 'ids'"):
    decoder.drop_conditioning(jax.random.PRNGKey(0), batch, {k: v for k, v in uncond.items() if k != "ids"})
  out = decoder.drop_conditioning(jax.random.PRNGKey(0), batch, uncond)
  dropped_text = np.asarray(out["z_t"][:, 0] < 0)
  assert abs(np.asarray(out["drop_image"]).mean() - 0.1) < 0.02
  assert abs(dropped_text.mean() - 0.5) < 0.03
  # All text fields switch together, to exactly the empty prompt's encodings.
  np.testing.assert_array_equal(np.asarray(out["tokens"][dropped_text]), -1.0)
  np.testing.assert_array_equal(np.asarray(out["mask"][dropped_text]), [[True, False, False]] * dropped_text.sum())
  np.testing.assert_array_equal(np.asarray(out["tokens"][~dropped_text]), 1.0)
  np.testing.assert_array_equal(np.asarray(out["ids"][dropped_text]), [[1, 2, 0]] * dropped_text.sum())
  np.testing.assert_array_equal(np.asarray(out["ids"][~dropped_text]), 7)
  # Image and text drops are independent draws.
  assert abs(np.mean(np.asarray(out["drop_image"])[dropped_text]) - 0.1) < 0.03


def _fixed_eval(loss_fn, n=8):
  """Mean loss over n fixed (t, noise) draws."""
  keys = jax.random.split(jax.random.PRNGKey(123), n)
  return lambda params: jnp.mean(jax.vmap(lambda k: loss_fn(params, k))(keys))


def test_decoder_overfits_tiny_batch(decoder_params):
  cfg = _decoder_cfg()
  schedule = make_schedule("cosine", 1000)
  batch, uncond = _decoder_batch()
  opt = optim.paper_adamw("decoder", learning_rate=2e-3)
  state = training.init_state(lambda rng: decoder_params, opt, jax.random.PRNGKey(7))
  loss = functools.partial(decoder.training_loss, cfg=cfg, schedule=schedule, uncond=uncond)
  step = jax.jit(training.make_train_step(loss, opt, ema_decay=0.9999))
  cond_batch = dict(batch, drop_image=np.zeros(2, bool))
  evaluate = jax.jit(_fixed_eval(lambda p, k: decoder.loss_fn(p, cfg, schedule, cond_batch, k, train=False)[0]))
  start = float(evaluate(state.params))
  for _ in range(80):
    state, metrics = step(state, batch)
  end = float(evaluate(state.params))
  assert int(state.step) == 80 and "vlb" in metrics and np.isfinite(float(metrics["loss"]))
  assert end < 0.3 * start, (start, end)


def test_random_crop_pair_takes_the_same_window():
  img = jnp.arange(2 * 8 * 8 * 1, dtype=jnp.float32).reshape(2, 8, 8, 1)
  a, b = upsampler.random_crop_pair(jax.random.PRNGKey(0), img, img * 10, 4)
  assert a.shape == (2, 4, 4, 1)
  np.testing.assert_array_equal(np.asarray(b), np.asarray(a) * 10)
  for k in range(2):  # each crop is a contiguous window of its own image
    y, x = np.argwhere(np.asarray(img[k, ..., 0]) == float(a[k, 0, 0, 0]))[0]
    np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(img[k, y:y + 4, x:x + 4]))


def test_upsampler_overfits_tiny_batch_on_quarter_crops(sr_params):
  cfg = _sr_cfg()
  schedule = make_schedule("cosine", 1000)
  image = _images(2, 32, seed=3)
  low_res = np.asarray(jax.image.resize(image, (2, 8, 8, 3), "bicubic"))
  opt = optim.paper_adamw("sr1", learning_rate=2e-3)
  state = training.init_state(lambda rng: sr_params, opt, jax.random.PRNGKey(5))
  seen = []

  def degrade(rng, x):  # records the shape the degradation sees (the whole low-res image)
    seen.append(x.shape)
    return x + 0.01 * jax.random.normal(rng, x.shape)

  loss = functools.partial(upsampler.training_loss, cfg=cfg, schedule=schedule, crop_fraction=0.25,
                           degrade=degrade)
  step = jax.jit(training.make_train_step(loss, opt, ema_decay=0.9999))
  low_up = unet_lib.resize_low_res(jnp.asarray(low_res), (32, 32))
  evaluate = jax.jit(_fixed_eval(lambda p, k: upsampler.loss_fn(p, cfg, schedule, image, low_up, k,
                                                                train=False)[0]))
  start = float(evaluate(state.params))  # measured at full size
  for _ in range(80):
    state, metrics = step(state, dict(image=image, low_res=low_res))
  end = float(evaluate(state.params))
  assert seen == [(2, 8, 8, 3)]
  assert end < 0.3 * start, (start, end)


@pytest.mark.parametrize("prediction_type", ["eps", "v"])
def test_upsampler_loss_regresses_the_configured_target(sr_params, prediction_type):
  """The loss is the MSE to eps, or to v = sqrt(abar) eps - sqrt(1 - abar) x0, at the drawn t."""
  cfg, schedule = _sr_cfg(), make_schedule("cosine", 1000)
  image, low_up = jnp.asarray(_images(2, 16, seed=1)), jnp.asarray(_images(2, 16, seed=2))
  rng = jax.random.PRNGKey(4)
  loss, _ = upsampler.loss_fn(sr_params, cfg, schedule, image, low_up, rng, prediction_type=prediction_type)
  k_t, k_noise, _ = jax.random.split(rng, 3)  # loss_fn's own draws
  i = jax.random.randint(k_t, (2,), 0, 1000)
  noise = jax.random.normal(k_noise, image.shape)
  x_t = gaussian.q_sample(schedule, image, i, noise)
  out = unet_lib.UNet(cfg).apply({"params": sr_params}, x_t, schedule.timesteps[i], low_res=low_up)
  a = schedule.sqrt_alphas_cumprod[i][:, None, None, None]
  s = schedule.sqrt_one_minus_alphas_cumprod[i][:, None, None, None]
  target = noise if prediction_type == "eps" else a * noise - s * image
  np.testing.assert_allclose(float(loss), float(jnp.mean((out - target) ** 2)), rtol=1e-5)


def test_decoder_sample_with_unit_guidance_is_the_conditional_chain(decoder_params):
  cfg = _decoder_cfg()
  params = decoder_params
  batch, uncond = _decoder_batch()
  cond = {k: batch[k] for k in decoder.COND_KEYS}
  schedule = make_schedule("cosine", 1000, num_steps=3)
  rng = jax.random.PRNGKey(2)
  # One guidance scale per sample: 1 for the first (must equal the plain
  # conditional chain, same noise), 8 for the second (must not).
  guided = decoder.sample(params, cfg, schedule, rng, cond, uncond, guidance_scale=jnp.array([1.0, 8.0]), size=8)
  model = unet_lib.UNet(cfg)
  plain = samplers.sample(lambda x, t: model.apply({"params": params}, x, t, **decoder.unet_inputs(cond, cfg)),
                          schedule, rng, shape=(2, 8, 8, 3), variance_type="learned_range")
  plain = np.clip(np.asarray(plain), -1, 1)
  np.testing.assert_allclose(np.asarray(guided[0]), plain[0], atol=1e-5)
  assert np.abs(np.asarray(guided[1]) - plain[1]).max() > 1e-3


def test_upsampler_sample_uses_last_params_only_for_the_final_step(sr_params):
  cfg = _sr_cfg()
  p_first = sr_params
  p_last = jax.tree.map(lambda p: p * 0.5 + 0.01, sr_params)  # a different weight set, same shapes
  low = _images(1, 4)
  sched = make_schedule("cosine", 1000, num_steps=2)
  rng = jax.random.PRNGKey(0)
  pair = upsampler.sample(p_first, cfg, sched, rng, low, size=16, params_last=p_last)
  assert pair.shape == (1, 16, 16, 3)
  # Two DDIM steps by hand: first model at the noisy step, last model at the final one.
  model = unet_lib.UNet(cfg)
  low_up = unet_lib.resize_low_res(jnp.asarray(low), (16, 16))
  x = jax.random.normal(jax.random.split(rng)[0], (1, 16, 16, 3))
  for i, p in ((1, p_first), (0, p_last)):
    t = jnp.full((1,), sched.timesteps[i])
    x, _ = samplers.ddim_step(sched, i, x, model.apply({"params": p}, x, t, low_res=low_up), jnp.zeros(()))
  np.testing.assert_allclose(np.asarray(pair), np.clip(np.asarray(x), -1, 1), atol=1e-5)
