"""Each stage through train.py's path: the real loop, the real data, tiny configs."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import shapes
from unclip_jax import checkpoints, parallel, resume, train_loop, training
from unclip_jax.convert import scan_layout
from unclip_jax.data import batches as data_batches
from unclip_jax.data import ordering
from unclip_jax.data import shapes as shapes_data
from unclip_jax.models import clip as clip_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import build
from unclip_jax.stages import clip as clip_stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_word_tokenizer_keeps_every_word_whole(tmp_path):
  words = list(shapes.VOCABULARY) + ["tr", "rig", "triangles", "aa"]  # prefixes that fight over merges
  tok = clip_stage.write_word_tokenizer(words, str(tmp_path), 16)
  for w in words:
    assert tok.tokenize(w) == [w + "</w>"]
  ids = tok("a blue triangle right of a red triangle")["input_ids"]
  assert len(ids) == 10 and ids[-1] == max(tok.get_vocab().values())  # EOS has the largest id
  assert tok.tokenize("zebra")[:2] == ["z", "e"]  # unknown words fall back to bytes


def test_clip_stage_learns_and_exports_a_loadable_clip(tmp_path):
  config = shapes.get_config("clip,tiny")
  stage = clip_stage.ClipStage(config, str(tmp_path))
  batch = stage.encode_batch(next(shapes_data.batches(0, 32, 16)))
  params = stage.init_params(jax.random.key(0))
  tx = train_loop.make_optimizer(config)[0]
  state = training.init_state(lambda r: params, tx, jax.random.key(1))
  step = jax.jit(training.make_train_step(stage.loss, tx, ema_decay=0.0))
  first = None
  for _ in range(150):
    state, metrics = step(state, batch)
    first = first if first is not None else float(metrics["loss"])
  # From scratch the tiny towers first sit near log(16); measured: 3.34 -> 1.29, accuracy 0.31.
  assert float(metrics["loss"]) < 0.5 * first and float(metrics["retrieval_accuracy"]) >= 0.25  # chance 1/16
  # The exported folder loads as a frozen CLIP that computes what the module computes.
  stage.export(state.params, str(tmp_path / "export"))
  frozen = clip_lib.load_clip(str(tmp_path / "export"))
  captions = ["a red circle", "a blue square above a green triangle"]
  enc = stage.tokenizer(captions, padding="max_length", max_length=16, return_tensors="np")
  positions = jnp.broadcast_to(jnp.arange(16), enc["input_ids"].shape)
  expected = stage.module.apply({"params": state.params}, enc["input_ids"], enc["attention_mask"], positions,
                                method=lambda m, i, a, p: m.text_projection(m.text_model(i, a, p)[1]))
  np.testing.assert_allclose(frozen.encode_text(captions).embedding, expected, rtol=1e-5, atol=1e-5)


def test_clip_stage_init_matches_pytorch_clip(tmp_path):
  # Every tensor's spread equals what transformers' PyTorch CLIPModel draws for the same config
  # (Flax's CLIP draws all kernels with std 0.01, which left the text tower unable to learn word order).
  torch = pytest.importorskip("torch")
  from transformers import CLIPModel

  config = shapes.get_config("clip,tiny")
  stage = clip_stage.ClipStage(config, str(tmp_path))
  params = stage.init_params(jax.random.key(0))
  torch_leaf = {"kernel": "weight", "embedding": "weight", "scale": "weight"}
  ours = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(k, "key", str(k)) for k in path]
    ours[".".join(names[:-1] + [torch_leaf.get(names[-1], names[-1])] if len(names) > 1 else names)] = np.asarray(x)
  torch.manual_seed(0)
  reference = {k: v.numpy() for k, v in CLIPModel(stage.hf_config).state_dict().items()
               if not k.endswith("position_ids")}
  assert set(reference) == set(ours)
  for name, value in reference.items():
    assert ours[name].shape == value.T.shape or ours[name].size == value.size, name
    np.testing.assert_allclose(ours[name].std(), value.std(), rtol=0.15, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(ours[name].mean(), value.mean(), atol=5 * value.std() / np.sqrt(value.size) + 1e-6,
                               err_msg=name)  # zero-mean draws
  assert ours["text_model.encoder.layers.0.self_attn.q_proj.weight"].std() > 0.05  # not Flax's 0.01
  config.model.init = "flax"  # the old init stays reachable (the shipped demo CLIP was trained from it)
  flax_params = clip_stage.ClipStage(config, str(tmp_path / "flax")).init_params(jax.random.key(0))
  np.testing.assert_allclose(flax_params["text_model"]["encoder"]["layers"]["0"]["self_attn"]["q_proj"]["kernel"].std(),
                             0.01, rtol=0.15)


def test_contrastive_and_twin_losses_are_the_closed_form():
  rng = np.random.default_rng(0)
  b = 3
  logits = rng.normal(size=(2 * b, 2 * b)) * 3  # 3 examples, then their 3 twins
  log_softmax = lambda x: x - np.log(np.exp(x).sum(axis=1, keepdims=True))
  expected = (-np.mean(np.diagonal(log_softmax(logits))) - np.mean(np.diagonal(log_softmax(logits.T)))) / 2
  np.testing.assert_allclose(clip_stage.contrastive_loss(jnp.asarray(logits, jnp.float32)), expected, rtol=1e-5)
  terms = []
  for k in range(2 * b):
    twin = (k + b) % (2 * b)
    terms.append(-log_softmax(np.array([[logits[k, k], logits[k, twin]]]))[0, 0])  # image k: own vs twin's caption
    terms.append(-log_softmax(np.array([[logits[k, k], logits[twin, k]]]))[0, 0])  # caption k: own vs twin's image
  np.testing.assert_allclose(clip_stage.twin_loss(jnp.asarray(logits, jnp.float32)), np.mean(terms), rtol=1e-5)


def test_clip_stage_twins(tmp_path):
  config = shapes.get_config("clip,tiny")
  config.twins, config.twin_loss_weight = True, 0.5
  stage = clip_stage.ClipStage(config, str(tmp_path))
  host = next(shapes_data.batches(0, 32, 8, start=40))
  batch = stage.encode_batch(host)
  decoded = [stage.tokenizer.decode(ids, skip_special_tokens=True) for ids in batch["twin_input_ids"]]
  for k, index in enumerate(host["index"]):
    twin = shapes_data.twin(shapes_data.sample_scene(0, int(index)), np.random.default_rng([int(index), 7]))
    assert decoded[k] == twin.caption
    np.testing.assert_array_equal(batch["twin_image"][k], shapes_data.render(twin, 32))
  np.testing.assert_array_equal(stage.encode_batch(host)["twin_image"], batch["twin_image"])
  params = stage.init_params(jax.random.key(0))
  logits = np.asarray(stage.logits(params, batch))
  assert logits.shape == (16, 16)
  loss, metrics = stage.loss(params, batch, jax.random.key(1))
  np.testing.assert_allclose(loss, clip_stage.contrastive_loss(logits) + 0.5 * clip_stage.twin_loss(logits), rtol=1e-5)
  twins = (np.arange(16) + 8) % 16
  np.testing.assert_allclose(metrics["twin_accuracy"], np.mean(np.diagonal(logits) > logits[np.arange(16), twins]))
  with pytest.raises(ValueError, match="not Shapes scene"):
    stage.encode_batch(dict(host, caption=list(host["caption"][::-1])))
  config.data.kind = "tfds"
  with pytest.raises(ValueError, match="needs config.data.kind = 'shapes'"):
    clip_stage.ClipStage(config, str(tmp_path / "tfds"))


def _one_step(stage, batch, mesh):
  # Plain SGD, so that the update is linear in the gradient: Adam's first step is
  # ~lr * sign(g), which turns reduction-order noise in near-zero gradients into
  # O(lr) differences (CI once saw 1.9e-5 of lr 1e-3).
  tx = optax.sgd(1.0)
  state, shardings = training.create_train_state(stage.init_params, tx, jax.random.key(0), mesh)
  step = training.jit_train_step(training.make_train_step(stage.loss, tx, ema_decay=0.9), shardings, mesh)
  state, metrics = step(state, parallel.global_batch(batch, mesh))
  return state, metrics


@pytest.mark.parametrize("stage_name", ["prior", "decoder"])
def test_sharded_step_equals_one_device(stage_name, tmp_path, shapes_clip_dir):
  config = shapes.get_config(f"{stage_name},tiny")
  config.clip_dir = shapes_clip_dir
  stage, batches = build.build(config, str(tmp_path))
  batch = stage.encode_batch(next(batches(0)))
  sharded, m_sharded = _one_step(stage, batch, parallel.make_mesh({"data": 2, "fsdp": 4}))
  single, m_single = _one_step(stage, batch, parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  np.testing.assert_allclose(m_sharded["loss"], m_single["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), sharded.params, single.params)
  big = max(jax.tree.leaves(sharded.params), key=lambda x: x.size)
  assert big.addressable_shards[0].data.size < big.size  # really split, not replicated


def test_train_py_reports_bad_config_clearly(tmp_path):
  def run(*args):
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  out = run("--config", "configs/shapes.py:prior,tiny", "--workdir", str(tmp_path), "--config.no_such_key=1")
  assert out.returncode != 0 and "the config has no key 'no_such_key'" in out.stderr
  assert "Traceback" not in out.stderr
  out = run("--config", "configs/shapes.py:prior,tiny", "--workdir", str(tmp_path),
            f"--config.clip_dir={tmp_path}/missing")
  assert out.returncode != 0 and "config.clip_dir" in out.stderr and "Traceback" not in out.stderr
  out = run("--config", "configs/shapes.py:sr1", "--workdir", str(tmp_path), "--config.total_steps=10")
  assert out.returncode != 0 and "cosine decay needs total_steps greater than warmup_steps" in out.stderr
  assert "Traceback" not in out.stderr


def test_upsampler_conditioning_is_degraded_per_example_and_reproducible(tmp_path):
  config = shapes.get_config("sr2,tiny")
  stage, batches = build.build(config, str(tmp_path))
  host = next(batches(0))
  a, b = stage.encode_batch(host), stage.encode_batch(host)
  np.testing.assert_array_equal(a["low_res"], b["low_res"])  # seeded by the example's stream index
  assert a["low_res"].shape == (8, 32, 32, 3) and a["image"].shape == (8, 64, 64, 3)  # 32 -> 64
  plain = np.asarray(jax.image.resize(a["image"], (8, 32, 32, 3), "linear", antialias=True))
  assert np.abs(a["low_res"] - plain).mean() > 0.01  # BSR did more than resize


def test_upsampler_low_res_from_the_data_workers_equals_the_stages_own(tmp_path):
  """From a folder, the BSR input is made in grain's worker processes (upsampler.example_fn), seeded by
  each example's global position: the same arrays as the stage degrading the same batch itself."""
  from PIL import Image

  folder = tmp_path / "images"
  folder.mkdir()
  rng = np.random.default_rng(0)
  for i in range(8):
    Image.fromarray(rng.integers(0, 256, (80, 72, 3), np.uint8)).save(folder / f"{i}.png")
    (folder / f"{i}.txt").write_text(f"image {i}")
  config = shapes.get_config("sr2,tiny")
  config.data.update(kind="folder", path=str(folder), workers=2)
  stage, batches = build.build(config, str(tmp_path / "run"))
  host = next(batches(8))
  from_workers = stage.encode_batch(host)
  own = stage.encode_batch({k: v for k, v in host.items() if k != "low_res"})
  np.testing.assert_array_equal(from_workers["low_res"], own["low_res"])
  assert from_workers["low_res"].shape == (8, 32, 32, 3)


