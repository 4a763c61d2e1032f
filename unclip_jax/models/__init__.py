"""Flax (linen) models: frozen CLIP, the diffusion prior and the U-Nets."""
