"""The BSR chain (data/degradations.py bsr_degrade) written plainly on [H, W, C] with the same random
draws, its three image operations passed in: tests/test_degradations.py checks bsr_degrade against it
with exact float64 primitives, benchmarks/degradations.py times it with the implementation's old ones."""

import io

import numpy as np
from PIL import Image

from unclip_jax.data import degradations as deg


def pil_resize(x: np.ndarray, hw: tuple[int, int], method: str) -> np.ndarray:
  """float32 [H, W, C] -> [h, w, C], PIL per channel ("F" mode, no 8-bit rounding)."""
  if x.shape[:2] == tuple(hw):
    return x
  return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(x[..., c], np.float32)).resize(
      (hw[1], hw[0]), deg._RESAMPLE[method])) for c in range(x.shape[-1])], -1)


def pil_jpeg(x: np.ndarray, quality: int) -> np.ndarray:
  """[0, 1] float -> 8 bits -> JPEG at quality -> float32 [0, 1]."""
  buf = io.BytesIO()
  Image.fromarray(np.round(np.clip(x, 0, 1) * 255).astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
  return np.asarray(Image.open(buf)).astype(np.float32) / 255.0


def plain_bsr(image, seed, out_size: int, cfg=None, *, filter2d, resize=pil_resize, jpeg=pil_jpeg):
  """bsr_degrade's chain, step by step: filter2d(x [H, W, C], kernel [k, k]) -> [H, W, C] float32."""
  cfg = cfg or deg.BSRConfig()
  rng = np.random.default_rng(seed)
  x = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32)
  for rnd in range(2):
    for op in rng.permutation(4) if cfg.shuffle else range(4):
      if op == 0 and rng.random() < cfg.blur_prob[rnd]:
        lo, hi = cfg.blur_sigma[rnd]
        if rng.random() < cfg.anisotropic_prob:
          (sx, sy), theta = rng.uniform(lo, hi, size=2), rng.uniform(0.0, np.pi)
        else:
          sx = sy = rng.uniform(lo, hi)
          theta = 0.0
        size = min(2 * int(np.ceil(3.0 * max(sx, sy))) + 1, cfg.max_kernel_size)
        x = filter2d(x, deg.gaussian_kernel_2d(sx, sy, theta, size))
      elif op == 1:
        mode = rng.choice(3, p=np.asarray(cfg.resize_probs) / np.sum(cfg.resize_probs))
        factor = (rng.uniform(*cfg.resize_up[rnd]), rng.uniform(*cfg.resize_down[rnd]), 1.0)[mode]
        method = cfg.resize_methods[rng.integers(len(cfg.resize_methods))]
        hw = tuple(max(int(round(n * factor)), int(np.ceil(cfg.min_size_ratio * out_size)), 1) for n in x.shape[:2])
        x = resize(x, hw, method)
      elif op == 2 and rng.random() < cfg.noise_prob[rnd]:
        sigma = rng.uniform(*cfg.noise_sigma[rnd])
        shape = x.shape[:2] + (1,) if rng.random() < cfg.grey_noise_prob else x.shape
        x = x + np.float32(sigma) * rng.standard_normal(shape, dtype=np.float32)
      elif op == 3 and rng.random() < cfg.jpeg_prob[rnd]:
        lo, hi = cfg.jpeg_quality[rnd]
        x = jpeg(x, rng.integers(lo, hi + 1))
      x = np.clip(x, 0.0, 1.0)
  x = resize(x, (out_size, out_size), cfg.resize_methods[rng.integers(len(cfg.resize_methods))])
  return np.round(np.clip(x, 0, 1) * 255).astype(np.uint8) if image.dtype == np.uint8 else np.clip(x, 0, 1)
