"""Conditioning augmentation: blur vs SciPy, random-sigma blur, BSR determinism and strength."""

import dataclasses

import bsr_reference
import jax
import numpy as np
import pytest
import scipy.ndimage as ndi

from unclip_jax.data import degradations as deg


def natural_image(seed: int, size: int = 128) -> np.ndarray:
  """Procedural 'natural-ish' image [size, size, 3] in [0, 1]: gradients, shapes, texture."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 1.5) * xx + rng.uniform() * yy) + rng.uniform(0, 6))
                  for _ in range(3)], axis=-1)
  for _ in range(6):  # discs
    cy, cx = rng.uniform(0, 1, 2)
    r = rng.uniform(0.05, 0.25)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
  for _ in range(4):  # rectangles
    y0, x0 = rng.integers(0, size, 2)
    h, w = rng.integers(size // 8, size // 3, 2)
    img[y0:y0 + h, x0:x0 + w] = rng.uniform(0, 1, 3)
  texture = deg.resize(rng.standard_normal((size // 4, size // 4, 3)).astype(np.float32), size, "bicubic")
  return np.clip(img + 0.05 * texture, 0, 1).astype(np.float32)


def psnr(a, b) -> float:
  return float(10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)))


def scipy_blur(images, sigma, kernel_size, mode="reflect"):
  """Reference: scipy's Gaussian filter over H and W with the same number of taps."""
  return ndi.gaussian_filter(np.asarray(images, np.float64), sigma, mode=mode, radius=kernel_size // 2,
                             axes=(-3, -2))


def reference_bsr(image, seed, out_size, cfg=None):
  """The BSR chain written plainly (tests/bsr_reference.py): direct 2-D correlation in float64, PIL
  per channel, the same draws. bsr_degrade computes the same thing planar with a float32 FFT,
  in-place ops and fewer clips."""
  def correlate(x, k):
    return np.stack([ndi.correlate(x[..., c].astype(np.float64), k, mode="reflect")
                     for c in range(x.shape[-1])], -1).astype(np.float32)
  return bsr_reference.plain_bsr(image, seed, out_size, cfg, filter2d=correlate)


# ----------------------------------------------------------------------------
# Gaussian blur (JAX).
# ----------------------------------------------------------------------------


def test_kernel_taps_match_paper_blur():
  taps = np.asarray(deg.gaussian_kernel_1d(0.6, 3))
  expected = np.exp(-0.5 * (np.array([-1.0, 0.0, 1.0]) / 0.6) ** 2)
  np.testing.assert_allclose(taps, expected / expected.sum(), atol=1e-7)
  assert taps[1] == pytest.approx(0.6672, abs=1e-4)  # a mild blur: two thirds of the mass stays on the centre
  with pytest.raises(ValueError):
    deg.gaussian_kernel_1d(0.6, 4)


@pytest.mark.parametrize("kernel_size,sigma", [(3, 0.6), (5, 1.3)])
def test_blur_matches_scipy(kernel_size, sigma):
  images = np.random.default_rng(0).uniform(-1, 1, (3, 17, 20, 3)).astype(np.float32)  # [N, H, W, C]
  blur = jax.jit(deg.gaussian_blur, static_argnames="kernel_size")
  out = np.asarray(blur(images, sigma, kernel_size=kernel_size))
  assert out.shape == images.shape and out.dtype == np.float32
  np.testing.assert_allclose(out, scipy_blur(images, sigma, kernel_size), atol=1e-5)
  # Unbatched [H, W, C] gives the same as its batch row.
  np.testing.assert_allclose(np.asarray(deg.gaussian_blur(images[1], sigma, kernel_size)), out[1], atol=1e-6)


def test_kernel3_blur_is_also_edge_padding():
  # The documented claim: with one pixel of padding, symmetric and edge padding coincide.
  images = np.random.default_rng(1).uniform(-1, 1, (2, 9, 11, 3)).astype(np.float32)
  out = np.asarray(deg.gaussian_blur(images))
  np.testing.assert_allclose(out, scipy_blur(images, 0.6, 3, mode="nearest"), atol=1e-5)


def test_blur_keeps_constants_and_range():
  const = np.full((2, 8, 8, 3), -0.7, np.float32)
  np.testing.assert_allclose(np.asarray(deg.gaussian_blur(const)), const, atol=1e-6)
  images = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  out = np.asarray(deg.gaussian_blur(images))
  assert out.min() >= -1 and out.max() <= 1
  assert np.std(out) < np.std(images)  # white noise loses variance under blur


