"""Training a small CLIP contrastively (the Shapes demo's own CLIP).

unCLIP treats CLIP as given; for a world with no public CLIP we train one,
with transformers' Flax CLIP so that the result is an ordinary Hugging Face
folder that the frozen-CLIP loader reads exactly as it reads OpenAI's.
"""

import json
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unclip_jax import paths
from unclip_jax.data import shapes as shapes_data
from unclip_jax.models import clip as clip_lib

# transformers is imported by the functions that build or run the CLIP, not here: stages/build.py
# imports every stage, and transformers' Flax CLIP takes seconds to import (see models/clip.py).

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
  """The 256 printable stand-ins byte-level BPE uses for bytes (GPT-2's table)."""
  from transformers.models.clip.tokenization_clip import bytes_to_unicode
  return list(bytes_to_unicode().values())


def _apply_merges(pieces: list[str], ranks: dict) -> list[str]:
  """Byte-pair merging as CLIPTokenizer does it: lowest-ranked pair first."""
  while len(pieces) > 1:
    pairs = [(pieces[i], pieces[i + 1]) for i in range(len(pieces) - 1)]
    best = min(pairs, key=lambda p: ranks.get(p, float("inf")))
    if best not in ranks:
      break
    merged, i = [], 0
    while i < len(pieces):
      if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == best:
        merged.append(pieces[i] + pieces[i + 1])
        i += 2
      else:
        merged.append(pieces[i])
        i += 1
    pieces = merged
  return pieces


def write_word_tokenizer(words: Sequence[str], folder, max_length: int = 77):
  """A CLIPTokenizer whose vocabulary holds every byte plus these whole words, saved in folder
  (a local path or a URI: gs://, file://).

  Each word gets merges appended (lowest priority) that join whatever the
  earlier merges leave of it, left to right, until it is one token; earlier
  words are unaffected because their own merges always outrank the new ones.
  Anything else falls back to bytes. EOS has the largest id, which is how
  transformers' CLIP finds the pooled position.
  """
  from transformers import CLIPTokenizer

  symbols = _byte_symbols()
  vocab, ranks = list(symbols) + [s + "</w>" for s in symbols], {}
  known = set(vocab)
  for word in sorted(set(w.lower() for w in words)):
    pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
    while len(pieces) > 1:
      ranks[(pieces[0], pieces[1])] = len(ranks)
      if pieces[0] + pieces[1] not in known:
        known.add(pieces[0] + pieces[1])
        vocab.append(pieces[0] + pieces[1])
      pieces = [pieces[0] + pieces[1]] + pieces[2:]
  vocab += [BOS, EOS]
  with paths.local_folder(folder) as local:  # transformers reads and writes local folders only
    with open(os.path.join(local, "vocab.json"), "w") as f:
      json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(local, "merges.txt"), "w") as f:
      f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in sorted(ranks, key=ranks.get)))
    tokenizer = CLIPTokenizer(os.path.join(local, "vocab.json"), os.path.join(local, "merges.txt"),
                              model_max_length=max_length)
    tokenizer.save_pretrained(local)
  return tokenizer


