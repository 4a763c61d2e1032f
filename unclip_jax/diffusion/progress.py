"""Progress of a compiled sampling chain, drawn by the host between its steps.

Why not from inside the loop: a program with a host callback (jax.debug.callback,
io_callback, pure_callback) is one JAX's persistent compilation cache never
stores ("Not writing persistent cache entry ... because it uses host callbacks",
jax/_src/compiler.py), so each process compiled its loops again. Here the chain
runs one step per call of the same compiled program (samplers.Part); both of its
programs, the start and the step, have no callback and come from the cache.
"""

import sys
from collections.abc import Callable

import jax
import tqdm.auto

from unclip_jax.diffusion import samplers


def commit(state):
  """The state's arrays where they are, committed there (jax.device_put to their own sharding)."""
  return jax.tree.map(lambda a: jax.device_put(a, a.sharding), state)


def run_chain(chain: Callable, num_steps: int, desc: str, place: Callable = commit):
  """chain(part) -> (state, output), a jitted chain with all else bound, run a step per call
  under a tqdm bar (on stderr; it appears once the first step, which compiles, is done).
  Returns the last call's output: the chain's result.

  place(state) puts the loop state where every step's call takes it, committed (default: where
  it is) or batch-split over a mesh: the start's outputs may come out placed otherwise than a
  step's (uncommitted where only a step reads a committed input; the zeros of the DPM-Solver
  history replicated where a step's are split), which would compile the step twice.
  """
  state, out = chain(samplers.Part(None, 0, 0))
  bar = None
  for k in range(num_steps):
    state, out = chain(samplers.Part(place(state), k, 1))
    jax.block_until_ready(state)
    if bar is None:
      bar = tqdm.auto.tqdm(total=num_steps, desc=desc, file=sys.stderr)
    bar.update(1)
  if bar is not None:
    bar.close()
  return out


def announce_compile(name: str, part: samplers.Part | None):
  """Called while JAX traces a chain (once per program, before it compiles or loads from the
  cache): one "compiling NAME..." line for the program that runs steps, none for its start."""
  if part is None or part.count:
    tqdm.auto.tqdm.write(f"compiling {name}...", file=sys.stderr)
