"""Trains one unCLIP stage.

  python train.py --config configs/paper.py:decoder --workdir /tmp/decoder [--config.key=value ...]
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/paper.py:decoder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints and TensorBoard logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  config = _CONFIG.value
  sys.exit(f"error: the training loop for stage {config.stage!r} arrives with issue #5; "
           f"the config parsed fine:\n{config}")


if __name__ == "__main__":
  app.run(main)
