"""Weight converters from diffusers / transformers checkpoints to our params."""
