"""`python -m unclip_jax.eval`: unclip_jax/cli/evaluate.py."""

from unclip_jax.cli import evaluate

evaluate.run()
