"""Sharded train step, state creation and checkpoints on 8 fake CPU devices."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unclip_jax import checkpoints, parallel, training


def _init(rng):
  k1, k2 = jax.random.split(rng)
  return {"dense1": {"kernel": jax.random.normal(k1, (16, 32)) * 0.3, "bias": jnp.zeros(32)},
          "dense2": {"kernel": jax.random.normal(k2, (32, 4)) * 0.3, "bias": jnp.zeros(4)}}


def _loss(params, batch, rng):
  """A noisy regression: randomness inside the loss, as in diffusion training."""
  x = batch["x"] + 0.1 * jax.random.normal(rng, batch["x"].shape)
  h = jnp.tanh(x @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  pred = h @ params["dense2"]["kernel"] + params["dense2"]["bias"]
  loss = jnp.mean((pred - batch["y"]) ** 2)
  return loss, {"mse": loss}


def _batch(n=16, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.standard_normal((n, 16)).astype(np.float32),
          "y": rng.standard_normal((n, 4)).astype(np.float32)}


def _run(mesh, steps=3, grad_accum_steps=1, loss=_loss):
  tx = optax.adamw(1e-2, weight_decay=0.01)
  state, shardings = training.create_train_state(_init, tx, jax.random.key(0), mesh)
  step = training.jit_train_step(
      training.make_train_step(loss, tx, ema_decay=0.9, grad_accum_steps=grad_accum_steps), shardings, mesh)
  for i in range(steps):
    state, metrics = step(state, parallel.global_batch(_batch(seed=i), mesh))
  return state, metrics


def test_sharded_step_equals_single_device():
  assert jax.device_count() == 8
  sharded_state, sharded_metrics = _run(parallel.make_mesh({"data": 2, "fsdp": 4}))
  single_state, single_metrics = _run(parallel.make_mesh({"data": 1}, devices=jax.devices()[:1]))
  np.testing.assert_allclose(sharded_metrics["loss"], single_metrics["loss"], rtol=1e-5)
  for tree in ("params", "ema_params"):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 getattr(sharded_state, tree), getattr(single_state, tree))


def test_parameters_and_batch_are_really_split():
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  state, _ = _run(mesh, steps=1)
  kernel = state.params["dense1"]["kernel"]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  assert kernel.addressable_shards[0].data.shape == (4, 32)
  mu = state.opt_state[0].mu["dense1"]["kernel"]  # Adam's moments follow their parameter
  assert mu.addressable_shards[0].data.shape == (4, 32)
  assert state.ema_params["dense1"]["kernel"].addressable_shards[0].data.shape == (4, 32)
  batch = parallel.global_batch(_batch(), mesh)
  assert batch["x"].addressable_shards[0].data.shape == (2, 16)
  assert len({s.index[0].start for s in batch["x"].addressable_shards}) == 8  # 8 distinct row blocks


def _noiseless_loss(params, batch, rng):
  del rng
  h = jnp.tanh(batch["x"] @ params["dense1"]["kernel"] + params["dense1"]["bias"])
  loss = jnp.mean((h @ params["dense2"]["kernel"] + params["dense2"]["bias"] - batch["y"]) ** 2)
  return loss, {}


def test_gradient_accumulation_equals_the_full_batch():
  mesh = parallel.make_mesh({"data": 1}, devices=jax.devices()[:1])
  full, full_metrics = _run(mesh, steps=2, loss=_noiseless_loss)
  accumulated, acc_metrics = _run(mesh, steps=2, loss=_noiseless_loss, grad_accum_steps=4)
  np.testing.assert_allclose(full_metrics["loss"], acc_metrics["loss"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), full.params,
               accumulated.params)


def test_mesh_errors_are_clear():
  with pytest.raises(ValueError, match="Unknown mesh axes"):
    parallel.make_mesh({"model": 2})
  with pytest.raises(ValueError, match="need 6 devices"):
    parallel.make_mesh({"data": 2, "fsdp": 3})
  with pytest.raises(ValueError, match="Only one mesh axis"):
    parallel.make_mesh({"data": -1, "fsdp": -1})


def test_checkpoint_round_trip_keeps_values_and_shardings(tmp_path):
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  state, _ = _run(mesh, steps=2)
  tx = optax.adamw(1e-2, weight_decay=0.01)
  _, shardings = training.create_train_state(_init, tx, jax.random.key(0), mesh)
  ckpt = checkpoints.Checkpointer(str(tmp_path), save_every=1)
  ckpt.save(2, state, {"position": 32})
  ckpt.wait()
  target = training.abstract_state(_init, tx, jax.random.key(0), shardings)
  restored, meta = ckpt.restore(target)
  assert meta == {"position": 32} and ckpt.latest_step() == 2
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), restored, state)
  assert restored.params["dense1"]["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
  ckpt.close()


def test_inference_export_round_trip_and_error(tmp_path):
  params = _init(jax.random.key(1))
  checkpoints.export_inference(str(tmp_path / "export"), params, {"stage": "toy"})
  loaded, config = checkpoints.load_inference(str(tmp_path / "export"))
  assert config == {"stage": "toy"}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), loaded, params)
  with pytest.raises(FileNotFoundError, match="not an inference checkpoint"):
    checkpoints.load_inference(str(tmp_path))


def test_shard_map_sampling_equals_the_unsharded_batch():
  """Per-device sampling of batch shards (shard_map) gives the unsharded images."""
  from unclip_jax.diffusion import samplers, schedules

  mesh = parallel.make_mesh({"data": 2, "fsdp": 4})
  schedule = schedules.make_schedule("cosine", 1000, num_steps=10)
  model_fn = lambda x, t: jnp.tanh(x * 0.5 + t[:, None, None, None] / 1000.0)
  x_T = jax.random.normal(jax.random.key(0), (16, 4, 4, 3))
  run = lambda x: samplers.sample(model_fn, schedule, jax.random.key(1), x, sampler="ddim", clip_range=1.0)
  whole = jax.jit(run)(x_T)
  per_device = jax.jit(parallel.shard_map_over_batch(run, mesh))(x_T)
  assert len(per_device.sharding.device_set) == 8
  np.testing.assert_allclose(per_device, whole, rtol=1e-6, atol=1e-6)


def test_train_step_ema_warms_up_so_the_init_does_not_linger():
  """Params jump from 0 to 1 at the first step; the EMA's share of the 0 init
  after T steps is prod_{s<T} min(decay, (1 + s) / (10 + s))."""
  jump_to_one = optax.GradientTransformation(
      lambda params: optax.EmptyState(),
      lambda grads, state, params: (jax.tree.map(lambda p: 1.0 - p, params), state))
  loss = lambda params, batch, rng: (jnp.sum(params["w"]), {})
  step = jax.jit(training.make_train_step(loss, jump_to_one, ema_decay=0.999))
  state = training.TrainState(step=jnp.zeros((), jnp.int32), params={"w": jnp.zeros(3)}, opt_state=optax.EmptyState(),
                              ema_params={"w": jnp.zeros(3)}, rng=jax.random.key_data(jax.random.key(0)))
  for _ in range(200):
    state, _ = step(state, None)
  s = np.arange(200)
  init_share = np.prod(np.minimum(0.999, (1 + s) / (10 + s)))
  np.testing.assert_allclose(state.ema_params["w"], 1 - init_share, rtol=1e-5)
  assert init_share < 0.01 < 0.999 ** 200  # without the warm-up 82 % of the init would remain
