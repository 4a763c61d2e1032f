"""The stages of unCLIP: per-stage losses, train steps, sampling and export records.

STAGES is the one list of them, in training order. Text to image samples a prior
(the diffusion one, or the autoregressive "ar_prior"), then the decoder and the
upsamplers; an inference checkpoint holds a CLIP and SAMPLING_STAGES' exports.
"""

STAGES = ("clip", "prior", "ar_prior", "decoder", "sr1", "sr2")
DIFFUSION_STAGES = ("prior", "decoder", "sr1", "sr2")  # the chain text to image runs, each a diffusion model
PRIORS = ("prior", "ar_prior")  # either makes z_i from text: the pipeline's "prior"
SAMPLING_STAGES = STAGES[1:]  # what train.py exports for sampling (the CLIP exports a Hugging Face folder)
UPSAMPLERS = ("sr1", "sr2")
