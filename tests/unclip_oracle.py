"""diffusers' UnCLIPScheduler as an exact oracle: float64 constants and injected noise."""

import torch
from diffusers import UnCLIPScheduler


class FixedNoise:
  """Stands in for a torch generator: the scheduler's next randn draw is `noise`
  (with the `fixed_unclip_noise` fixture active)."""

  def __init__(self, noise):
    self.noise = noise


def float64_unclip_scheduler(num_steps, **config):
  """diffusers' UnCLIPScheduler with its constants in float64.

  In float32 its step loses precision where it forms 1 - abar near t = 0 and
  1 - beta near t = T (errors up to 1e-3 at the first and last step). In
  float64 it is an exact reference for the algorithm; ours derives those
  constants in float64 and agrees with it to float32 precision.
  """
  ref = UnCLIPScheduler(**config)
  ref.betas = ref.betas.double()
  ref.alphas = 1.0 - ref.betas
  ref.alphas_cumprod = torch.cumprod(ref.alphas, dim=0)
  ref.one = torch.tensor(1.0, dtype=torch.float64)
  ref.set_timesteps(num_steps)
  return ref


def patch_noise(monkeypatch):
  """Makes UnCLIPScheduler.step draw FixedNoise.noise when given a FixedNoise generator."""
  import diffusers.schedulers.scheduling_unclip as unclip_module
  original = unclip_module.randn_tensor

  def randn_tensor(shape, generator=None, **kwargs):
    if isinstance(generator, FixedNoise):
      return generator.noise.reshape(shape)
    return original(shape, generator=generator, **kwargs)

  monkeypatch.setattr(unclip_module, "randn_tensor", randn_tensor)