def test_per_image_sigmas_match_scipy_per_image():
  images = np.random.default_rng(3).uniform(-1, 1, (3, 12, 10, 2)).astype(np.float32)
  sigmas = np.array([0.3, 0.6, 1.1], np.float32)
  out = np.asarray(deg.gaussian_blur(images, sigmas))
  for i, s in enumerate(sigmas):
    np.testing.assert_allclose(out[i], scipy_blur(images[i], float(s), 3), atol=1e-5)


def test_random_sigma_blur():
  images = np.random.default_rng(4).uniform(-1, 1, (16, 10, 10, 3)).astype(np.float32)
  key = jax.random.key(0)
  fn = jax.jit(deg.random_gaussian_blur, static_argnames=("sigma_range", "kernel_size"))
  out, sigmas = fn(key, images, sigma_range=(0.4, 0.8))
  out, sigmas = np.asarray(out), np.asarray(sigmas)
  assert sigmas.shape == (16,)
  assert np.all(sigmas >= 0.4) and np.all(sigmas <= 0.8)
  assert np.ptp(sigmas) > 0.1  # really one sigma per image, not a shared one
  for i in range(len(images)):
    np.testing.assert_allclose(out[i], scipy_blur(images[i], float(sigmas[i]), 3), atol=1e-5)
  # Same key -> same result; another key -> other sigmas.
  out2, sigmas2 = fn(key, images, sigma_range=(0.4, 0.8))
  np.testing.assert_array_equal(np.asarray(out2), out)
  _, sigmas3 = fn(jax.random.key(1), images, sigma_range=(0.4, 0.8))
  assert not np.allclose(np.asarray(sigmas3), sigmas)
  # A point range is the fixed blur.
  point, point_sigmas = fn(key, images, sigma_range=(0.6, 0.6))
  np.testing.assert_array_equal(np.asarray(point_sigmas), np.float32(0.6))
  np.testing.assert_allclose(np.asarray(point), np.asarray(deg.gaussian_blur(images, 0.6)), atol=1e-7)


def test_numpy_taps_match_jax_taps():
  for sigma, k in [(0.6, 3), (0.4, 3), (1.3, 5), (0.0, 3), (2.0, 9)]:
    np.testing.assert_allclose(deg.gaussian_taps_np(sigma, k), np.asarray(deg.gaussian_kernel_1d(sigma, k)), atol=1e-7)


def test_per_example_keys_give_batch_independent_sigmas():
  # One key per example (e.g. fold_in(key, example index)): an example's blur does not depend on its batch.
  images = np.random.default_rng(8).uniform(-1, 1, (6, 10, 10, 3)).astype(np.float32)
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(0), i))(np.arange(6))
  fn = jax.jit(deg.random_gaussian_blur, static_argnames=("sigma_range", "kernel_size"))
  out, sigmas = fn(keys, images)
  sub_out, sub_sigmas = fn(keys[2:5], images[2:5])
  np.testing.assert_array_equal(np.asarray(sub_sigmas), np.asarray(sigmas)[2:5])
  np.testing.assert_allclose(np.asarray(sub_out), np.asarray(out)[2:5], atol=1e-7)
  assert float(sigmas[0]) == float(jax.random.uniform(keys[0], (), minval=0.4, maxval=0.8))
  raw = jax.random.split(jax.random.PRNGKey(0), 6)  # legacy uint32 keys [6, 2]
  assert fn(raw, images)[1].shape == (6,)
  with pytest.raises(ValueError):
    deg.random_gaussian_blur(keys[:3], images)


def test_numpy_blur_twin_matches_jax_blur():
  image = np.random.default_rng(5).uniform(0, 1, (13, 15, 3)).astype(np.float32)
  np.testing.assert_allclose(deg.blur_np(image, 0.6, 3), np.asarray(deg.gaussian_blur(image)), atol=1e-6)
  np.testing.assert_allclose(deg.blur_np(image, 0.9, 5), scipy_blur(image, 0.9, 5), atol=1e-6)


# ----------------------------------------------------------------------------
# BSR building blocks.
# ----------------------------------------------------------------------------


def test_anisotropic_kernel_orientation():
  k = deg.gaussian_kernel_2d(2.0, 0.5, 0.0, 9)
  assert k.sum() == pytest.approx(1.0)
  assert k[4, 0] > k[0, 4]  # long axis horizontal (x)
  np.testing.assert_allclose(deg.gaussian_kernel_2d(2.0, 0.5, np.pi / 2, 9), k.T, atol=1e-12)
  np.testing.assert_allclose(deg.gaussian_kernel_2d(1.0, 1.0, 0.7, 9), deg.gaussian_kernel_2d(1.0, 1.0, 0.0, 9),
                             atol=1e-12)


