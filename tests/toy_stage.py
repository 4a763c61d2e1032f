"""A tiny stage for testing the training loop itself; also runnable as a script:

  python tests/toy_stage.py WORKDIR TOTAL_STEPS [STEP_SLEEP_SECONDS]
"""

import os
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unclip_jax.data import ordering


class ToyStage:
  """Noisy regression; the noise makes the rng's resume behaviour visible.

  hidden > 0 adds a tanh layer of that width (kernels large enough to be split
  by FSDP), else the model is linear.
  """

  def __init__(self, sleep: float = 0.0, hidden: int = 0):
    self.sleep = sleep
    self.hidden = hidden

  def init_params(self, rng):
    if not self.hidden:
      return {"dense": {"kernel": jax.random.normal(rng, (8, 16)) * 0.1, "bias": jnp.zeros(16)}}
    k1, k2 = jax.random.split(rng)
    return {"dense": {"kernel": jax.random.normal(k1, (8, self.hidden)) * 0.3, "bias": jnp.zeros(self.hidden)},
            "out": {"kernel": jax.random.normal(k2, (self.hidden, 16)) * self.hidden ** -0.5, "bias": jnp.zeros(16)}}

  def loss(self, params, batch, rng):
    x = batch["x"] + 0.05 * jax.random.normal(rng, batch["x"].shape)
    pred = x @ params["dense"]["kernel"] + params["dense"]["bias"]
    if self.hidden:
      pred = jnp.tanh(pred) @ params["out"]["kernel"] + params["out"]["bias"]
    loss = jnp.mean((pred - batch["y"]) ** 2)
    return loss, {"mse": loss}

  def encode_batch(self, host_batch):
    if self.sleep:
      time.sleep(self.sleep)
    return host_batch

  def sample_images(self, params, rng):
    k = np.asarray(params["dense"]["kernel"])
    return np.repeat(((k - k.min()) / (np.ptp(k) + 1e-9) * 255).astype(np.uint8)[None, :, :, None], 3, -1)

  def inference_config(self):
    return {"stage": "toy"}


def toy_batches(start, rows=None, batch_size=8):
  """Example i is a function of i alone, so a resumed stream is the same stream."""
  for idx in ordering.host_batch_positions(start, batch_size, rows):
    rngs = [np.random.default_rng(int(i)) for i in idx]
    x = np.stack([r.standard_normal(8) for r in rngs]).astype(np.float32)
    yield {"x": x, "y": np.tanh(x @ np.ones((8, 16), np.float32) / 4), "index": idx}


def toy_config(total_steps=6, **overrides):
  c = ml_collections.ConfigDict(dict(
      stage="toy", seed=0, mesh={"data": -1}, logical_axis_rules=[["batch", ["data", "fsdp"]],
                                                                  ["embed", "fsdp"], ["mlp", "tensor"]],
      batch_size=8, total_steps=total_steps, grad_accum_steps=1, ema_decay=0.9, log_every=2,
      checkpoint_every=3, keep_checkpoints=5, sample_every=0,
      optim=dict(learning_rate=1e-2, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0,
                 warmup_steps=0, decay="constant")))
  c.update(overrides)
  return c


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from unclip_jax import train_loop
  workdir, total = sys.argv[1], int(sys.argv[2])
  sleep = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
  train_loop.train(toy_config(total, checkpoint_every=1 if sleep else 3), workdir, ToyStage(sleep), toy_batches)
  print("finished")