def clip_config(model: ml_collections.ConfigDict, vocab_size: int):
  from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

  text = CLIPTextConfig(vocab_size=vocab_size, hidden_size=model.text_width,
                        intermediate_size=4 * model.text_width, num_hidden_layers=model.text_layers,
                        num_attention_heads=model.text_heads, max_position_embeddings=model.get("max_length", 77),
                        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
  vision = CLIPVisionConfig(hidden_size=model.vision_width, intermediate_size=4 * model.vision_width,
                            num_hidden_layers=model.vision_layers, num_attention_heads=model.vision_heads,
                            image_size=model.image_size, patch_size=model.patch_size)
  return CLIPConfig.from_text_vision_configs(text, vision, projection_dim=model.embed_dim)


def _reference_init_std(names: Sequence[str], config) -> float | None:
  """PyTorch CLIPPreTrainedModel._init_weights' std for this Flax parameter (None: keep Flax's init).

  transformers' Flax CLIP draws every kernel with std 0.01; at widths of 128 that
  leaves attention uniform and the text tower a bag of words that Adam does not
  talk out of it (it could not learn which of two colours comes first). PyTorch's
  init scales with the width and depth, as OpenAI's CLIP does.
  """
  factor = config.initializer_factor
  if len(names) < 2:  # logit_scale
    return None
  if names[0] in ("text_projection", "visual_projection"):
    tower = config.text_config if names[0] == "text_projection" else config.vision_config
    return tower.hidden_size ** -0.5 * factor if names[-1] == "kernel" else None
  tower = config.text_config if names[0] == "text_model" else config.vision_config
  width, depth = tower.hidden_size, tower.num_hidden_layers
  module, leaf = names[-2], names[-1]
  in_proj_std = width ** -0.5 * (2 * depth) ** -0.5 * factor
  if leaf == "class_embedding":
    return width ** -0.5 * factor
  if module in ("token_embedding", "position_embedding", "patch_embedding") and leaf in ("embedding", "kernel"):
    return (0.02 if names[0] == "text_model" else tower.initializer_range) * factor
  if leaf != "kernel":
    return None
  return {"q_proj": in_proj_std, "k_proj": in_proj_std, "v_proj": in_proj_std, "out_proj": width ** -0.5 * factor,
          "fc1": (2 * width) ** -0.5 * factor, "fc2": in_proj_std}.get(module)


def reference_init(params, config, rng):
  """Flax CLIP params re-drawn with the PyTorch CLIP init (`_reference_init_std`); biases, norms kept."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(rng, len(leaves))
  out = []
  for (path, x), key in zip(leaves, keys):
    std = _reference_init_std([getattr(k, "key", str(k)) for k in path], config)
    out.append(x if std is None else std * jax.random.normal(key, x.shape, x.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)


def write_clip_folder(folder, config, params, image_size: int, tokenizer=None):
  """A Hugging Face CLIP folder (Flax weights, preprocessing, the tokenizer if given) around these
  params; folder may be a URI (gs://, file://)."""
  from transformers import CLIPImageProcessor, FlaxCLIPModel

  model = FlaxCLIPModel(config, _do_init=False)
  with paths.local_folder(folder) as local:  # save_pretrained writes local folders only
    model.save_pretrained(local, params=jax.device_get(params))
    # Images are made at image_size already: no resize, only normalisation (Shapes' own statistics
    # are close enough to OpenAI's that we keep CLIP's).
    CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
                       ).save_pretrained(local)
    if tokenizer is not None:
      tokenizer.save_pretrained(local)


def contrastive_loss(logits_per_image):
  """Symmetric cross-entropy over the batch's image-text pairs [B, B] (CLIP, eq. in fig. 3)."""
  labels = jnp.arange(logits_per_image.shape[0])
  image_loss = optax.softmax_cross_entropy_with_integer_labels(logits_per_image, labels)
  text_loss = optax.softmax_cross_entropy_with_integer_labels(logits_per_image.T, labels)
  return (image_loss.mean() + text_loss.mean()) / 2


def _twin_pairs(logits_per_image):
  """[2B, 2] logits of each image for (its caption, its twin's caption), and of each caption for
  (its image, its twin's image); the batch is B examples followed by their B twins."""
  n = logits_per_image.shape[0]
  k, partner = jnp.arange(n), (jnp.arange(n) + n // 2) % n
  diag = logits_per_image[k, k]
  return jnp.stack([diag, logits_per_image[k, partner]], 1), jnp.stack([diag, logits_per_image[partner, k]], 1)


def twin_loss(logits_per_image):
  """Two-way cross-entropy between each example and its twin, both directions.

  Among a whole batch of columns a twin is one competitor of many; on its own
  it is the only thing the example has to be told apart from.
  """
  image_pairs, text_pairs = _twin_pairs(logits_per_image)
  zeros = jnp.zeros(logits_per_image.shape[0], jnp.int32)
  return (optax.softmax_cross_entropy_with_integer_labels(image_pairs, zeros).mean()
          + optax.softmax_cross_entropy_with_integer_labels(text_pairs, zeros).mean()) / 2


class ClipStage:
  """Contrastive training of a CLIPModel defined by config.model."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    from transformers.models.clip import modeling_flax_clip as fc

    if config.get("twins", False) and config.data.kind != "shapes":
      raise ValueError("config.twins renders counterfactual Shapes scenes; it needs config.data.kind = 'shapes', "
                       f"not {config.data.kind!r}.")
    self.config = config
    self.tokenizer_dir = os.fspath(paths.as_path(workdir) / "tokenizer")
    self.tokenizer = write_word_tokenizer(config.model.vocabulary, self.tokenizer_dir,
                                          config.model.get("max_length", 77))
    self.hf_config = clip_config(config.model, len(self.tokenizer.get_vocab()))
    self.module = fc.FlaxCLIPModule(self.hf_config, dtype=jnp.dtype(config.get("compute_dtype", "float32")))
    self.preprocess = clip_lib.ImagePreprocess(shortest_edge=config.model.image_size,
                                               crop_size=(config.model.image_size,) * 2)

  def init_params(self, rng):
    size = self.config.model.image_size
    ids = jnp.zeros((1, self.config.model.get("max_length", 77)), jnp.int32)
    params = self.module.init(rng, ids, jnp.zeros((1, size, size, 3)), jnp.ones_like(ids),
                              jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape))["params"]
    if self.config.model.get("init", "pytorch") == "pytorch":
      params = reference_init(params, self.hf_config, jax.random.fold_in(rng, 1))
    return params

  def logits(self, params, batch, deterministic=True, rng=None):
    """[B, B] image-caption logits; [2B, 2B] with the batch's twins after its examples."""
    images, ids, mask = batch["image"], batch["input_ids"], batch["attention_mask"]
    if "twin_image" in batch:
      images = jnp.concatenate([images, batch["twin_image"]])
      ids = jnp.concatenate([ids, batch["twin_input_ids"]])
      mask = jnp.concatenate([mask, batch["twin_attention_mask"]])
    pixels = clip_lib.preprocess_images(images, self.preprocess)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    out = self.module.apply({"params": params}, ids, pixels, mask, positions,
                            deterministic=deterministic, rngs=None if rng is None else {"dropout": rng})
    return out.logits_per_image

  def loss(self, params, batch, rng):
    logits = self.logits(params, batch, deterministic=False, rng=rng)
    loss = contrastive = contrastive_loss(logits)
    n = logits.shape[0]
    metrics = {"contrastive": contrastive, "retrieval_accuracy": jnp.mean(jnp.argmax(logits, axis=1) == jnp.arange(n))}
    if "twin_image" in batch:
      loss = loss + self.config.get("twin_loss_weight", 1.0) * twin_loss(logits)
      image_pairs, _ = _twin_pairs(logits)
      metrics["twin_accuracy"] = jnp.mean(image_pairs[:, 0] > image_pairs[:, 1])  # image prefers its own caption
    return loss, metrics

  def _tokenize(self, captions):
    enc = self.tokenizer(list(captions), padding="max_length", truncation=True,
                         max_length=self.config.model.get("max_length", 77), return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)

  def encode_batch(self, host_batch):
    ids, mask = self._tokenize(host_batch["caption"])
    images = np.asarray(host_batch["image"])
    out = {"image": images, "input_ids": ids, "attention_mask": mask}
    if self.config.get("twins", False):
      # Example i's twin is drawn from its stream index: the same on resume and on any host count.
      twins = []
      for caption, index in zip(host_batch["caption"], host_batch["index"]):
        scene = shapes_data.sample_scene(self.config.data.seed, int(index))
        if scene.caption != caption:
          raise ValueError(f"Example {int(index)} is not Shapes scene {int(index)} of seed {self.config.data.seed}; "
                           "config.twins needs the Shapes stream the config names.")
        twins.append(shapes_data.twin(scene, np.random.default_rng([int(index), 7])))
      out["twin_image"] = np.stack([shapes_data.render(t, images.shape[1]) for t in twins])
      out["twin_input_ids"], out["twin_attention_mask"] = self._tokenize([t.caption for t in twins])
    return out

  def sample_images(self, params, rng):
    return None

  def inference_config(self):
    return {"stage": "clip"}

  def export(self, params, export_dir: str):
    """The trained CLIP as a Hugging Face folder with its tokenizer."""
    write_clip_folder(export_dir, self.hf_config, params, self.config.model.image_size, self.tokenizer)