def test_fft_filter_matches_scipy_correlate():
  image = np.random.default_rng(6).uniform(0, 1, (23, 31, 3))
  kernel = deg.gaussian_kernel_2d(2.5, 0.8, 0.6, 13)
  out = deg.filter2d(image, kernel)
  ref = np.stack([ndi.correlate(image[..., c], kernel, mode="reflect") for c in range(3)], -1)
  np.testing.assert_allclose(out, ref, atol=1e-10)  # float64 in: the FFT runs in float64


@pytest.mark.parametrize("shape,sigmas", [((97, 130, 3), (3.0, 1.0, 0.6)), ((61, 77, 3), (0.3, 0.3, 0.0)),
                                          ((45, 52, 1), (1.4, 0.4, 2.2))])
def test_float32_fft_filter_equals_direct_correlation(shape, sigmas):
  # The speed path: float32 FFT over lengths padded up to 5-smooth sizes (97 + 20 -> 120, 61 + 2 -> 64, ...)
  # must equal the direct 2-D correlation in float64, with symmetric borders, to 1e-5 on [0, 1] images.
  image = np.random.default_rng(7).uniform(0, 1, shape).astype(np.float32)
  sx, sy, theta = sigmas
  kernel = deg.gaussian_kernel_2d(sx, sy, theta, min(2 * int(np.ceil(3 * max(sx, sy))) + 1, 21))
  out = deg.filter2d(image, kernel.astype(np.float32))
  assert out.shape == shape and out.dtype == np.float32
  ref = np.stack([ndi.correlate(image[..., c].astype(np.float64), kernel, mode="reflect") for c in range(shape[-1])],
                 -1)
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_jpeg_round_trip_loses_more_at_low_quality():
  image = natural_image(0, 64)
  hi, lo = deg.jpeg(image, 95), deg.jpeg(image, 10)
  assert hi.shape == image.shape and hi.dtype == np.float32
  assert psnr(hi, image) > psnr(lo, image) + 5
  assert psnr(lo, image) < 35
  grey = deg.jpeg(image[..., :1], 50)
  assert grey.shape == (64, 64, 1)


# ----------------------------------------------------------------------------
# BSR degradation.
# ----------------------------------------------------------------------------


def test_bsr_deterministic_per_seed():
  image = np.round(natural_image(1) * 255).astype(np.uint8)
  a = deg.bsr_degrade(image, 123, 32)
  b = deg.bsr_degrade(image, 123, 32)
  assert a.tobytes() == b.tobytes()
  outs = [deg.bsr_degrade(image, s, 32).tobytes() for s in range(5)]
  assert len(set(outs)) == 5
  # Tuple seeds (base seed, example index) are deterministic too.
  assert deg.bsr_degrade(image, (7, 3), 32).tobytes() == deg.bsr_degrade(image, (7, 3), 32).tobytes()
  assert deg.bsr_degrade(image, (7, 3), 32).tobytes() != deg.bsr_degrade(image, (7, 4), 32).tobytes()
  # A Generator is consumed: the same Generator gives a new draw on the next call.
  gen = np.random.default_rng(0)
  assert deg.bsr_degrade(image, gen, 32).tobytes() != deg.bsr_degrade(image, gen, 32).tobytes()
  with pytest.raises(ValueError):
    deg.bsr_degrade(image, None, 32)


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_bsr_shape_dtype_range(dtype):
  image = natural_image(2, 96)
  if dtype == np.uint8:
    image = np.round(image * 255).astype(np.uint8)
  for seed in range(4):
    out = deg.bsr_degrade(image, seed, (24, 20))
    assert out.shape == (24, 20, 3) and out.dtype == dtype
    if dtype == np.float32:
      assert out.min() >= 0.0 and out.max() <= 1.0
    # Not a blank or saturated image: the content survives.
    assert np.std(out.astype(np.float64)) > 0.05 * (255 if dtype == np.uint8 else 1)
  grey = deg.bsr_degrade(image[..., :1], 0, 24)
  assert grey.shape == (24, 24, 1)


def test_bsr_degrades_within_band():
  # 4x degradation, upsampled back with bicubic: worse than a plain bicubic round trip,
  # but still recognisably the same image.
  for img_seed in range(3):
    image = natural_image(img_seed, 128)
    plain = deg.resize(deg.resize(image, 32, "bicubic"), 128, "bicubic")
    plain_psnr = psnr(plain, image)
    for seed in range(6):
      back = deg.resize(deg.bsr_degrade(image, 100 * img_seed + seed, 32), 128, "bicubic")
      p = psnr(back, image)
      assert 15.0 < p < 35.0, (img_seed, seed, p)
      assert p < plain_psnr - 0.5, (img_seed, seed, p, plain_psnr)


