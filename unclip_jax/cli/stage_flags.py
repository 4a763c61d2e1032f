"""Per-stage sampling flags, shared by sample.py and benchmarks/eval_shapes.py (which cannot import
each other's flags: both define --seed): --prior (which prior runs), --{stage}_steps,
--{stage}_sampler, --{stage}_spacing, --{prior,decoder}_guidance, --eta, --dynamic_threshold, and
what they change in a set of StageOptions. Importing this module defines them in absl's FLAGS.
"""

import dataclasses

from absl import flags

from unclip_jax.diffusion import samplers, schedules
from unclip_jax.stages import DIFFUSION_STAGES as STAGES

PRIOR = flags.DEFINE_enum("prior", "diffusion", ["diffusion", "ar"],
                          "Which of the checkpoint's priors makes z_i from text: the diffusion prior, or the "
                          "autoregressive one (its --prior_guidance applies; the diffusion flags do not).")
STEPS = {s: flags.DEFINE_integer(f"{s}_steps", None, f"{s} sampling steps (default: the preset's).") for s in STAGES}
SAMPLERS = {s: flags.DEFINE_enum(f"{s}_sampler", None, list(samplers.SAMPLERS),
                                 f"{s} sampler (dpmpp_*: DPM-Solver++, deterministic, for fewer steps).")
            for s in STAGES}
SPACINGS = {s: flags.DEFINE_enum(f"{s}_spacing", None, list(schedules.SPACINGS),
                                 f"{s} timestep spacing (logsnr: equal steps in log-SNR, for DPM-Solver++ at few "
                                 "steps).") for s in STAGES}
GUIDANCE = {s: flags.DEFINE_float(f"{s}_guidance", None, f"{s} guidance scale.") for s in ("prior", "decoder")}
ETA = flags.DEFINE_float("eta", None, "DDIM eta for every stage that samples with DDIM (interpolate and textdiff "
                         "keep the decoder's at 0).")
THRESHOLD = flags.DEFINE_float("dynamic_threshold", None, "Imagen's dynamic thresholding quantile for images.")


def apply(options: dict) -> dict:
  """options ({stage: StageOptions}) with the flags given on the command line applied."""
  options = dict(options)
  for stage in STAGES:
    changes = {}
    if STEPS[stage].value is not None:
      changes["num_steps"] = STEPS[stage].value
    if SAMPLERS[stage].value is not None:
      changes["sampler"] = SAMPLERS[stage].value
    if SPACINGS[stage].value is not None:
      changes["spacing"] = SPACINGS[stage].value
    if stage in GUIDANCE and GUIDANCE[stage].value is not None:
      changes["guidance_scale"] = GUIDANCE[stage].value
    if ETA.value is not None:
      changes["eta"] = ETA.value
    if THRESHOLD.value is not None and stage != "prior":
      changes["dynamic_threshold"] = THRESHOLD.value
    if stage in options:
      options[stage] = dataclasses.replace(options[stage], **changes)
  return options
