"""Frozen CLIP: text and image embeddings from a local Hugging Face folder.

unCLIP never trains CLIP. We keep its params in a plain dict next to (never
inside) any train state, run transformers' Flax CLIP modules with them under
`jax.jit`, and stop gradients at the outputs, so neither an optimizer nor a
gradient can reach them.

Text is encoded as Karlo's pipeline does it: ids padded to 77 tokens, the text
tower run without a padding mask (CLIP's causal mask already hides the padding
from real tokens), z_t = the projected EOS feature, token encodings = the last
hidden state of all 77 positions, and the padding mask returned for the prior.
Images get CLIPImageProcessor's preprocessing in JAX: resize the shortest side
(bicubic, antialiased), center crop, rescale, normalise.
"""

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from unclip_jax import paths

# CLIPImageProcessor's defaults (OpenAI's dataset statistics).
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_HOW_TO_GET = (
    "Put a CLIP checkpoint in Hugging Face format there. This machine may have no internet; on one "
    "that has, run\n"
    "  from transformers import CLIPModel, CLIPTokenizer, CLIPImageProcessor\n"
    "  name = 'openai/clip-vit-large-patch14'\n"
    "  for cls in (CLIPModel, CLIPTokenizer, CLIPImageProcessor):\n"
    "    cls.from_pretrained(name).save_pretrained('clip-vit-large-patch14')\n"
    "and copy the folder here (for Karlo's text encoder alone: CLIPTextModelWithProjection and "
    "CLIPTokenizer from 'kakaobrain/karlo-v1-alpha', subfolders 'text_encoder' and 'tokenizer').")


class TextEncoding(NamedTuple):
  """CLIP's encoding of a batch of prompts."""
  embedding: jnp.ndarray  # [B, D] z_t, projected EOS feature (not L2-normalised)
  tokens: jnp.ndarray  # [B, L, W] last hidden state, L = 77
  mask: jnp.ndarray  # [B, L] bool, True on real tokens (BOS .. EOS)
  ids: jnp.ndarray | None = None  # [B, L] int32, the tokenizer's (a decoder with its own text encoder reads them)


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
  """CLIPImageProcessor's settings."""
  shortest_edge: int = 224
  crop_size: tuple[int, int] = (224, 224)  # (height, width)
  mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
  std: tuple[float, float, float] = OPENAI_CLIP_STD

  @classmethod
  def from_folder(cls, path: str, image_size: int) -> "ImagePreprocess":
    """Reads preprocessor_config.json if present; else CLIP's defaults at the tower's size."""
    file = os.path.join(path, "preprocessor_config.json")
    if not os.path.exists(file):
      return cls(shortest_edge=image_size, crop_size=(image_size, image_size))
    with open(file) as f:
      cfg = json.load(f)
    size = cfg.get("size", image_size)
    if isinstance(size, dict):
      if "shortest_edge" not in size:
        raise ValueError(f"{file}: only size={{'shortest_edge': n}} is supported, got {size}.")
      size = size["shortest_edge"]
    crop = cfg.get("crop_size", size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (crop, crop)
    return cls(shortest_edge=int(size), crop_size=tuple(int(c) for c in crop),
               mean=tuple(cfg.get("image_mean", OPENAI_CLIP_MEAN)),
               std=tuple(cfg.get("image_std", OPENAI_CLIP_STD)))


def resized_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
  """(h, w) with the shorter side at shortest_edge, the longer truncated (as transformers does)."""
  short, long = min(height, width), max(height, width)
  new_long = int(shortest_edge * long / short)
  return (shortest_edge, new_long) if height <= width else (new_long, shortest_edge)


def preprocess_images(images, prep: ImagePreprocess, value_range=(0.0, 1.0)):
  """[B, H, W, 3] uint8 (0..255) or float images -> [B, h, w, 3] normalised CLIP input.

  Float images are read in `value_range`. A resize is done in [0, 255] units;
  for uint8 input its result is rounded and clipped to uint8 as PIL does,
  which keeps us within a few 1/255 of CLIPImageProcessor. Images whose
  shortest side already has the target size are not resampled at all.
  """
  images = jnp.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"Images must be [B, H, W, 3] (RGB, channels last), got shape {images.shape}.")
  is_uint8 = images.dtype == jnp.uint8
  if not is_uint8 and not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"Images must be uint8 or float, got {images.dtype}.")
  x = images.astype(jnp.float32)
  if not is_uint8:
    lo, hi = value_range
    x = (x - lo) * (255.0 / (hi - lo))
  b, h, w, _ = images.shape
  new_h, new_w = resized_shape(h, w, prep.shortest_edge)
  if (new_h, new_w) != (h, w):
    x = jax.image.resize(x, (b, new_h, new_w, 3), method="bicubic", antialias=True)
    x = jnp.clip(x, 0.0, 255.0)
    if is_uint8:
      x = jnp.round(x)
  crop_h, crop_w = prep.crop_size
  if crop_h > new_h or crop_w > new_w:
    raise ValueError(f"Crop {prep.crop_size} is larger than the resized image {(new_h, new_w)}.")
  top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
  x = x[:, top:top + crop_h, left:left + crop_w, :]
  mean = jnp.asarray(prep.mean, jnp.float32)
  std = jnp.asarray(prep.std, jnp.float32)
  return (x / 255.0 - mean) / std  # [B, crop_h, crop_w, 3]


