"""What the decoder and the upsamplers share: U-Nets trained to denoise images."""

import jax
import jax.numpy as jnp

from unclip_jax.diffusion import gaussian, losses
from unclip_jax.diffusion.schedules import Schedule
from unclip_jax.models import unet as unet_lib


def variance_type(cfg: unet_lib.UNetConfig) -> str:
  """6 output channels for 3 input channels means a learned variance range."""
  return "learned_range" if cfg.out_channels == 2 * cfg.in_channels else "fixed_small"


def clip_images(x):
  """A chain's last state as images: the samplers' x_0 clamps bound it to [-1, 1] but for rounding."""
  return jnp.clip(x, -1.0, 1.0)


def out_channels(in_channels: int, variance: str) -> int:
  """A learned variance doubles the output (mean and variance per channel)."""
  return 2 * in_channels if variance == "learned_range" else in_channels


def loss(apply, schedule: Schedule, image, rng, *, prediction_type: str, variance_type: str,
         min_snr_gamma: float | None = None):
  """Mean diffusion loss over the batch (improved DDPM's hybrid with a learned variance), and its parts.

  image: [B, H, W, C] in [-1, 1]; apply(x_t, t, dropout_rng) runs the network
  with the stage's conditioning. Draws t, then the noise, from rng. min_snr_gamma: the MSE's
  min-SNR-gamma weighting (losses.min_snr_weight), None for the plain MSE.
  """
  x0 = jnp.asarray(image, jnp.float32)
  k_t, k_noise, k_drop = jax.random.split(rng, 3)
  i = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_steps)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = gaussian.q_sample(schedule, x0, i, noise)
  out = apply(x_t, schedule.timesteps[i], k_drop)
  per_example, parts = losses.diffusion_loss(schedule, out, x0, x_t, i, noise, prediction_type=prediction_type,
                                             variance_type=variance_type, min_snr_gamma=min_snr_gamma)
  return jnp.mean(per_example), {k: jnp.mean(v) for k, v in parts.items()}
