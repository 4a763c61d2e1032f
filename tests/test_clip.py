"""Frozen CLIP: parity with transformers' PyTorch CLIP on a tiny random model,
preprocessing against CLIPImageProcessor, truncation, errors and frozenness."""

import json
import string

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
  CLIPConfig,
  CLIPImageProcessor,
  CLIPModel,
  CLIPTextConfig,
  CLIPTextModelWithProjection,
  CLIPTokenizer,
  CLIPVisionConfig,
)

from unclip_jax.models import clip

IMAGE_SIZE = 30


def write_tokenizer(folder):
  """A tiny byte-level BPE vocabulary: letters, a few merges, then BOS and EOS
  (EOS has the largest id, as in OpenAI's vocabulary)."""
  letters = list(string.ascii_lowercase)
  merges = ["l o", "lo w</w>", "e r</w>", "n e", "ne w", "new er</w>", "c a", "ca t</w>"]
  vocab = letters + [c + "</w>" for c in letters] + ["lo", "low</w>", "er</w>", "ne", "new", "newer</w>", "ca",
                                                     "cat</w>", "<unk>", "<|startoftext|>", "<|endoftext|>"]
  (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
  tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
  tok.save_pretrained(str(folder))
  return len(vocab)


def text_config(vocab_size):
  return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=77, projection_dim=16,
                        bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """A full CLIP folder and a text-only (Karlo-style) one, PyTorch safetensors."""
  torch.manual_seed(0)
  full = tmp_path_factory.mktemp("clip_full")
  vocab_size = write_tokenizer(full)
  vision = CLIPVisionConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=6, projection_dim=16)
  config = CLIPConfig.from_text_vision_configs(text_config(vocab_size), vision, projection_dim=16)
  model = CLIPModel(config).eval()
  model.save_pretrained(str(full), safe_serialization=True)
  processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                 crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
  processor.save_pretrained(str(full))
  text_only = tmp_path_factory.mktemp("clip_text")
  write_tokenizer(text_only)
  text_model = CLIPTextModelWithProjection(text_config(vocab_size)).eval()
  text_model.save_pretrained(str(text_only), safe_serialization=True)
  return dict(full=str(full), text=str(text_only), model=model, text_model=text_model, processor=processor)


PROMPTS = ["a cat", "newer lower", "", "the quick brown fox jumps over the lazy dog"]


def _torch_ids(folder, prompts):
  tok = CLIPTokenizer.from_pretrained(folder)
  return tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")


