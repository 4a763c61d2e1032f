"""A sampling chain with its progress bar on is written to JAX's persistent compilation cache by one
process and served from it in the next (issue #24, item 4); a bar drawn by a host callback inside the
loop, as before, is not (JAX does not store programs with host callbacks)."""

import json
import os
import subprocess
import sys

import pytest

# Runs one 8-step DPM-Solver++ chain with a bar, against the cache folder argv[1], and prints the
# cache's hits and requests (JAX's monitoring events) and the result. "parts": the bar drawn between
# steps (progress.run_chain); "callback": a jax.debug.callback in the loop, the bar's old way.
SCRIPT = """
import collections, json, sys
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_compilation_cache_dir", sys.argv[1])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
events = collections.Counter()
jax.monitoring.register_event_listener(lambda event, **kwargs: events.update([event]))

from unclip_jax.diffusion import progress, samplers, schedules

schedule = schedules.make_schedule("cosine", 1000, num_steps=8)
callback = sys.argv[2] == "callback"

def model_fn(x, t):
  if callback:
    jax.debug.callback(lambda step: None, t[0])
  return jnp.tanh(x + t[:, None] / 1000)

run = jax.jit(lambda x, part=None: samplers.sample(model_fn, schedule, jax.random.key(0), x, sampler="dpmpp_2m",
                                                   part=part))
x = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)
out = run(x) if callback else progress.run_chain(lambda part: run(x, part=part), 8, "chain")
print(json.dumps({"hits": events["/jax/compilation_cache/cache_hits"],
                  "requests": events["/jax/compilation_cache/compile_requests_use_cache"],
                  "out": np.asarray(out).tolist()}))
"""


def _run(cache_dir, mode):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the test session's cache: this test has its own
  done = subprocess.run([sys.executable, "-c", SCRIPT, str(cache_dir), mode], capture_output=True, text=True,
                        env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.splitlines()[-1]), done.stderr


def _entries(cache_dir):
  return sorted(os.listdir(cache_dir))


@pytest.mark.parametrize("mode", ["parts", "callback"])
def test_a_chain_with_progress_is_served_from_the_persistent_cache(tmp_path, mode):
  first, err = _run(tmp_path, mode)
  written = _entries(tmp_path)
  assert first["hits"] == 0 and first["requests"] > 0 and written
  second, err = _run(tmp_path, mode)
  assert second["out"] == first["out"]
  if mode == "parts":
    assert "8/8" in err  # the bar was drawn
    # Every program the second process needed (the chain's start and step among them) came from
    # the cache, and it wrote nothing new.
    assert second["hits"] == second["requests"] == first["requests"], (first, second)
    assert _entries(tmp_path) == written
  else:
    # The loop with a host callback was never stored: the second process compiled it again.
    assert second["hits"] == second["requests"] - 1, (first, second)
