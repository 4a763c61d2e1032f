"""Conditioning augmentation for the upsamplers (unCLIP paper, section on upsamplers).

The upsamplers are trained on a corrupted low-resolution image so that, at
sampling time, they tolerate the artifacts of the model below them:
  * 64 -> 256: Gaussian blur, kernel 3, sigma 0.6 ("blur").
  * 256 -> 1024: BSR degradation, a random second-order chain of blur, resize,
    noise and JPEG (Zhang et al. 2021; Wang et al. 2021) ("bsr").

Two layers:
  * `gaussian_blur` / `random_gaussian_blur`: JAX, batched, jit-able; for use on
    device inside a train step (images NHWC in any range, blur is linear).
  * `bsr_degrade` / `make_low_res`: NumPy + PIL + SciPy on the host (JPEG needs
    a real codec), pure functions of (image, seed, output size) and free of JAX,
    so data worker processes can call them per example. Images are HWC, uint8
    or float in [0, 1]; the output has the input's dtype and range.

All randomness is explicit: a jax PRNG key for the JAX functions, a seed (int,
tuple of ints, SeedSequence or np.random.Generator) for the host ones. See
docs/degradations.md for the parameter ranges and how to plug into tf.data.
"""

import dataclasses
import io
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft as sfft
from PIL import Image

# Which augmentation each upsampler stage uses in the paper.
PAPER_AUGMENTATION = {"sr1": "blur", "sr2": "bsr"}

PAPER_BLUR_SIGMA = 0.6
PAPER_BLUR_KERNEL_SIZE = 3
_MIN_SIGMA = 1e-3  # sigma -> 0 would divide by zero; 1e-3 already gives the identity kernel.


# ----------------------------------------------------------------------------
# Gaussian blur in JAX.
# ----------------------------------------------------------------------------


def gaussian_kernel_1d(sigma, kernel_size: int = PAPER_BLUR_KERNEL_SIZE):
  """Normalised, truncated Gaussian taps: sigma [...] -> [..., kernel_size].

  Same taps as scipy.ndimage.gaussian_filter with radius = kernel_size // 2.
  """
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
  x = jnp.arange(kernel_size, dtype=jnp.float32) - kernel_size // 2  # [K]
  sigma = jnp.maximum(jnp.asarray(sigma, jnp.float32), _MIN_SIGMA)[..., None]  # [..., 1]
  taps = jnp.exp(-0.5 * jnp.square(x / sigma))  # [..., K]
  return taps / jnp.sum(taps, axis=-1, keepdims=True)


def gaussian_blur(images, sigma=PAPER_BLUR_SIGMA, kernel_size: int = PAPER_BLUR_KERNEL_SIZE):
  """Separable Gaussian blur of [N, H, W, C] (or [H, W, C]) images.

  sigma is a scalar or one value per image [N]. Borders use half-sample
  symmetric padding (jnp.pad "symmetric" == scipy.ndimage mode "reflect":
  d c b a | a b c d); for kernel_size 3 this is also the same as edge padding.
  The blur is linear with taps summing to one, so any value range is kept.
  Jit with `static_argnames="kernel_size"`. Computes in float32 (or the input's
  wider float type) and returns the input's float dtype.
  """
  images = jnp.asarray(images)
  unbatched = images.ndim == 3
  if unbatched:
    images = images[None]
  if images.ndim != 4:
    raise ValueError(f"Expected [N, H, W, C] or [H, W, C] images, got shape {images.shape}.")
  out_dtype = images.dtype if jnp.issubdtype(images.dtype, jnp.floating) else jnp.float32
  x = images.astype(jnp.promote_types(out_dtype, jnp.float32))
  n, h, w, _ = x.shape
  sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), (n,))
  taps = gaussian_kernel_1d(sigma, kernel_size).astype(x.dtype)  # [N, K]
  r = kernel_size // 2
  x = jnp.pad(x, ((0, 0), (r, r), (r, r), (0, 0)), mode="symmetric")  # [N, H+2r, W+2r, C]
  # Rows then columns; K shifted slices beat a conv for K = 3 and keep per-image taps simple.
  x = sum(taps[:, i, None, None, None] * x[:, i:i + h] for i in range(kernel_size))  # [N, H, W+2r, C]
  x = sum(taps[:, i, None, None, None] * x[:, :, i:i + w] for i in range(kernel_size))  # [N, H, W, C]
  x = x.astype(out_dtype)
  return x[0] if unbatched else x