def test_text_parity_full_clip(folders):
  ours = clip.load_clip(folders["full"])
  enc = ours.encode_text(PROMPTS)
  inputs = _torch_ids(folders["full"], PROMPTS)
  with torch.no_grad():  # as Karlo's pipeline: no attention mask into the text tower
    out = folders["model"].text_model(inputs.input_ids)
    z_t = folders["model"].text_projection(out.pooler_output)
  assert enc.embedding.shape == (4, 16) and enc.tokens.shape == (4, 77, 32) and enc.mask.shape == (4, 77)
  np.testing.assert_allclose(enc.embedding, z_t.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(enc.tokens, out.last_hidden_state.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_array_equal(enc.mask, inputs.attention_mask.numpy().astype(bool))
  # The empty prompt is BOS, EOS and padding.
  assert enc.mask[2].sum() == 2


def test_text_parity_text_only_folder(folders):
  ours = clip.load_clip(folders["text"])
  assert ours.vision_module is None
  enc = ours.encode_text(PROMPTS)
  inputs = _torch_ids(folders["text"], PROMPTS)
  with torch.no_grad():
    out = folders["text_model"](inputs.input_ids)
  np.testing.assert_allclose(enc.embedding, out.text_embeds.numpy(), rtol=0, atol=1e-5)
  np.testing.assert_allclose(enc.tokens, out.last_hidden_state.numpy(), rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="text encoder only"):
    ours.encode_image(np.zeros((1, 30, 30, 3), np.uint8))


def test_flax_weights_folder(folders, tmp_path):
  """A folder with flax_model.msgpack (no PyTorch weights) loads to the same model."""
  from transformers import FlaxCLIPTextModelWithProjection
  FlaxCLIPTextModelWithProjection.from_pretrained(folders["text"], from_pt=True).save_pretrained(str(tmp_path))
  CLIPTokenizer.from_pretrained(folders["text"]).save_pretrained(str(tmp_path))
  assert not list(tmp_path.glob("*.safetensors"))
  a = clip.load_clip(str(tmp_path)).encode_text(PROMPTS)
  b = clip.load_clip(folders["text"]).encode_text(PROMPTS)
  np.testing.assert_array_equal(a.embedding, b.embedding)


def test_long_prompts_truncated_with_warning(folders):
  ours = clip.load_clip(folders["text"])
  long_prompt = " ".join(["cat"] * 100)
  with pytest.warns(UserWarning, match="truncated"):
    enc = ours.encode_text([long_prompt, "cat"])
  ids, _ = ours.tokenize([" ".join(["cat"] * 75)])  # exactly 77 tokens with BOS and EOS: no truncation
  assert ids.shape == (1, 77)
  assert bool(enc.mask[0].all())
  inputs = _torch_ids(folders["text"], [long_prompt])
  assert inputs.input_ids[0, -1].item() == ours.tokenizer.eos_token_id  # truncation keeps EOS
  with torch.no_grad():
    expected = folders["text_model"](inputs.input_ids).text_embeds.numpy()
  np.testing.assert_allclose(enc.embedding[:1], expected, rtol=0, atol=1e-5)


def _smooth_images(rng, shape):
  """Random images with structure at several scales (pure pixel noise is the
  worst case for any two resamplers and not what CLIP sees)."""
  b, h, w, _ = shape
  coarse = rng.uniform(0, 255, (b, max(h // 4, 2), max(w // 4, 2), 3))
  up = jax.image.resize(jnp.asarray(coarse), (b, h, w, 3), "linear")
  return np.clip(np.asarray(up) + rng.normal(0, 20, shape), 0, 255).round().astype(np.uint8)


def test_image_parity_at_exact_size(folders):
  """No resize needed: preprocessing and embedding both match to float32 precision."""
  ours = clip.load_clip(folders["full"])
  images = np.random.default_rng(0).integers(0, 256, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
  pixels = folders["processor"](list(images), return_tensors="np").pixel_values  # [B, 3, H, W]
  got_pixels = clip.preprocess_images(images, ours.preprocess)
  np.testing.assert_allclose(got_pixels, pixels.transpose(0, 2, 3, 1), rtol=0, atol=1e-5)
  with torch.no_grad():
    expected = folders["model"].get_image_features(torch.from_numpy(pixels)).numpy()
  np.testing.assert_allclose(ours.encode_image(images), expected, rtol=0, atol=1e-5)
  # float images in [0, 1] and in [-1, 1] give the same embedding
  np.testing.assert_allclose(ours.encode_image(images / 255.0), expected, rtol=0, atol=1e-5)
  np.testing.assert_allclose(ours.encode_image(images / 127.5 - 1.0, value_range=(-1, 1)), expected, rtol=0,
                             atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 45, 61, 3), (2, 97, 40, 3), (2, 20, 26, 3)])
def test_resize_crop_close_to_clip_image_processor(folders, shape):
  """Against PIL's bicubic resize in CLIPImageProcessor. Both use the antialiased
  Keys cubic (a = -0.5) on pixel centres, but PIL rounds to uint8 between its two
  separable passes and uses fixed-point weights; that gives differences of a
  few 1/255. Tolerance in normalised units (one grey level is 1/255/std ~ 0.015):
  mean |diff| < 0.005 (a third of a level; measured ~0.003) and max |diff| <
  0.07 (4.5 levels; measured up to ~0.045)."""
  ours = clip.load_clip(folders["full"])
  images = _smooth_images(np.random.default_rng(1), shape)
  expected = folders["processor"](list(images), return_tensors="np").pixel_values.transpose(0, 2, 3, 1)
  got = np.asarray(clip.preprocess_images(images, ours.preprocess))
  assert got.shape == expected.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3)
  diff = np.abs(got - expected)
  assert diff.mean() < 0.005, diff.mean()
  assert diff.max() < 0.07, diff.max()
  # The embedding of our pixels is torch's embedding of the same pixels.
  with torch.no_grad():
    ref = folders["model"].get_image_features(torch.from_numpy(got.transpose(0, 3, 1, 2).copy())).numpy()
  np.testing.assert_allclose(ours.encode_image(images), ref, rtol=0, atol=1e-5)


def test_resized_shape_matches_transformers():
  from transformers.image_transforms import get_resize_output_image_size
  for h, w in [(45, 61), (97, 40), (30, 30), (31, 1000), (224, 225)]:
    expected = get_resize_output_image_size(np.zeros((h, w, 3)), 30, default_to_square=False,
                                            input_data_format="channels_last")
    assert clip.resized_shape(h, w, 30) == tuple(expected)


def test_outputs_carry_no_gradient(folders):
  ours = clip.load_clip(folders["full"])
  images = np.random.default_rng(2).uniform(0, 1, (1, IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.float32)

  def f(params):
    return jnp.sum(ours._text_fn(params, ours.tokenize("a cat")[0])[0]) + jnp.sum(
        ours._image_fn(params, images, value_range=(0.0, 1.0)))

  grads = jax.grad(f)(ours.params)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_bad_inputs_give_clear_errors(folders, tmp_path):
  with pytest.raises(FileNotFoundError, match="save_pretrained"):
    clip.load_clip(str(tmp_path / "clip-vit-large-patch14"))
  ours = clip.load_clip(folders["full"])
  with pytest.raises(ValueError, match=r"\[B, H, W, 3\]"):
    ours.encode_image(np.zeros((2, 3, 30, 30), np.uint8))
  with pytest.raises(ValueError, match="list of strings"):
    ours.encode_text([])
