"""The stages of unCLIP: per-stage losses, train steps, sampling and export records.

STAGES is the one list of them, in training order; an inference checkpoint holds
the diffusion stages and a CLIP, and samples them in this order.
"""

STAGES = ("clip", "prior", "decoder", "sr1", "sr2")
DIFFUSION_STAGES = STAGES[1:]
UPSAMPLERS = STAGES[3:]  # sr1, sr2
