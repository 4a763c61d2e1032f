"""Sampler overhead: our jitted DDIM loop vs a Python loop over diffusers' scheduler.

Both wrap the same trivial model (a per-pixel affine map), so the table measures
what the sampler itself costs per step: for ours one compiled lax.scan, for
diffusers a Python loop that dispatches each step's tensor ops eagerly.

  python benchmarks/sampler_overhead.py [--steps 50] [--batch 1,16] [--size 64]
"""

import argparse
import time

import jax
import torch
from diffusers import DDIMScheduler

from unclip_jax.diffusion import samplers, schedules


def time_ours(batch, size, steps, repeats):
  schedule = schedules.make_schedule("cosine", 1000, num_steps=steps, spacing="stride")
  model_fn = lambda x, t: 0.9 * x + 1e-4 * t[:, None, None, None]
  run = jax.jit(lambda key: samplers.sample(model_fn, schedule, key, shape=(batch, size, size, 3),
                                            sampler="ddim", clip_range=1.0))
  start = time.perf_counter()
  jax.block_until_ready(run(jax.random.key(0)))
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for r in range(repeats):
    jax.block_until_ready(run(jax.random.key(r)))
  return (time.perf_counter() - start) / repeats, compile_s


def time_diffusers(batch, size, steps, repeats):
  scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=True)
  scheduler.set_timesteps(steps)
  model = lambda x, t: 0.9 * x + 1e-4 * t
  generator = torch.Generator().manual_seed(0)

  def run():
    x = torch.randn((batch, 3, size, size), generator=generator)
    with torch.no_grad():
      for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, eta=0.0).prev_sample
    return x

  run()  # warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    run()
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50)
  parser.add_argument("--batch", default="1,16")
  parser.add_argument("--size", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), torch threads: {torch.get_num_threads()}")
  print(f"DDIM, {args.steps} steps, images {args.size}x{args.size}x3, trivial model\n")
  header = "| batch | ours steps/s | diffusers steps/s | speed-up | ours compile s |"
  print(header)
  print("|" + "---|" * 5)
  for batch in (int(b) for b in args.batch.split(",")):
    ours_s, compile_s = time_ours(batch, args.size, args.steps, args.repeats)
    ref_s = time_diffusers(batch, args.size, args.steps, args.repeats)
    print(f"| {batch} | {args.steps / ours_s:,.0f} | {args.steps / ref_s:,.0f} | {ref_s / ours_s:.1f}x | "
          f"{compile_s:.2f} |")


if __name__ == "__main__":
  main()