def _text_forward(text_module, params, input_ids):
  """(z_t [B, D], last hidden state [B, L, W]) without a padding mask, as Karlo runs it."""
  ones = jnp.ones_like(input_ids)
  positions = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
  last, pooled = text_module.apply({"params": params["text_model"]}, input_ids, ones, positions,
                                   deterministic=True, return_dict=False)[:2]
  z_t = pooled @ params["text_projection"]["kernel"]
  return jax.lax.stop_gradient(z_t), jax.lax.stop_gradient(last)


def _image_forward(vision_module, prep, params, images, value_range):
  """z_i [B, D] (projected, not L2-normalised) from raw images."""
  pixels = preprocess_images(images, prep, value_range)
  pooled = vision_module.apply({"params": params["vision_model"]}, pixels, deterministic=True,
                               return_dict=False)[1]
  return jax.lax.stop_gradient(pooled @ params["visual_projection"]["kernel"])


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenCLIP:
  """A loaded CLIP: modules, their frozen params, the tokenizer and preprocessing."""
  params: Any  # {'text_model', 'text_projection'[, 'vision_model', 'visual_projection']}
  text_module: Any
  vision_module: Any  # None for a text-only folder
  tokenizer: Any
  preprocess: ImagePreprocess | None
  max_length: int = 77
  path: str = ""

  @property
  def embed_dim(self) -> int:
    return int(self.params["text_projection"]["kernel"].shape[-1])

  @property
  def text_width(self) -> int:
    return int(self.params["text_projection"]["kernel"].shape[0])

  @property
  def vocab_size(self) -> int:
    """Token ids are below this (the token embedding's rows)."""
    return int(self.params["text_model"]["embeddings"]["token_embedding"]["embedding"].shape[0])

  def tokenize(self, prompts: str | Sequence[str]):
    """(ids [B, L] int32, mask [B, L] bool); over-long prompts truncated with a warning."""
    if isinstance(prompts, str):
      prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
      raise ValueError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}.")
    full = self.tokenizer(prompts, truncation=False)["input_ids"]
    long = [(p, len(ids)) for p, ids in zip(prompts, full) if len(ids) > self.max_length]
    if long:
      warnings.warn(
          f"{len(long)} prompt(s) have more than CLIP's {self.max_length} tokens and were truncated: "
          + "; ".join(f"{p[:60]!r}... ({n} tokens)" for p, n in long), stacklevel=2)
    enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="np")
    return jnp.asarray(enc["input_ids"], jnp.int32), jnp.asarray(enc["attention_mask"], bool)

  def encode_text(self, prompts: str | Sequence[str]) -> TextEncoding:
    """z_t [B, D], token encodings [B, 77, W], mask [B, 77] and the token ids; "" is the unconditional
    text."""
    ids, mask = self.tokenize(prompts)
    z_t, tokens = self._text_fn(self.params, ids)
    return TextEncoding(z_t, tokens, mask, ids)

  def encode_image(self, images, value_range=(0.0, 1.0)) -> jnp.ndarray:
    """z_i [B, D] from [B, H, W, 3] uint8 or float (in value_range) images of any size."""
    if self.vision_module is None:
      raise ValueError(f"The CLIP folder {self.path!r} holds a text encoder only; encode_image needs a "
                       "full CLIP folder (CLIPModel) with its vision tower.")
    return self._image_fn(self.params, images, value_range=tuple(float(v) for v in value_range))

  @functools.cached_property
  def _text_fn(self):
    return jax.jit(functools.partial(_text_forward, self.text_module))

  @functools.cached_property
  def _image_fn(self):
    return jax.jit(functools.partial(_image_forward, self.vision_module, self.preprocess),
                   static_argnames="value_range")