def _is_key_batch(rng) -> bool:
  """True for one key per example: typed keys [N], or legacy uint32 keys [N, 2]."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def sample_blur_sigmas(rng, num: int, sigma_range: tuple[float, float] = (0.4, 0.8)):
  """Per-image sigmas [num], uniform in [lo, hi] (a point range gives exactly lo).

  rng: one key for the batch, or one key per image ([num] typed or [num, 2] raw,
  e.g. fold_in(key, example_index)) so that an image's sigma does not depend on
  which batch it lands in.
  """
  lo, hi = sigma_range
  if not 0 <= lo <= hi:
    raise ValueError(f"sigma_range must satisfy 0 <= lo <= hi, got {sigma_range}.")
  rng = jnp.asarray(rng)
  if _is_key_batch(rng):
    if rng.shape[0] != num:
      raise ValueError(f"Need one key per image: {rng.shape[0]} keys for {num} images.")
    return jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32, minval=lo, maxval=hi))(rng)
  return jax.random.uniform(rng, (num,), jnp.float32, minval=lo, maxval=hi)


def random_gaussian_blur(rng, images, sigma_range: tuple[float, float] = (0.4, 0.8),
                         kernel_size: int = PAPER_BLUR_KERNEL_SIZE):
  """Blur each image of [N, H, W, C] with its own sigma ~ U(sigma_range).

  rng: one key, or one key per image (see `sample_blur_sigmas`).
  Returns (blurred [N, H, W, C], sigmas [N]). The default range is centred on
  the paper's 0.6 so the model also sees slightly sharper and blurrier inputs.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"Expected [N, H, W, C] images, got shape {images.shape}.")
  sigmas = sample_blur_sigmas(rng, images.shape[0], sigma_range)
  return gaussian_blur(images, sigmas, kernel_size), sigmas


# ----------------------------------------------------------------------------
# Host-side (NumPy / PIL / SciPy) helpers. No JAX here: data worker processes
# call these, and must not start a JAX backend (on a TPU host the chips belong
# to the trainer). The BSR chain keeps its image planar, float32 [C, H, W] in
# [0, 1]: PIL resizes contiguous planes and the FFT runs over the last two
# axes without per-op copies. The public helpers take and return [H, W, C].
# ----------------------------------------------------------------------------

_RESAMPLE = {
    "area": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


def _as_size(size) -> tuple[int, int]:
  if isinstance(size, (int, np.integer)):
    return int(size), int(size)
  h, w = size
  return int(h), int(w)


def _to_planar(image) -> tuple[np.ndarray, np.dtype]:
  """uint8 or float [0, 1] [H, W, C] -> (a new float32 [C, H, W] in [0, 1], original dtype).

  Always a copy (the chain works in place), clipped (the chain clips only after ops that can overshoot).
  """
  image = np.asarray(image)
  if image.ndim != 3:
    raise ValueError(f"Expected an [H, W, C] image, got shape {image.shape}.")
  if image.dtype != np.uint8 and not np.issubdtype(image.dtype, np.floating):
    raise TypeError(f"Expected uint8 or float images, got {image.dtype}.")
  x = image.transpose(2, 0, 1).astype(np.float32, order="C")  # [C, H, W]
  if image.dtype == np.uint8:
    return np.divide(x, 255.0, out=x), image.dtype
  return np.clip(x, 0.0, 1.0, out=x), image.dtype


def _from_planar(x: np.ndarray, dtype) -> np.ndarray:
  """float [C, H, W] -> clipped [H, W, C] of dtype (uint8 rounded from [0, 255])."""
  x = _to_u8(x) if dtype == np.uint8 else np.clip(x, 0.0, 1.0).astype(dtype)
  return np.ascontiguousarray(x.transpose(1, 2, 0))


def _resize_planar(x: np.ndarray, size, method: str) -> np.ndarray:
  """float [C, H, W] -> float32 [C, h, w], each plane in PIL float mode (no 8-bit rounding)."""
  h, w = size
  if x.shape[1:] == (h, w):
    return x
  resample = _RESAMPLE[method]
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(p, np.float32)).resize((w, h), resample))
                   for p in x])


def resize(x: np.ndarray, size, method: str = "bicubic") -> np.ndarray:
  """Resize float32 [H, W, C] -> [h, w, C] per channel in PIL float mode (no 8-bit rounding).

  PIL filters are antialiased when downscaling ("area" is a box filter).
  """
  h, w = _as_size(size)
  if x.shape[:2] == (h, w):
    return x
  return np.ascontiguousarray(_resize_planar(np.asarray(x).transpose(2, 0, 1), (h, w), method).transpose(1, 2, 0))


