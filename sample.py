"""Text -> image with unCLIP.

  python sample.py --prompt "a red circle above a blue square"

With no --checkpoint the shipped Shapes demo model is used.
"""

import os
import sys

from absl import app
from absl import flags

DEMO_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "shapes_demo")

_PROMPT = flags.DEFINE_multi_string("prompt", [], "Caption to draw (repeatable).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", DEMO_CHECKPOINT, "Inference checkpoint folder.")
_OUT = flags.DEFINE_string("out", "samples", "Output folder.")
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not _PROMPT.value or not all(p.strip() for p in _PROMPT.value):
    sys.exit("error: give a non-empty --prompt.")
  if not os.path.isdir(_CHECKPOINT.value):
    if _CHECKPOINT.value == DEMO_CHECKPOINT:
      sys.exit("error: the shipped Shapes demo model is not in this checkout yet (it is trained and "
               "committed under assets/shapes_demo by issue #7), and the text-to-image pipeline "
               "arrives with issue #6. Nothing was generated.")
    sys.exit(f"error: checkpoint folder {_CHECKPOINT.value!r} does not exist.")
  sys.exit("error: the text-to-image pipeline arrives with issue #6; nothing was generated.")


if __name__ == "__main__":
  app.run(main)
