"""Upsampler conditioning augmentation: host images/s before and after the fast path, and the JAX blur.

Host rows run `make_low_res` per image (what a data worker calls) on procedural
uint8 images: "blur" 256 -> 64 (sr1) and "bsr" 1024 -> 256 (sr2). "old" is the
implementation before the fast path, kept here only as a reference: HWC layout,
NumPy FFT at the raw padded size, per-channel copies around PIL, JAX taps for
the host blur. Old and new run interleaved image by image so that load from
other jobs hits both alike; the speed-up is the ratio within this one run. The
last row is `random_gaussian_blur` jitted on a [B, 64, 64, 3] batch with one key
per example, on the default JAX device.

  python benchmarks/degradations.py [--bsr_images 8] [--blur_images 200] [--batch 256]
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax.data import degradations as deg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import bsr_reference  # noqa: E402  (tests/: the plain BSR chain the tests check against)

# ----------------------------------------------------------------------------
# The implementation before the fast path (reference only).
# ----------------------------------------------------------------------------


def _old_blur_np(x, sigma, kernel_size):
  taps = np.asarray(deg.gaussian_kernel_1d(sigma, kernel_size), np.float64)  # JAX taps
  r = kernel_size // 2
  h, w = x.shape[:2]
  p = np.pad(x.astype(np.float64), ((r, r), (r, r), (0, 0)), mode="symmetric")
  p = sum(taps[i] * p[i:i + h] for i in range(kernel_size))
  p = sum(taps[i] * p[:, i:i + w] for i in range(kernel_size))
  return p.astype(x.dtype)


def _old_filter2d(x, kernel):
  r = kernel.shape[0] // 2
  h, w = x.shape[:2]
  p = np.pad(x, ((r, r), (r, r), (0, 0)), mode="symmetric")
  fh, fw = p.shape[:2]
  spec = np.fft.rfft2(p, axes=(0, 1)) * np.fft.rfft2(kernel, s=(fh, fw))[..., None]
  out = np.fft.irfft2(spec, s=(fh, fw), axes=(0, 1))
  return out[2 * r:2 * r + h, 2 * r:2 * r + w].astype(x.dtype)


def old_bsr_degrade(image, seed, out_size, cfg=None):
  """The chain as it ran before the fast path: HWC, NumPy's FFT at the raw padded length, PIL per
  channel (tests/bsr_reference.py's chain with the old primitives)."""
  return bsr_reference.plain_bsr(image, seed, out_size, cfg,
                                 filter2d=lambda x, k: _old_filter2d(x, k.astype(np.float32)))


def old_make_low_res_blur(image, out_size):
  x = bsr_reference.pil_resize(image.astype(np.float32) / 255.0, (out_size, out_size), "bicubic")
  x = _old_blur_np(x, deg.PAPER_BLUR_SIGMA, deg.PAPER_BLUR_KERNEL_SIZE)
  return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ----------------------------------------------------------------------------
# Timing.
# ----------------------------------------------------------------------------


def make_image(seed: int, size: int) -> np.ndarray:
  """Procedural uint8 [size, size, 3]: smooth colour gradients, discs and fine texture (JPEG cost depends on it)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  img = np.stack([0.5 + 0.4 * np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform() * yy))
                  for _ in range(3)], -1)
  for _ in range(8):
    cy, cx, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.2)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 1, 3)
  img += 0.04 * rng.standard_normal(img.shape)
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def time_host(old_fn, new_fn, images, repeats=1):
  """Interleaved per-image timing -> (old images/s, new images/s, fraction of output bytes that agree)."""
  old_fn(images[0], 0)  # warm-up (imports, JAX taps compile for the old blur)
  new_fn(images[0], 0)
  t_old = t_new = 0.0
  same = total = 0
  for r in range(repeats):
    for i, image in enumerate(images):
      seed = (r, i)
      start = time.perf_counter()
      a = old_fn(image, seed)
      t_old += time.perf_counter() - start
      start = time.perf_counter()
      b = new_fn(image, seed)
      t_new += time.perf_counter() - start
      same += int(np.sum(a == b))
      total += a.size
  n = len(images) * repeats
  return n / t_old, n / t_new, same / total


def time_jax_blur(batch, size, repeats):
  """random_gaussian_blur, jitted, one key per example (fold_in of the example index) -> images/s."""
  images = jax.device_put(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32))

  @jax.jit
  def run(key, images, step):
    keys = jax.vmap(lambda i: jax.random.fold_in(key, step * batch + i))(jnp.arange(batch))
    return deg.random_gaussian_blur(keys, images)[0]

  key = jax.random.key(0)
  jax.block_until_ready(run(key, images, 0))
  start = time.perf_counter()
  for step in range(repeats):
    out = run(key, images, step + 1)
  jax.block_until_ready(out)
  return batch * repeats / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bsr_images", type=int, default=8, help="distinct 1024 px images for BSR (one seed each)")
  parser.add_argument("--blur_images", type=int, default=200, help="256 px images for the sr1 blur")
  parser.add_argument("--batch", type=int, default=256, help="batch of the JAX blur")
  parser.add_argument("--jax_repeats", type=int, default=20)
  args = parser.parse_args()
  print(f"JAX device: {jax.devices()[0].device_kind} ({jax.default_backend()}); host: one process, one thread\n")

  blur_imgs = [make_image(i, 256) for i in range(min(args.blur_images, 20))]
  blur_imgs = [blur_imgs[i % len(blur_imgs)] for i in range(args.blur_images)]
  blur = time_host(lambda im, s: old_make_low_res_blur(im, 64), lambda im, s: deg.make_low_res(im, "sr1", 64, s),
                   blur_imgs)
  bsr_imgs = [make_image(100 + i, 1024) for i in range(args.bsr_images)]
  bsr = time_host(lambda im, s: old_bsr_degrade(im, s, 256), lambda im, s: deg.make_low_res(im, "sr2", 256, s),
                  bsr_imgs)
  jax_ips = time_jax_blur(args.batch, 64, args.jax_repeats)

  print("| augmentation | sizes | old images/s | new images/s | speed-up | output bytes equal to old |")
  print("|" + "---|" * 6)
  for name, sizes, (old_ips, new_ips, same) in (("host blur (sr1)", "256 -> 64", blur),
                                                ("host BSR (sr2)", "1024 -> 256", bsr)):
    print(f"| {name} | {sizes} | {old_ips:,.1f} | {new_ips:,.1f} | {new_ips / old_ips:.1f}x | {100 * same:.2f}% |")
  print(f"| JAX `random_gaussian_blur`, jit, batch {args.batch}, per-example keys | 64 x 64 | | {jax_ips:,.0f} | | |")


if __name__ == "__main__":
  main()