def test_bsr_equals_the_plain_reference_chain():
  # Same seed, same draws: the planar float32-FFT chain computes what the plain HWC chain with direct
  # float64 correlation computes. Without JPEG to 1e-5; with JPEG a rounding flip before the codec
  # could move a block, so allow a few differing values (none seen at these sizes).
  nojpeg = dataclasses.replace(deg.BSRConfig(), jpeg_prob=(0.0, 0.0))
  diffs = []
  for seed in range(6):
    image = natural_image(seed % 3, 128)
    np.testing.assert_allclose(deg.bsr_degrade(image, seed, 32, nojpeg), reference_bsr(image, seed, 32, nojpeg),
                               atol=1e-5)
    image = np.round(image * 255).astype(np.uint8)
    diffs.append(np.abs(deg.bsr_degrade(image, seed, 32).astype(int) - reference_bsr(image, seed, 32).astype(int)))
  diffs = np.stack(diffs)
  assert np.mean(diffs > 0) < 0.01 and np.mean(diffs) < 0.05, (np.mean(diffs > 0), diffs.max())


def test_host_path_leaves_input_alone_and_uses_no_jax(monkeypatch):
  # Data workers call make_low_res: it must not touch the caller's array (the chain works in place)
  # nor start a JAX backend (the trainer owns the accelerator).
  image = natural_image(6, 64)[..., :1].copy()  # [H, W, 1]: its [C, H, W] transpose is a contiguous view
  before = image.copy()

  class NoJax:
    def __getattr__(self, name):
      raise AssertionError(f"host path used jax ({name})")

  monkeypatch.setattr(deg, "jax", NoJax())
  monkeypatch.setattr(deg, "jnp", NoJax())
  deg.make_low_res(image, "bsr", 16, seed=0)
  deg.make_low_res(image, "blur", 16, seed=0, blur_sigma_range=(0.4, 0.8))
  deg.make_low_res(image, "none", 16)
  np.testing.assert_array_equal(image, before)


def test_bsr_with_every_op_off_is_a_plain_resize():
  # The structure check: with all degradations disabled, BSR reduces to the final resize.
  off = dataclasses.replace(deg.BSRConfig(), blur_prob=(0.0, 0.0), noise_prob=(0.0, 0.0), jpeg_prob=(0.0, 0.0),
                            resize_probs=(0.0, 0.0, 1.0), resize_methods=("bicubic",))
  image = natural_image(3, 64)
  np.testing.assert_allclose(deg.bsr_degrade(image, 0, 16, off), deg.make_low_res(image, "none", 16), atol=1e-6)


def test_bsr_noise_and_jpeg_alone_degrade_at_low_res():
  # Each op class does something: noise-only and JPEG-only chains both move the low-res image.
  base = dict(blur_prob=(0.0, 0.0), noise_prob=(0.0, 0.0), jpeg_prob=(0.0, 0.0), resize_probs=(0.0, 0.0, 1.0),
              resize_methods=("bicubic",))
  image = natural_image(4, 64)
  clean = deg.make_low_res(image, "none", 32)
  for extra in (dict(noise_prob=(1.0, 1.0)), dict(jpeg_prob=(1.0, 1.0)), dict(blur_prob=(1.0, 1.0))):
    cfg = dataclasses.replace(deg.BSRConfig(), **{**base, **extra})
    out = deg.bsr_degrade(image, 0, 32, cfg)
    assert psnr(out, clean) < 45, extra


# ----------------------------------------------------------------------------
# Per-stage helper.
# ----------------------------------------------------------------------------


def test_make_low_res_per_stage():
  image = np.round(natural_image(5, 64) * 255).astype(np.uint8)
  none = deg.make_low_res(image, "none", 16)
  assert none.shape == (16, 16, 3) and none.dtype == np.uint8
  # sr1 -> blur: the resize followed by the paper's blur.
  blur = deg.make_low_res(image, "sr1", 16)
  ref = np.round(np.clip(deg.blur_np(deg.resize(image.astype(np.float32) / 255, 16)), 0, 1) * 255)
  np.testing.assert_array_equal(blur, ref.astype(np.uint8))
  assert np.abs(blur.astype(int) - none.astype(int)).max() > 0
  # Random-sigma blur is seeded.
  r1 = deg.make_low_res(image, "blur", 16, seed=3, blur_sigma_range=(0.4, 0.8))
  assert r1.tobytes() == deg.make_low_res(image, "blur", 16, seed=3, blur_sigma_range=(0.4, 0.8)).tobytes()
  # sr2 -> BSR with the same seed.
  assert deg.make_low_res(image, "sr2", 16, seed=9).tobytes() == deg.bsr_degrade(image, 9, 16).tobytes()
  batch = deg.make_low_res_batch(np.stack([image, image]), "bsr", 16, seeds=[1, 2])
  assert batch.shape == (2, 16, 16, 3) and batch[0].tobytes() != batch[1].tobytes()
  with pytest.raises(ValueError):
    deg.make_low_res(image, "sharpen", 16)
