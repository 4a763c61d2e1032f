"""Gaussian diffusion as pure functions: schedules, the forward process, losses
and compiled samplers."""

from unclip_jax.diffusion.gaussian import predict_x0, q_posterior, q_sample, training_target
from unclip_jax.diffusion.losses import diffusion_loss, vlb_term
from unclip_jax.diffusion.samplers import (
    classifier_free_guidance,
    clip_x0,
    ddim_invert,
    ddim_step,
    ddpm_step,
    initial_noise,
    sample,
)
from unclip_jax.diffusion.schedules import Schedule, make_schedule, respaced_timesteps
from unclip_jax.diffusion.slerp import slerp

__all__ = [
    "Schedule", "classifier_free_guidance", "clip_x0", "ddim_invert", "ddim_step", "ddpm_step", "diffusion_loss",
    "initial_noise", "make_schedule", "predict_x0", "q_posterior", "q_sample", "respaced_timesteps", "sample",
    "slerp", "training_target", "vlb_term",
]
