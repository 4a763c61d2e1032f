"""Pictures in and out: loading and checking input images, uint8, grids, PNG files."""

import io
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from unclip_jax import paths


class ImageError(ValueError):
  """An input that is not a usable image: an unreadable file, a wrong shape or dtype."""


def load_image(path) -> np.ndarray:
  """An image file (a local path or a URI: gs://, file://) -> uint8 [H, W, 3] RGB (PIL; grey,
  palette and alpha images are converted)."""
  try:
    source = path  # a file object passes through
    if isinstance(path, (str, os.PathLike)):  # PIL opens local files only: a remote one is read whole first
      source = io.BytesIO(paths.as_path(path).read_bytes()) if paths.is_remote(path) else paths.as_path(path)
    with Image.open(source) as image:
      image.load()  # PIL is lazy: force the decode so a truncated file fails here
      return np.asarray(image.convert("RGB"), np.uint8)
  except FileNotFoundError:
    raise ImageError(f"image file {os.fspath(path)!r} does not exist.") from None
  except IsADirectoryError:
    raise ImageError(f"{os.fspath(path)!r} is a folder, not an image file.") from None
  except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageError(f"cannot read {os.fspath(path)!r} as an image ({type(e).__name__}: {e}).") from None


def check_images(images, name: str = "images") -> np.ndarray:
  """uint8 [N, H, W, 3] (a single [H, W, 3] gets a batch axis), or ImageError saying what is wrong."""
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ImageError(f"{name} must be uint8 (0..255), got dtype {images.dtype}; for floats in [0, 1] "
                     "pass np.round(x * 255).astype(np.uint8).")
  if images.ndim == 3:
    images = images[None]
  if images.ndim != 4 or images.shape[-1] != 3 or 0 in images.shape:
    raise ImageError(f"{name} must be RGB, [H, W, 3] or [N, H, W, 3] with channels last, got shape "
                     f"{images.shape}.")
  return images


def square(images, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> [N, size, size, 3]: shortest side to size (bicubic, antialiased), centre crop."""
  images = check_images(images)
  if images.shape[1:3] == (size, size):
    return images
  from unclip_jax.data.images import resize_center_crop

  return np.stack([resize_center_crop(Image.fromarray(image), size) for image in images])


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


def save_png(image, path):
  """Writes [H, W, 3] (or [H, W, 1]) uint8 as PNG to a local path or a URI (gs://, file://), creating
  the folder."""
  path = paths.as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  image = np.asarray(image)
  with path.open("wb") as f:  # through epath, so a bucket works too
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(f, format="PNG")
