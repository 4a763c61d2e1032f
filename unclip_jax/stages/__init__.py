"""Stage-level functions (losses, train steps, samplers) for the prior, decoder and upsamplers."""
