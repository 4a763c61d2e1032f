"""The paper's applications (section 3), as functions of a Pipeline: they work on
images through CLIP's image embeddings z_i and the decoder, without a caption
(interpolate_captions: on the z_i the prior makes of two captions).

Each takes `options` ({stage: StageOptions or dict of its fields}, over the
pipeline's default_options; the decoder as Pipeline.options_for(mode) says) and
returns uint8 images, or floats in [-1, 1] with as_float=True.
"""

import os
from collections.abc import Sequence

import numpy as np

from unclip_jax import imaging
from unclip_jax.diffusion.slerp import slerp
from unclip_jax.pipeline.core import Pipeline, output, read_images


class InputError(ValueError):
  """Arguments an application cannot work with (too few frames, captions without a difference, ...)."""


def _one_image(image, what: str) -> np.ndarray:
  images = read_images(image)
  if len(images) != 1:
    raise imaging.ImageError(what.format(len(images)))
  return images


def variations(pipe: Pipeline, image, seeds: Sequence[int], options: dict | None = None, up_to: str | None = None,
               as_float: bool = False) -> np.ndarray:
  """Variations of one image [len(seeds), R, R, 3]: its z_i decoded without a caption, one image per
  seed. The decoder samples with DDIM eta = 1 unless options sets "decoder" (options_for)."""
  images = _one_image(image, "variations takes one image, got {}; call it once per image.")
  seeds = list(seeds)
  z_i = np.repeat(pipe.image_embeddings(images), len(seeds), axis=0)
  out = pipe.decode(z_i, "", seeds, pipe.options_for("variations", options), up_to=up_to)
  return output(out, len(seeds), as_float)


def interpolate(pipe: Pipeline, image_a, image_b, num_frames: int, seed: int = 0, options: dict | None = None,
                noise: str = "fixed", up_to: str | None = None, as_float: bool = False,
                fixed_point_iters: int | None = None) -> np.ndarray:
  """num_frames images [F, R, R, 3] between two images, frame k at theta = linspace(0, 1, F)[k]:
  z_theta = slerp(z_a, z_b, theta) (direction on the sphere, norm linearly), decoded without a
  caption by DDIM eta = 0 from x_T(theta), where noise is
  - "fixed": every frame starts from the x_T of `seed` (initial_noise), so the end frames
    are exactly decode(z_a) and decode(z_b) with that seed;
  - "slerp": x_T(theta) = slerp(invert(a), invert(b), theta), each image DDIM-inverted under its
    own z_i, so the end frames reconstruct the two images.
  `seed` also draws the upsamplers' noise, the same for every frame.
  """
  if num_frames < 2:
    raise InputError(f"num_frames must be at least 2 (the two end frames), got {num_frames}.")
  if noise not in ("fixed", "slerp"):
    raise InputError(f"noise must be 'fixed' or 'slerp', got {noise!r}.")
  images = [_one_image(x, name + " must be one image, got {}.")
            for name, x in (("image_a", image_a), ("image_b", image_b))]
  options = pipe.options_for("interpolate", options)
  z_a, z_b = (pipe.image_embeddings(x)[0] for x in images)
  x_T = None
  if noise == "slerp":
    x_a, x_b = (pipe.invert(x, z[None], options=options, fixed_point_iters=fixed_point_iters)[0]
                for x, z in zip(images, (z_a, z_b)))
    x_T = slerp(x_a, x_b, np.linspace(0.0, 1.0, num_frames))
  return _slerp_frames(pipe, z_a, z_b, num_frames, seed, options, x_T, up_to, as_float)


def interpolate_captions(pipe: Pipeline, prompt_a: str, prompt_b: str, num_frames: int, seed: int = 0,
                         options: dict | None = None, num_candidates: int = 2, up_to: str | None = None,
                         as_float: bool = False) -> np.ndarray:
  """num_frames images [F, R, R, 3] between two captions, frame k at theta = linspace(0, 1, F)[k]:
  the prior's z_i of each caption (pipe.prior, both with `seed`), slerped as in `interpolate` and
  decoded without a caption by DDIM eta = 0, every frame from the x_T of `seed`. The end frames
  are each caption's own image: decode(prior([prompt], [seed]), "", [seed]) under the same options.
  """
  if num_frames < 2:
    raise InputError(f"num_frames must be at least 2 (the two end frames), got {num_frames}.")
  options = pipe.options_for("interpolate", options)
  z_a, z_b = pipe.prior([prompt_a, prompt_b], [seed, seed], options, num_candidates=num_candidates)
  return _slerp_frames(pipe, z_a, z_b, num_frames, seed, options, None, up_to, as_float)