def _has_weights(path: str, names: Sequence[str]) -> bool:
  return any(os.path.exists(os.path.join(path, n)) for n in names)


def load_clip(path: str, tokenizer_path: str | None = None, dtype=jnp.float32) -> FrozenCLIP:
  """Loads a CLIP folder (full CLIPModel, or CLIPTextModelWithProjection as in Karlo).

  Flax weights (flax_model.msgpack) are read directly, PyTorch ones through
  transformers' from_pt. The tokenizer comes from tokenizer_path, else `path`.
  transformers reads local folders only, so a remote folder (gs://, ...) is
  copied to a temporary local one first; a file:// URI is read in place.
  """
  with contextlib.ExitStack() as stack:
    local = stack.enter_context(paths.local_copy(path))
    local_tok = stack.enter_context(paths.local_copy(tokenizer_path)) if tokenizer_path else None
    return _load_local(local, local_tok, dtype, os.fspath(path),
                       os.fspath(tokenizer_path) if tokenizer_path else None)


def _load_local(path: str, tokenizer_path: str | None, dtype, name: str, tokenizer_name: str | None) -> FrozenCLIP:
  """load_clip from local folders; messages name the folders as the caller gave them (name, tokenizer_name)."""
  # Imported when a CLIP is loaded, not with this module: transformers' Flax CLIP takes seconds to import,
  # and the encoding types above serve programs that never load one (unclip_jax.aot, the data stores).
  from transformers import CLIPConfig, CLIPTextConfig, CLIPTokenizer
  from transformers.models.clip import modeling_flax_clip as fc

  if not os.path.isdir(path) or not os.path.exists(os.path.join(path, "config.json")):
    raise FileNotFoundError(f"No CLIP model folder (with config.json) at {name!r}. {_HOW_TO_GET}")
  with open(os.path.join(path, "config.json")) as f:
    model_type = json.load(f).get("model_type")
  from_flax = _has_weights(path, ["flax_model.msgpack", "flax_model.msgpack.index.json"])
  if not from_flax and not _has_weights(path, ["model.safetensors", "model.safetensors.index.json",
                                               "pytorch_model.bin", "pytorch_model.bin.index.json"]):
    raise FileNotFoundError(f"{name!r} has a config.json but no weights. {_HOW_TO_GET}")
  def from_pretrained(cls):
    # transformers' PyTorch->Flax conversion needs initialised params to map onto.
    if from_flax:
      return cls.from_pretrained(path, _do_init=False, dtype=dtype)[1]
    return cls.from_pretrained(path, from_pt=True, dtype=dtype).params

  if model_type == "clip":
    config = CLIPConfig.from_pretrained(path)
    params = from_pretrained(fc.FlaxCLIPModel)
    text_config, vision_config = config.text_config, config.vision_config
    params = {k: params[k] for k in ("text_model", "text_projection", "vision_model", "visual_projection")}
  elif model_type == "clip_text_model":
    text_config, vision_config = CLIPTextConfig.from_pretrained(path), None
    params = from_pretrained(fc.FlaxCLIPTextModelWithProjection)
    if "text_projection" not in params:
      raise ValueError(f"{name!r} is a CLIPTextModel without text_projection; unCLIP needs "
                       "CLIPTextModelWithProjection (or a full CLIPModel).")
    params = {k: params[k] for k in ("text_model", "text_projection")}
  else:
    raise ValueError(f"{name!r}: model_type {model_type!r} is not CLIP; expected 'clip' (CLIPModel) or "
                     "'clip_text_model' (CLIPTextModelWithProjection).")
  params = jax.tree.map(lambda p: jnp.asarray(p, dtype), params)
  tok_path = tokenizer_path or path
  try:
    tokenizer = CLIPTokenizer.from_pretrained(tok_path)
  except (OSError, TypeError, ValueError) as e:
    raise FileNotFoundError(f"No CLIP tokenizer (vocab.json, merges.txt) in {tokenizer_name or name!r}: {e}. "
                            f"{_HOW_TO_GET}") from e
  max_length = int(text_config.max_position_embeddings)
  text_module = fc.FlaxCLIPTextTransformer(text_config, dtype=dtype)
  vision_module = prep = None
  if vision_config is not None:
    vision_module = fc.FlaxCLIPVisionTransformer(vision_config, dtype=dtype)
    prep = ImagePreprocess.from_folder(path, int(vision_config.image_size))
  return FrozenCLIP(params=params, text_module=text_module, vision_module=vision_module, tokenizer=tokenizer,
                    preprocess=prep, max_length=max_length, path=name)
