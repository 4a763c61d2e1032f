"""Memory per device of the Karlo-size stages in each sampling dtype (docs/karlo.md).

  python -m benchmarks.karlo_memory [--stages prior,decoder,sr1] [--dtypes float32,bfloat16,float16]
                                    [--batch 1] [--compile]

Weights: every stage's params at Karlo's shapes (configs/karlo.py, ViT-L/14's widths) from
jax.eval_shape, as Pipeline.load(dtype=...) holds them (float leaves in the dtype; the prior's
latent stats stay float32). With --compile, also XLA's memory report of the stage's whole sampling
loop at --batch images (the guided stages run the batch twice per step), compiled for this
machine's default backend (unclip_jax.aot.sampler_fn: the loop sample.py runs): arguments are the
weights and inputs, temps the activations and the loop's carry. Nothing is allocated. Prints a
markdown table.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from configs import karlo
from unclip_jax import aot

GIB = 2 ** 30


def held_weights(stage: str, built, dtype: str):
  """The stage's params as abstract arrays, as Pipeline.load(dtype=dtype) holds them."""
  cast = lambda tree: jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, jnp.dtype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype),
      tree)
  params = cast(jax.eval_shape(built.init_params, jax.random.key(0)))
  if stage == "prior":  # the sampler's variables: params and the latent stats (float32)
    return {"params": params, "stats": jax.eval_shape(lambda: built.stats)}
  return params


def nbytes(tree) -> int:
  return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure(stage: str, dtype: str, batch: int, compile_loop: bool) -> dict:
  config = karlo.get_config(stage)
  config.compute_dtype = dtype
  built = aot.build_stage(config, aot.ClipShapes())
  params = held_weights(stage, built, dtype)
  row = {"stage": stage, "dtype": dtype, "params": sum(x.size for x in jax.tree.leaves(params)),
         "weights": nbytes(params)}
  if compile_loop:
    fn, keys, rows = aot.sampler_fn(config, built)
    example = aot.abstract_batch(built, config, batch, None)
    inputs = {k: example[k] for k in keys}
    rng = jax.ShapeDtypeStruct((batch * rows,), jax.random.key(0).dtype)
    start = time.perf_counter()
    if stage == "prior":  # aot.sampler_fn's prior takes the params alone and adds the stats itself
      params = params["params"]
    memory = jax.jit(fn).lower(params, inputs, rng).compile().memory_analysis()
    row.update(arguments=memory.argument_size_in_bytes, temps=memory.temp_size_in_bytes,
               compile_s=time.perf_counter() - start)
  return row


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--stages", default="prior,decoder,sr1")
  parser.add_argument("--dtypes", default="float32,bfloat16,float16")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--compile", action="store_true", help="also compile each sampling loop for its memory report")
  args = parser.parse_args()
  rows = [measure(s, d, args.batch, args.compile) for s in args.stages.split(",") for d in args.dtypes.split(",")]
  loop = f" loop arguments GiB ({jax.default_backend()}, batch {args.batch}) | loop temps GiB |"
  print(f"| stage | dtype | params | weights GiB |{loop if args.compile else ''}")
  print(f"|---|---|---|---|{'---|---|' if args.compile else ''}")
  for r in rows:
    line = f"| {r['stage']} | {r['dtype']} | {r['params'] / 1e6:.0f} M | {r['weights'] / GIB:.2f} |"
    if args.compile:
      line += f" {r['arguments'] / GIB:.2f} | {r['temps'] / GIB:.2f} |"
    print(line)


if __name__ == "__main__":
  main()
