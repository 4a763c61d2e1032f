"""Train-step throughput of the decoder and the prior, with achieved FLOP/s.

The step is the real one (unclip_jax.training.make_train_step around the
stage's loss), fed random conditioning of the right shapes. FLOPs per step come
from XLA's cost analysis of the compiled step; they are set against this
machine's dense matmul FLOP/s (measured here) and, on a GPU or TPU, against
the chip's peak (MFU).

  python benchmarks/train_throughput.py --stage decoder --width 64 --batch 8
  python benchmarks/train_throughput.py --stage prior --width 256 --batch 64 --dtype bfloat16
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from unclip_jax import optim, training
from unclip_jax.diffusion import schedules
from unclip_jax.models import prior as prior_lib
from unclip_jax.models import unet as unet_lib
from unclip_jax.stages import decoder as decoder_stage
from unclip_jax.stages import prior as prior_stage

# Dense bf16 peak FLOP/s by device kind (vendor figures, no sparsity).
PEAK_FLOPS = {"NVIDIA H100 80GB HBM3": 989e12, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12,
              "NVIDIA A100-SXM4-80GB": 312e12, "NVIDIA A100-SXM4-40GB": 312e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12}


def decoder_setup(width, batch, dtype, clip_dim=64, tokens=16):
  cfg = unet_lib.UNetConfig(
      block_channels=(width, 2 * width, 3 * width), layers_per_block=2, attention_levels=(False, True, True),
      head_dim=32, context_dim=2 * width, out_channels=6, dtype=dtype,
      text_proj=unet_lib.TextProjConfig(clip_dim=clip_dim, text_dim=clip_dim)).validate()
  rng = np.random.default_rng(0)
  batch_data = {"image": rng.uniform(-1, 1, (batch, 64, 64, 3)).astype(np.float32),
                "z_i": rng.standard_normal((batch, clip_dim)).astype(np.float32),
                "z_t": rng.standard_normal((batch, clip_dim)).astype(np.float32),
                "tokens": rng.standard_normal((batch, tokens, clip_dim)).astype(np.float32),
                "mask": np.ones((batch, tokens), bool)}
  uncond = {"z_t": np.zeros((1, clip_dim), np.float32), "tokens": np.zeros((1, tokens, clip_dim), np.float32),
            "mask": np.ones((1, tokens), bool)}
  loss = functools.partial(decoder_stage.training_loss, cfg=cfg, schedule=schedules.make_schedule(), uncond=uncond)
  init = lambda key: unet_lib.init_params(cfg, key)
  return init, loss, batch_data, "decoder"


def prior_setup(width, batch, dtype, clip_dim=64, tokens=16):
  config = prior_lib.PriorConfig(clip_dim=clip_dim, num_text_tokens=tokens, width=width, num_layers=6,
                                 num_heads=max(1, width // 64))
  model = prior_lib.DiffusionPrior(config, jnp.dtype(dtype))
  rng = np.random.default_rng(0)
  batch_data = {"z_t": rng.standard_normal((batch, clip_dim)).astype(np.float32),
                "z_i": rng.standard_normal((batch, clip_dim)).astype(np.float32),
                "tokens": rng.standard_normal((batch, tokens, clip_dim)).astype(np.float32),
                "mask": np.ones((batch, tokens), bool)}
  uncond = {"z_t": np.zeros((1, clip_dim), np.float32), "tokens": np.zeros((1, tokens, clip_dim), np.float32),
            "mask": np.ones((1, tokens), bool)}
  stats = {"clip_mean": jnp.zeros(clip_dim), "clip_std": jnp.ones(clip_dim)}
  loss = functools.partial(prior_stage.prior_loss, model=model, stats=stats, schedule=schedules.make_schedule(),
                           uncond=uncond)
  init = lambda key: prior_lib.init_variables(config, key)["params"]
  return init, loss, batch_data, "prior"


def matmul_flops_per_second(n=2048, dtype=jnp.float32, repeats=10):
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  start = time.perf_counter()
  for _ in range(repeats):
    out = f(a)
  out.block_until_ready()
  return 2 * n ** 3 * repeats / (time.perf_counter() - start)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stage", choices=["decoder", "prior"], default="decoder")
  parser.add_argument("--width", type=int, default=64)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  setup = decoder_setup if args.stage == "decoder" else prior_setup
  init, loss, batch, stage = setup(args.width, args.batch, args.dtype)
  tx = optim.paper_adamw(stage)
  state = jax.jit(lambda key: training.init_state(init, tx, key))(jax.random.key(0))
  step = jax.jit(training.make_train_step(loss, tx, ema_decay=0.9999), donate_argnums=0)
  compiled = step.lower(state, batch).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", float("nan")))
  state, _ = compiled(state, batch)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for _ in range(args.steps):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / args.steps
  achieved = flops / seconds
  matmul = matmul_flops_per_second(dtype=jnp.dtype(args.dtype))
  device = jax.devices()[0]
  params = sum(x.size for x in jax.tree.leaves(state.params))
  print(f"device: {device.device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)\n")
  print("| stage | width | params | batch | dtype | steps/s | images/s | GFLOP/step | achieved TFLOP/s "
        "| matmul TFLOP/s | ratio | MFU |")
  print("|" + "---|" * 12)
  peak = PEAK_FLOPS.get(device.device_kind)
  mfu = f"{achieved / peak:.1%}" if peak and args.dtype == "bfloat16" else "n/a"
  print(f"| {stage} | {args.width} | {params / 1e6:.1f}M | {args.batch} | {args.dtype} | {1 / seconds:.2f} | "
        f"{args.batch / seconds:.1f} | {flops / 1e9:.2f} | {achieved / 1e12:.4f} | {matmul / 1e12:.4f} | "
        f"{achieved / matmul:.2f} | {mfu} |")


if __name__ == "__main__":
  main()
