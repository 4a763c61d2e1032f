"""Trains one unCLIP stage (clip, prior, decoder, sr1, sr2), resuming from --workdir.

  unclip-train --config configs/shapes.py:prior --workdir runs/shapes/prior [--config.key=value ...]
  python train.py ...   (the same program, from a checkout)

--config is a config file and its argument: a path relative to the working directory, or, when no
such file is there, one of the configs shipped with the installation (configs/shapes.py,
configs/paper.py, configs/karlo.py).

On a TPU pod or a Slurm GPU cluster run the same command on every host with
--multihost (jax.distributed finds its peers). Elsewhere name them, e.g. two
processes on one machine:
  unclip-train ... --coordinator_address=127.0.0.1:8476 --num_processes=2 --process_id=0
  unclip-train ... --coordinator_address=127.0.0.1:8476 --num_processes=2 --process_id=1
SIGTERM or Ctrl-C (on any host) saves a checkpoint on all and exits; rerunning resumes,
with any number of processes.
"""

import logging as pylogging
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from unclip_jax import cli
from unclip_jax.cli import shipped

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and argument, e.g. "
                                          "configs/shapes.py:prior (a shipped config when no such file is "
                                          "in the working directory).", lock_config=True)
shipped.resolve_config_flag(_CONFIG)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, samples and the export: a local "
                               "path, or a URI such as gs://bucket/run or file:///abs/path.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with no arguments "
                                "(TPU VMs, Slurm: the cluster tells each process its peers).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process "
                                   "run without cluster auto-detection.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")


_CONFIG_FILE_ERROR = "Error whilst parsing config file:"  # ml_collections' wrapper, with a traceback in the text


def _config_file_error(e: BaseException) -> str | None:
  """The config file's own error (e.g. common.parse_arg's "unknown stage"), when ml_collections wrapped
  it with its traceback as text: the first exception in the chain, its first line."""
  if _CONFIG_FILE_ERROR not in str(e):
    return None
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  lines = str(e).strip().splitlines()
  return lines[0] if lines else type(e).__name__


def parse_flags(argv):
  """Flag errors (an unknown config key, a bad override, a config arg the file rejects) as one clear line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      message = f"the config has no key {message!r} (check --config.* overrides)"
    cause = _config_file_error(e)
    if cause is not None:  # "flag --config=PATH:ARG: Error whilst parsing config file: ... Traceback ..."
      flag = message.partition(": " + _CONFIG_FILE_ERROR)[0].removeprefix("flag ")
      message = f"{flag}: {cause}"
    sys.exit(f"error: {message}")


def distributed_args() -> dict | None:
  """jax.distributed.initialize's arguments from the flags, or None for a single process."""
  explicit = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if all(v is None for v in explicit):
    return {} if _MULTIHOST.value else None
  if any(v is None for v in explicit):
    sys.exit("error: --coordinator_address, --num_processes and --process_id go together")
  if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
    sys.exit(f"error: --process_id must be in 0..{_NUM_PROCESSES.value - 1}, got {_PROCESS_ID.value}")
  return dict(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
              process_id=_PROCESS_ID.value)


class _QuietLibraries(pylogging.Filter):
  """Keeps orbax's per-save INFO chatter out of the training log."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}")
  if _CONFIG.value is None or not _WORKDIR.value:
    sys.exit("error: --config and --workdir are required, e.g. "
             f"{cli.command('train.py')} --config configs/shapes.py:clip --workdir runs/shapes/clip")
  config = _CONFIG.value
  # Before JAX starts: a CPU host trains data-parallel over one device per core (XLA runs a device's
  # narrow convolutions on one core; docs/benchmarks.md), unless XLA_FLAGS sets a device count.
  micro_batch = config.batch_size // max(config.get("grad_accum_steps", 1), 1)
  cpu_devices = cli.use_cpu_cores(micro_batch, divide_batch=True) if micro_batch > 0 else None
  with cli.needs_extra():
    from unclip_jax import init_from, parallel, resume, train_loop

  distributed = distributed_args()
  if distributed is not None:
    parallel.initialize_distributed(**distributed)
  with cli.needs_extra():
    from unclip_jax.stages import build

  logging.info("Config:\n%s", config)
  if cpu_devices is not None:
    logging.info("CPU devices: %d (one per core; a CPU-only host trains data-parallel over them)", cpu_devices)
  try:
    # Before anything is built or compiled: the run settings, the mesh, the workdir, and a resumed
    # checkpoint's config against this one, or else config.init_from's stage (train_loop.check_before_training);
    # a bad optim.* setting. An init_from export's params are checked against the built stage in train().
    train_loop.check_before_training(config, _WORKDIR.value)
    train_loop.make_optimizer(config)
    with cli.needs_extra():  # e.g. tensorflow-datasets, imported only for data.kind=tfds
      stage, batches = build.build(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError, resume.ResumeError) as e:
    sys.exit(f"error: {e}")
  try:
    train_loop.train(config, _WORKDIR.value, stage, batches)
  except (train_loop.TrainingDiverged, resume.ResumeError, init_from.InitFromError) as e:
    sys.exit(f"error: {e}")


def run():
  """The unclip-train console script (and `python train.py`)."""
  cli.show_in_help(__name__, __doc__)
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
