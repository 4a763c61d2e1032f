"""The command-line programs: unclip-train and unclip-sample once installed, or `python train.py` /
`python sample.py` in a checkout (thin shims over these modules).

Importing unclip_jax.cli.train or unclip_jax.cli.sample defines that program's absl flags in the
global FLAGS, as the scripts always did: only the programs (and tests that drive them in-process)
import them; `import unclip_jax` does not.
"""

import contextlib
import os
import sys

from absl import flags


def show_in_help(module_name: str, doc: str):
  """Makes --help of whatever started the program (a console script, or a checkout's shim) show
  this program's usage and flags: absl prints __main__'s docstring and sys.argv[0]'s key flags."""
  sys.modules["__main__"].__doc__ = doc
  if module_name != "__main__":
    for flag in flags.FLAGS.get_key_flags_for_module(module_name):
      flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def command(script: str) -> str:
  """How the user ran us, for usage hints in errors: "python train.py" or "unclip-train"."""
  name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else script
  return f"python {name}" if name.endswith(".py") else name


# Each optional extra (pyproject.toml) and the checkout's lock file that installs it.
EXTRA_LOCKS = {"train": "requirements.txt", "convert": "requirements-dev.txt"}


@contextlib.contextmanager
def needs_extra(job: str = "training", extra: str = "train"):
  """A library only `job` needs, missing from an install without `extra`, as a one-line error."""
  try:
    yield
  except ModuleNotFoundError as e:
    package = (e.name or "").partition(".")[0]  # what pip installs: safetensors for safetensors.numpy
    if package in ("", "unclip_jax"):
      raise
    sys.exit(f"error: {job} needs {package!r}, which is not installed: pip install 'unclip-jax[{extra}]' "
             f"(in a checkout: pip install -r {EXTRA_LOCKS[extra]})")


DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def use_cpu_cores(batch: int, environ=os.environ, divide_batch: bool = False) -> int | None:
  """Splits the CPU into one JAX device per core (no more devices than the batch has images), by
  adding DEVICE_COUNT_FLAG to XLA_FLAGS before JAX starts its backends. The sampling pipeline
  batch-splits over local devices, and XLA runs a device's narrow convolutions on one core only, so
  on a CPU host this is up to ~1.6x on 2 cores (docs/benchmarks.md); the images do not change (tests:
  one device against eight). divide_batch (training's data axis): the largest count that divides the
  batch. Left alone when XLA_FLAGS already sets a device count. On a host with an accelerator the CPU
  devices go unused. Returns the device count set, or None."""
  if DEVICE_COUNT_FLAG in environ.get("XLA_FLAGS", ""):
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
  count = max(1, min(cores, batch))
  while divide_batch and batch % count:
    count -= 1
  environ["XLA_FLAGS"] = f"{environ.get('XLA_FLAGS', '')} {DEVICE_COUNT_FLAG}={count}".strip()
  return count
