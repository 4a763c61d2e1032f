"""Trains one unCLIP stage (clip, prior, decoder, sr1, sr2), resuming from --workdir.

  python train.py --config configs/shapes.py:prior --workdir runs/shapes/prior [--config.key=value ...]

On a multi-host TPU pod or GPU cluster run the same command on every host with
--multihost. SIGTERM or Ctrl-C saves a checkpoint and exits; rerunning resumes.
"""

import logging as pylogging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file and argument, e.g. "
                                          "configs/shapes.py:prior.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, logs, samples and the export.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (one process per host).")


def parse_flags(argv):
  """Flag errors (an unknown config key, a bad override) as one clear line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    message = str(e).strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):
      message = f"the config has no key {message!r} (check --config.* overrides)"
    sys.exit(f"error: {message}")


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
             "python train.py --config configs/shapes.py:clip --workdir runs/shapes/clip")
  import jax

  if _MULTIHOST.value:
    jax.distributed.initialize()
  from unclip_jax import train_loop
  from unclip_jax.stages import build

  config = _CONFIG.value
  logging.info("Config:\n%s", config)
  try:
    train_loop.make_optimizer(config)  # a bad optim.* setting is a one-line error before anything compiles
    stage, batches = build.build(config, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f"error: {e}")
  try:
    train_loop.train(config, _WORKDIR.value, stage, batches)
  except train_loop.TrainingDiverged as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