# tests/test_shapes_demo.py runs every stage through train.py on the Shapes world and checks their
# exports; this one adds a tensorflow-datasets source, with the decoder, the stage that reads both
# the images and the captions (the upsamplers read the images only).
@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["decoder"])
def test_stage_trains_on_shapes_and_tfds_mock_data(stage_name, tmp_path, shapes_clip_dir):
  """Through the real loop: step 1 on the Shapes world, step 2 on tfds mock coco_captions
  (one compile serves both); then the sample grid and the export."""
  import tensorflow_datasets as tfds
  from PIL import Image

  config = shapes.get_config(f"{stage_name},tiny")
  config.clip_dir = shapes_clip_dir
  config.sample_every = 2
  tfds_data = ml_collections.ConfigDict(dict(kind="tfds", name="coco_captions", split="train", image_key="image",
                                             caption_key="captions/text", data_dir=None, seed=0))
  with tfds.testing.mock_data(num_examples=16):  # it mocks file access too: read the batch, then leave
    tfds_batch = next(data_batches.make_batches(tfds_data, config.batch_size, config.resolution)(0))
  stage, shapes_batches = build.build(config, str(tmp_path))
  seen = []

  def both(start, rows=None):
    tfds_rows = config.batch_size + ordering.check_rows(rows, config.batch_size)  # the second global batch
    for name, batch in (("shapes", next(shapes_batches(start, rows))), ("tfds", dict(tfds_batch, index=tfds_rows))):
      seen.append((name, batch["image"].shape))
      yield batch

  state = train_loop.train(config, str(tmp_path), stage, both)
  assert int(state.step) == 2 and [name for name, _ in seen] == ["shapes", "tfds"]
  assert seen[0][1] == seen[1][1] == (8, config.resolution, config.resolution, 3)
  params, exported = checkpoints.load_inference(str(tmp_path / "export"))
  assert exported["stage"] == stage_name
  assert unet_lib.UNetConfig.from_dict(exported["model"]) == stage.unet_config  # JSON round trip
  # The tree init_params makes, traced without compiling it (an init compile of its own, ~20 % of this test).
  fresh = jax.eval_shape(stage.init_params, jax.random.key(0))
  assert jax.tree.structure(params) == jax.tree.structure(fresh)
  assert jax.tree.map(np.shape, params) == jax.tree.map(np.shape, fresh)
  grid = np.asarray(Image.open(tmp_path / "samples" / "step_00000002.png"))
  size = config.get("decoder_resolution", config.resolution)
  assert grid.shape[1] == stage.grid_columns * (size + 2) + 2  # whole [original, sample, ...] groups per row


