"""unclip-jax: unCLIP (DALL-E 2) in JAX/Flax."""

__version__ = "0.1.0"
