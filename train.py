"""`python train.py` in a checkout: the unclip-train program (unclip_jax/cli/train.py has it).

  python train.py --config configs/shapes.py:prior --workdir runs/shapes/prior [--config.key=value ...]
"""

from unclip_jax.cli.train import distributed_args, main, parse_flags, run  # noqa: F401  (train.main etc., as before)

if __name__ == "__main__":
  run()
