"""Sampling options: per stage a StageOptions (stages/contract.py), the named
presets, and what each mode of the pipeline samples with."""

import dataclasses

from unclip_jax.diffusion import samplers, schedules
from unclip_jax.stages import DIFFUSION_STAGES as STAGES
from unclip_jax.stages.contract import StageOptions

PRESETS = {
    # Table 3's sampling steps; guidance as the paper's figures use it.
    "paper": {"prior": StageOptions(64, "ddpm", guidance_scale=4.0, clip_range=5.0),
              "decoder": StageOptions(250, "ddpm", guidance_scale=3.0),
              "sr1": StageOptions(27, "ddim"), "sr2": StageOptions(15, "ddim")},
    # Karlo / diffusers' UnCLIPPipeline defaults.
    "karlo": {"prior": StageOptions(25, "ddpm", guidance_scale=4.0, clip_range=5.0),
              "decoder": StageOptions(25, "ddpm", guidance_scale=8.0),
              "sr1": StageOptions(7, "ddpm"), "sr2": StageOptions(7, "ddpm")},
}
MODES = ("text", "variations", "interpolate", "textdiff", "inpaint")


def stage_options(stage: str, fields, base: StageOptions | None = None) -> StageOptions:
  """StageOptions from a StageOptions or a dict of its fields (the others from base, default Karlo's)."""
  if stage not in STAGES:
    raise ValueError(f"Unknown stage {stage!r} in sampling options; expected one of {STAGES}.")
  if isinstance(fields, StageOptions):
    return fields
  if not isinstance(fields, dict):
    raise ValueError(f"Sampling options for {stage!r} must be a dict of StageOptions fields, got {fields!r}.")
  known = {f.name for f in dataclasses.fields(StageOptions)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise ValueError(f"Unknown sampling option(s) {unknown} for {stage!r}; StageOptions has {sorted(known)}.")
  options = dataclasses.replace(base or PRESETS["karlo"][stage], **fields)
  if options.sampler not in samplers.SAMPLERS or options.spacing not in schedules.SPACINGS or options.num_steps < 1:
    raise ValueError(f"Bad sampling options for {stage!r}: {options}.")
  return options


def over_karlo(options: dict | None) -> dict:
  """Every stage's StageOptions: `options` ({stage: StageOptions or dict of its fields}) over Karlo's."""
  resolved = dict(PRESETS["karlo"])
  resolved.update({stage: stage_options(stage, fields) for stage, fields in (options or {}).items()})
  return resolved


def for_mode(mode: str, options: dict | None, defaults: dict) -> dict:
  """The stage options a mode samples with: options over defaults, then
  - variations: the decoder runs DDIM with eta = 1 unless options sets "decoder";
  - interpolate, textdiff: the decoder always runs DDIM with eta = 0 (its steps,
    guidance and clamp are kept), so that a frame is a deterministic function of
    its z_i and x_T.
  """
  if mode not in MODES:
    raise ValueError(f"Unknown mode {mode!r}; expected one of {', '.join(MODES)}.")
  options = options or {}
  resolved = dict(defaults)
  resolved.update({stage: stage_options(stage, fields, resolved[stage]) for stage, fields in options.items()})
  if mode == "variations" and "decoder" not in options:
    resolved["decoder"] = dataclasses.replace(resolved["decoder"], sampler="ddim", eta=1.0)
  elif mode in ("interpolate", "textdiff"):
    resolved["decoder"] = dataclasses.replace(resolved["decoder"], sampler="ddim", eta=0.0)
  return resolved
