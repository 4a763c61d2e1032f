"""Converting model outputs to pictures: uint8, grids, PNG files."""

import math
import os

import numpy as np
from PIL import Image


def to_uint8(images, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Float images in value_range -> uint8, rounded and clipped."""
  low, high = value_range
  x = (np.asarray(images, np.float32) - low) / (high - low)
  return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


def make_grid(images, columns: int | None = None, pad: int = 2, pad_value: int = 255) -> np.ndarray:
  """[N, H, W, C] uint8 -> one [rows * (H + pad) + pad, ...] image, row-major."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), pad_value, images.dtype)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
  return grid


def save_png(image, path: str):
  """Writes [H, W, 3] (or [H, W, 1]) uint8 as PNG, creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  image = np.asarray(image)
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