def test_resume_converts_a_checkpoint_of_the_other_scan_layout(tmp_path, shapes_clip_dir):
  """A run checkpointed unscanned resumes through train() with scan_layers=True (configs/paper.py's prior
  scans since), and a scanned checkpoint restores unscanned: params, EMA and Adam moments arrive converted
  bit for bit."""
  def setup(scan: bool):
    config = shapes.get_config("prior,tiny")
    config.update(clip_dir=shapes_clip_dir, total_steps=2, checkpoint_every=1, sample_every=0)
    config.model.scan_layers = scan
    return config, *build.build(config, str(tmp_path / "run"))

  def assert_converted(got, want, convert):
    want = jax.device_get(training.map_param_trees(want, convert))
    assert jax.tree.structure(got) == jax.tree.structure(want)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), want)

  # An unscanned run's checkpoint at step 2: Adam moments and EMA away from their initial values.
  config, plain_stage, _ = setup(False)
  tx, _ = train_loop.make_optimizer(config)

  @jax.jit
  def two_steps_on(rng):
    state = training.init_state(plain_stage.init_params, tx, rng)
    for i in range(2):  # random gradients
      leaves, treedef = jax.tree.flatten(state.params)
      keys = jax.random.split(jax.random.fold_in(rng, i), len(leaves))
      grads = treedef.unflatten([jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=jax.tree.map(lambda e, p: 0.5 * (e + p), state.ema_params, params))
    return state

  unscanned = two_steps_on(jax.random.key(0))
  ckpt = checkpoints.Checkpointer(str(tmp_path / "run"), save_every=1, async_save=False)
  ckpt.save(2, unscanned, {"position": 2 * config.batch_size})
  ckpt.close()
  # The same workdir, now scanned: train() restores step 2 converted (and has no step left to run).
  config, stage, batches = setup(True)
  scanned = train_loop.train(config, str(tmp_path / "run"), stage, batches)
  assert int(scanned.step) == 2 and "blocks" in scanned.params
  assert_converted(scanned, unscanned, lambda p: scan_layout.to_scanned(p, stage.model_config))

  # Back: a scanned checkpoint into the unscanned config.
  ckpt = checkpoints.Checkpointer(str(tmp_path / "scanned"), save_every=1, async_save=False)
  ckpt.save(2, scanned, {"position": 0})
  mesh = parallel.make_mesh(dict(config.mesh))
  state_shapes = jax.eval_shape(lambda r: training.init_state(plain_stage.init_params, tx, r), jax.random.key(0))
  abstract = training.with_shardings(state_shapes, training.state_shardings(state_shapes, mesh))
  restored, meta = resume.restore_in_any_layout(ckpt, abstract, plain_stage.model_config, mesh)
  ckpt.close()
  assert meta == {"position": 0}
  assert_converted(restored, scanned, lambda p: scan_layout.to_unscanned(p, plain_stage.model_config))