def _slerp_frames(pipe: Pipeline, z_a, z_b, num_frames: int, seed: int, options: dict, x_T, up_to: str | None,
                  as_float: bool) -> np.ndarray:
  """Frames decoding slerp(z_a, z_b, theta) [D] without a caption, theta = linspace(0, 1, F), from
  x_T [F, r, r, 3] (None: the x_T of `seed` for every frame); `seed` also draws the upsamplers' noise."""
  if x_T is None:
    x_T = np.repeat(pipe.initial_noise([seed]), num_frames, axis=0)
  z = slerp(z_a, z_b, np.linspace(0.0, 1.0, num_frames))
  return output(pipe.decode(z, "", [seed] * num_frames, options, x_T=x_T, up_to=up_to), num_frames, as_float)


def text_diff(pipe: Pipeline, image, source_prompt: str, target_prompt: str, thetas: Sequence[float],
              options: dict | None = None, seed: int = 0, up_to: str | None = None, as_float: bool = False,
              fixed_point_iters: int | None = None) -> np.ndarray:
  """The image edited toward a caption change, one frame per theta [T, R, R, 3] (paper, section 3.3).

  x_T = invert(image) under its own z_i and no caption (the inversion runs
  the decode's own guided model function: same steps, guidance scale and
  clamp, so theta = 0 reconstructs the image). The text diff
  z_d = normalize(z_t(target) - z_t(source)) is scaled to |z_i| (z_i is not
  unit-norm here, and the decoder was trained on CLIP's raw norms), and each
  frame decodes z_theta = slerp(z_i, |z_i| z_d, theta) without a caption by
  DDIM eta = 0 from that x_T. The paper uses theta up to about 0.5. `seed`
  draws the upsamplers' noise, the same for every frame.
  """
  images = _one_image(image, "text_diff takes one image, got {}.")
  thetas = np.asarray(thetas, np.float64).reshape(-1)
  options = pipe.options_for("textdiff", options)
  z_i = pipe.image_embeddings(images)[0]
  z_t = np.asarray(pipe.clip.encode_text([source_prompt, target_prompt]).embedding, np.float64)
  diff = z_t[1] - z_t[0]
  if np.linalg.norm(diff) < 1e-6 * np.linalg.norm(z_t[0]):
    raise InputError(f"The source and target captions have the same CLIP embedding ({source_prompt!r}, "
                     f"{target_prompt!r}): there is no direction to move in.")
  z_d = diff / np.linalg.norm(diff) * np.linalg.norm(z_i)
  x_T = pipe.invert(images, z_i[None], options=options, fixed_point_iters=fixed_point_iters)
  out = pipe.decode(slerp(z_i, z_d.astype(np.float32), thetas), "", [seed] * len(thetas), options,
                    x_T=np.repeat(x_T, len(thetas), axis=0), up_to=up_to)
  return output(out, len(thetas), as_float)


def read_mask(mask, size: tuple[int, int]) -> np.ndarray:
  """bool [H, W], True where painted, from a mask image (path or array [H, W] / [H, W, C]) of the
  image's size: white (>= 128) is painted, black kept."""
  if isinstance(mask, (str, os.PathLike)):
    mask = imaging.load_image(mask)
  mask = np.asarray(mask)
  if mask.ndim == 3:
    mask = mask[..., :3].mean(axis=-1)
  if mask.shape != tuple(size):
    raise InputError(f"The mask is {mask.shape[1]}x{mask.shape[0]} px, the image {size[1]}x{size[0]}: they must "
                     "be the same size.")
  painted = mask >= 128
  if not painted.any():
    raise InputError("The mask has no white pixels: nothing to repaint (white is repainted, black kept).")
  return painted


def inpaint(pipe: Pipeline, image, mask, prompt: str, seeds: Sequence[int], options: dict | None = None,
            resample_steps: int = 5, num_candidates: int = 2, up_to: str | None = None,
            as_float: bool = False) -> np.ndarray:
  """The image with its mask's white pixels repainted after `prompt`, one result per seed
  [len(seeds), R, R, 3]: z_i from the prior (the prompt, each seed), then the decoder (with the
  caption) and the upsamplers keep the image outside the mask and paint the rest (decode's known=,
  RePaint with resample_steps takes per step), so the result equals the image there (its centre
  square at each stage's resolution). Inpainting samples with DDPM or DDIM."""
  images = _one_image(image, "inpaint takes one image, got {}.")
  painted = read_mask(mask, images.shape[1:3])
  options = pipe.options_for("inpaint", options)
  deterministic = [s for s in ("decoder", "sr1", "sr2") if s in pipe.stages and options[s].sampler not in
                   ("ddpm", "ddim")]
  if deterministic:
    raise InputError(f"Inpainting samples with ddpm or ddim, not {options[deterministic[0]].sampler} "
                     f"({deterministic[0]}).")
  if resample_steps < 1:
    raise InputError(f"resample_steps must be at least 1, got {resample_steps}.")
  seeds = list(seeds)
  z_i = pipe.prior([prompt] * len(seeds), seeds, options, num_candidates=num_candidates)
  known = (np.repeat(images, len(seeds), axis=0), np.repeat(painted[None], len(seeds), axis=0))
  out = pipe.decode(z_i, prompt, seeds, options, up_to=up_to, known=known, resample_steps=resample_steps)
  return output(out, len(seeds), as_float)
