"""Pictures in and out, the one module for them: decoding (files, URIs, bytes, robust to bad
files), checking, resizing (PIL, bicubic), value ranges (uint8 <-> the models' [-1, 1]), grids
and PNG files. Sampling, training's data workers and the stages all use these."""

import io
import math
import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from unclip_jax import paths

# What PIL raises for a truncated, corrupt or non-image file.
DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError)


class ImageError(ValueError):
  """An input that is not a usable image: an unreadable file, a wrong shape or dtype."""


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image as RGB; transparency (an alpha channel, or a palette's or a colour's transparency)
  is composited on white, the Shapes world's background, not dropped: PIL's plain convert("RGB")
  keeps the colour under alpha 0, usually black."""
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
    image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
  return image.convert("RGB")


def load_image(path) -> np.ndarray:
  """An image file (a local path or a URI: gs://, file://) -> uint8 [H, W, 3] RGB (PIL; grey and
  palette images are converted, transparency is composited on white: to_rgb)."""
  try:
    source = path  # a file object passes through
    if isinstance(path, (str, os.PathLike)):  # PIL opens local files only: a remote one is read whole first
      source = io.BytesIO(paths.as_path(path).read_bytes()) if paths.is_remote(path) else paths.as_path(path)
    with Image.open(source) as image:
      image.load()  # PIL is lazy: force the decode so a truncated file fails here
      return np.asarray(to_rgb(image), np.uint8)
  except FileNotFoundError:
    raise ImageError(f"image file {os.fspath(path)!r} does not exist.") from None
  except IsADirectoryError:
    raise ImageError(f"{os.fspath(path)!r} is a folder, not an image file.") from None
  except DECODE_ERRORS as e:
    raise ImageError(f"cannot read {os.fspath(path)!r} as an image ({type(e).__name__}: {e}).") from None


def decode(data: bytes) -> Image.Image:
  """Encoded image bytes (JPEG, PNG, ...) -> a fully decoded PIL image; raises one of DECODE_ERRORS
  for a truncated, corrupt or non-image file (data/loader.py then marks the example not ok and
  fills its place in the batch with a good one)."""
  image = Image.open(io.BytesIO(data))
  image.load()  # PIL is lazy: force the full decode so truncated files fail here
  return image


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


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
  """Shortest side to `size` (bicubic, antialiased), centre crop -> uint8 [size, size, 3] (to_rgb)."""
  image = to_rgb(image)
  w, h = image.size
  scale = size / min(w, h)
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  image = image.resize((new_w, new_h), Image.BICUBIC, reducing_gap=None)
  left, top = (new_w - size) // 2, (new_h - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


def square(images, size: int) -> np.ndarray:
  """uint8 [N, H, W, 3] -> [N, size, size, 3]: shortest side to size (bicubic, antialiased), centre crop."""
  images = check_images(images)
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([resize_center_crop(Image.fromarray(image), size) for image in images])


def resize_batch(images, size: int) -> np.ndarray:
  """uint8 [N, H, W, C] -> [N, size, size, C], bicubic with antialiasing (PIL); no crop, so a
  non-square image is stretched."""
  images = np.asarray(images)
  if images.shape[1:3] == (size, size):
    return images
  return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.BICUBIC, reducing_gap=None))
                   for im in images])


def to_model_range(images) -> np.ndarray:
  """uint8 -> float32 in [-1, 1], the diffusion models' range."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def to_uint8(images, value_range=(-1.0, 1.0)) -> np.ndarray:
  """Float images in value_range (default the models' [-1, 1]) -> uint8, rounded and clipped."""
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
