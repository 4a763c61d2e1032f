"""Decoding and cropping images for training, robust to bad files."""

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

# What PIL raises for a truncated, corrupt or non-image file.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError)


def decode(data: bytes) -> Image.Image:
  image = Image.open(io.BytesIO(data))
  image.load()  # PIL is lazy: force the full decode so truncated files fail here
  return image


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Shortest side to `size` (bicubic, antialiased), centre crop -> uint8 [size, size, 3]."""
  image = image.convert("RGB")
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def resize_batch(images, size: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> [N, size, size, C], bicubic with antialiasing (PIL)."""
  images = np.asarray(images)
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC, reducing_gap=None))
                   for im in images])


def to_model_range(images) -> np.ndarray:
  """uint8 -> float32 in [-1, 1], the diffusion models' range."""
  return np.asarray(images, np.float32) / 127.5 - 1.0