def gaussian_taps_np(sigma: float, kernel_size: int = PAPER_BLUR_KERNEL_SIZE) -> np.ndarray:
  """NumPy twin of `gaussian_kernel_1d` for one sigma -> float32 [K] (same float32 formula)."""
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}.")
  x = np.arange(kernel_size, dtype=np.float32) - np.float32(kernel_size // 2)  # [K]
  sigma = np.maximum(np.float32(sigma), np.float32(_MIN_SIGMA))
  taps = np.exp(np.float32(-0.5) * np.square(x / sigma))
  return taps / taps.sum(dtype=np.float32)


def _blur(x: np.ndarray, sigma: float, kernel_size: int, axes: tuple[int, int]) -> np.ndarray:
  """Separable kernel-K Gaussian over two axes of x, in float64; symmetric padding; x's dtype out."""
  taps = gaussian_taps_np(sigma, kernel_size).astype(np.float64)  # [K]
  r = kernel_size // 2
  pad = [(r, r) if a in axes else (0, 0) for a in range(x.ndim)]
  p = np.pad(x.astype(np.float64), pad, mode="symmetric")
  for axis in axes:
    n = x.shape[axis]
    p = sum(taps[i] * p.take(np.arange(i, i + n), axis=axis) for i in range(kernel_size))
  return p.astype(x.dtype)


def blur_np(x: np.ndarray, sigma: float = PAPER_BLUR_SIGMA, kernel_size: int = PAPER_BLUR_KERNEL_SIZE):
  """NumPy twin of `gaussian_blur` for one [H, W, C] image (same taps, same padding)."""
  return _blur(np.asarray(x), sigma, kernel_size, axes=(0, 1))


def gaussian_kernel_2d(sigma_x: float, sigma_y: float, theta: float, kernel_size: int) -> np.ndarray:
  """Anisotropic Gaussian [K, K] with std sigma_x along the direction theta, sigma_y across it."""
  r = kernel_size // 2
  yy, xx = np.mgrid[-r:r + 1, -r:r + 1].astype(np.float64)
  u = np.cos(theta) * xx + np.sin(theta) * yy
  v = -np.sin(theta) * xx + np.cos(theta) * yy
  k = np.exp(-0.5 * ((u / sigma_x) ** 2 + (v / sigma_y) ** 2))
  return k / k.sum()


def _filter_planar(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Filter float [C, H, W] with a point-symmetric odd [K, K] kernel; symmetric padding; via a real FFT.

  A direct 21x21 filter on a 1024^2 image is ~1.4 GFLOP per channel. SciPy's FFT
  keeps float32 in float32, and the transform length is padded up to a 5-smooth
  size: at the raw padded size (1024 + 2r, e.g. 1028 = 4 * 257) NumPy's FFT was
  2.5-6x slower.
  """
  r = kernel.shape[0] // 2
  _, h, w = x.shape
  p = np.pad(x, ((0, 0), (r, r), (r, r)), mode="symmetric")  # [C, H+2r, W+2r]
  shape = (sfft.next_fast_len(h + 2 * r, real=True), sfft.next_fast_len(w + 2 * r, real=True))
  spec = sfft.rfft2(p, s=shape, overwrite_x=True)  # [C, L0, L1 // 2 + 1]
  spec *= sfft.rfft2(np.asarray(kernel, p.dtype), s=shape)
  out = sfft.irfft2(spec, s=shape, overwrite_x=True)  # [C, L0, L1]
  # Circular convolution of length >= H + 2r: rows/cols >= 2r never wrap, and map to the original pixels.
  return np.ascontiguousarray(out[:, 2 * r:2 * r + h, 2 * r:2 * r + w], dtype=x.dtype)


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Filter float [H, W, C] with a point-symmetric [K, K] kernel; symmetric padding; via FFT."""
  x = np.asarray(x)
  return np.ascontiguousarray(_filter_planar(x.transpose(2, 0, 1), kernel).transpose(1, 2, 0))


def _to_u8(x: np.ndarray) -> np.ndarray:
  """float in [0, 1] (clipped here) -> uint8 rounded from [0, 255]; any layout."""
  y = np.clip(x, 0.0, 1.0)
  y *= 255.0
  return np.round(y, out=y).astype(np.uint8)


def _jpeg_planar(x: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip of float [C, H, W] in [0, 1] -> float32 [C, H, W] (RGB as one image, else per plane).

  Planes go in and out of PIL by merge / split: a NumPy transpose of uint8 HWC costs more than the codec.
  """
  u8 = _to_u8(x)  # [C, H, W]
  rgb = len(u8) == 3
  images = [Image.merge("RGB", [Image.fromarray(p) for p in u8])] if rgb else [Image.fromarray(p) for p in u8]
  planes = []
  for image in images:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    planes += [np.asarray(p) for p in Image.open(buf).split()]
  out = np.stack(planes).astype(np.float32)  # [C, H, W]
  return np.divide(out, 255.0, out=out)


def jpeg(x: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip through PIL (RGB with its default 4:2:0 chroma; other channel counts per channel)."""
  return np.ascontiguousarray(_jpeg_planar(np.asarray(x).transpose(2, 0, 1), quality).transpose(1, 2, 0))


# ----------------------------------------------------------------------------
# BSR degradation.
# ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BSRConfig:
  """Ranges of the second-order degradation; pairs are (first round, second round).

  Blur sigmas are in pixels of the image as it is when the blur runs. Resize
  factors are relative to the current size. See docs/degradations.md for why.
  """
  blur_prob: tuple[float, float] = (1.0, 0.8)
  blur_sigma: tuple[tuple[float, float], ...] = ((0.2, 3.0), (0.2, 1.5))
  anisotropic_prob: float = 0.5  # else isotropic
  max_kernel_size: int = 21  # kernel covers +-3 sigma, capped here
  resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
  resize_up: tuple[tuple[float, float], ...] = ((1.0, 1.5), (1.0, 1.2))
  resize_down: tuple[tuple[float, float], ...] = ((0.5, 1.0), (0.5, 1.0))
  resize_methods: tuple[str, ...] = ("area", "bilinear", "bicubic")
  min_size_ratio: float = 0.5  # intermediate size >= this * output size
  noise_prob: tuple[float, float] = (1.0, 0.8)
  noise_sigma: tuple[tuple[float, float], ...] = ((1 / 255, 25 / 255), (1 / 255, 15 / 255))
  grey_noise_prob: float = 0.4  # same noise on all channels (luma-only sensor noise)
  jpeg_prob: tuple[float, float] = (1.0, 1.0)
  jpeg_quality: tuple[tuple[int, int], ...] = ((30, 95), (30, 95))
  shuffle: bool = True  # random op order per round (BSRGAN); False: blur, resize, noise, JPEG


# The ops below take and return planar float32 [C, H, W]; they draw from rng in a fixed order.


def _random_blur(x, rng, sigma_range, cfg: BSRConfig):
  lo, hi = sigma_range
  if rng.random() < cfg.anisotropic_prob:
    sx, sy = rng.uniform(lo, hi, size=2)
    theta = rng.uniform(0.0, np.pi)
  else:
    sx = sy = rng.uniform(lo, hi)
    theta = 0.0
  size = min(2 * int(np.ceil(3.0 * max(sx, sy))) + 1, cfg.max_kernel_size)
  return _filter_planar(x, gaussian_kernel_2d(sx, sy, theta, size).astype(np.float32))


def _random_resize(x, rng, rnd: int, out_hw, cfg: BSRConfig):
  mode = rng.choice(3, p=np.asarray(cfg.resize_probs) / np.sum(cfg.resize_probs))
  factor = (rng.uniform(*cfg.resize_up[rnd]), rng.uniform(*cfg.resize_down[rnd]), 1.0)[mode]
  method = cfg.resize_methods[rng.integers(len(cfg.resize_methods))]
  h, w = x.shape[1:]
  new_h = max(int(round(h * factor)), int(np.ceil(cfg.min_size_ratio * out_hw[0])), 1)
  new_w = max(int(round(w * factor)), int(np.ceil(cfg.min_size_ratio * out_hw[1])), 1)
  return _resize_planar(x, (new_h, new_w), method)


def _random_noise(x, rng, sigma_range, cfg: BSRConfig):
  """Adds the noise to x in place. Drawn in [H, W, C] order, so a seed gives the same noise as an HWC chain."""
  sigma = rng.uniform(*sigma_range)
  c, h, w = x.shape
  grey = rng.random() < cfg.grey_noise_prob
  noise = rng.standard_normal((h, w, 1 if grey else c), dtype=np.float32)  # [H, W, 1 or C]
  noise *= np.float32(sigma)
  x += noise.transpose(2, 0, 1)  # grey: broadcast over C
  return x


def bsr_degrade(image, seed, out_size, config: BSRConfig = BSRConfig()):
  """Second-order BSR degradation of one high-res image -> low-res [h, w, C].

  image: [H, W, C] uint8, or float in [0, 1]; returns the same dtype and range.
  seed: int, tuple of ints, SeedSequence or np.random.Generator (a Generator
  is advanced, the others give the same output bytes on every call).
  out_size: int or (h, w), the size of the conditioning image.

  Two rounds of {blur, resize, Gaussian noise, JPEG}, each op applied with its
  round's probability, in a random order per round; then a final resize (random
  interpolation) to out_size.
  """
  if seed is None:
    raise ValueError("bsr_degrade needs a seed (or np.random.Generator) to be reproducible.")
  rng = np.random.default_rng(seed)
  x, dtype = _to_planar(image)  # [C, H, W] float32, our own copy
  out_hw = _as_size(out_size)
  cfg = config
  for rnd in range(2):
    order = rng.permutation(4) if cfg.shuffle else np.arange(4)
    for op in order:
      if op == 0 and rng.random() < cfg.blur_prob[rnd]:
        x = _random_blur(x, rng, cfg.blur_sigma[rnd], cfg)
      elif op == 1:
        x = _random_resize(x, rng, rnd, out_hw, cfg)
      elif op == 2 and rng.random() < cfg.noise_prob[rnd]:
        x = _random_noise(x, rng, cfg.noise_sigma[rnd], cfg)
      elif op == 3 and rng.random() < cfg.jpeg_prob[rnd]:
        lo, hi = cfg.jpeg_quality[rnd]
        x = _jpeg_planar(x, rng.integers(lo, hi + 1))
        continue  # already on the 8-bit grid in [0, 1]
      else:
        continue  # op not drawn, x unchanged (and in [0, 1])
      np.clip(x, 0.0, 1.0, out=x)  # noise, bicubic overshoot, FFT round-off; JPEG needs [0, 1]
  x = _resize_planar(x, out_hw, cfg.resize_methods[rng.integers(len(cfg.resize_methods))])
  return _from_planar(x, dtype)


# ----------------------------------------------------------------------------
# Per-stage helper for input pipelines.
# ----------------------------------------------------------------------------


def make_low_res(image, augmentation: str, out_size, seed=None, *,
                 blur_sigma: float = PAPER_BLUR_SIGMA,
                 blur_sigma_range: Sequence[float] | None = None,
                 blur_kernel_size: int = PAPER_BLUR_KERNEL_SIZE,
                 bsr_config: BSRConfig = BSRConfig()):
  """High-res [H, W, C] -> the corrupted low-res conditioning image [h, w, C].

  The per-example entry point for input pipelines and data workers: a pure
  function of (image, augmentation, out_size, seed), NumPy / PIL / SciPy only.

  augmentation: "none" (antialiased bicubic resize), "blur" (resize, then the
  paper's kernel-3 blur; sigma fixed, or ~U(blur_sigma_range) when given),
  "bsr" (`bsr_degrade`), or a stage name of PAPER_AUGMENTATION ("sr1", "sr2").
  image: uint8 or float in [0, 1]; the output has the same dtype.
  seed: as for `bsr_degrade`; unused by "none" and by fixed-sigma "blur".
  """
  augmentation = PAPER_AUGMENTATION.get(augmentation, augmentation)
  if augmentation == "bsr":
    return bsr_degrade(image, seed, out_size, bsr_config)
  if augmentation not in ("none", "blur"):
    raise ValueError(f"Unknown augmentation {augmentation!r}; expected 'none', 'blur', 'bsr', 'sr1' or 'sr2'.")
  x, dtype = _to_planar(image)  # [C, H, W]
  x = _resize_planar(x, _as_size(out_size), "bicubic")  # [C, h, w]
  if augmentation == "blur":
    sigma = blur_sigma
    if blur_sigma_range is not None:
      if seed is None:
        raise ValueError("A random blur sigma needs a seed (or np.random.Generator).")
      lo, hi = blur_sigma_range
      sigma = np.random.default_rng(seed).uniform(lo, hi)
    x = _blur(x, sigma, blur_kernel_size, axes=(1, 2))
  return _from_planar(x, dtype)


def make_low_res_batch(images, augmentation: str, out_size, seeds, **kwargs):
  """`make_low_res` over a batch [N, H, W, C] with one seed per image -> [N, h, w, C]."""
  if len(seeds) != len(images):
    raise ValueError(f"Need one seed per image: {len(seeds)} seeds for {len(images)} images.")
  return np.stack([make_low_res(im, augmentation, out_size, s, **kwargs) for im, s in zip(images, seeds, strict=True)])
