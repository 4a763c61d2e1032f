"""`python sample.py` in a checkout: the unclip-sample program (unclip_jax/cli/sample.py has it).

  python sample.py --prompt "a red circle above a blue square"
"""

from unclip_jax.cli.sample import DEMO_CHECKPOINT, STAGES, main, run  # noqa: F401  (sample.main etc., as before)

if __name__ == "__main__":
  run()
