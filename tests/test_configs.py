"""Configs: a config file's ARG is parsed strictly, and every paper-shaped config has a ",tiny"
variant that builds the same stage at laptop size."""

import jax
import numpy as np
import pytest

from configs import karlo, paper, shapes
from unclip_jax import aot

TINY_CLIP = aot.ClipShapes(16, 32, 8)


@pytest.mark.parametrize("arg, message", [
    ("prior,tine", "unknown option 'tine'"), ("prio", "unknown stage 'prio'"),
    ("prior,tiny=maybe", "true or false"), ("decoder,tiny,extra=1", "unknown option 'extra'")])
def test_a_mistyped_arg_is_an_error_not_another_model(arg, message):
  for module in (shapes, paper, karlo):
    with pytest.raises(ValueError, match=message):
      module.get_config(arg)
  assert shapes.get_config("prior,tiny=true").to_dict() == shapes.get_config("prior,tiny").to_dict()
  assert shapes.get_config("prior,tiny=false").to_dict() == shapes.get_config("prior").to_dict()


def _param_count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("module, stage", [(paper, "prior"), (paper, "decoder"), (paper, "sr1"), (paper, "sr2"),
                                           (karlo, "prior"), (karlo, "decoder"), (karlo, "sr1")])
def test_tiny_variant_is_the_same_stage_at_laptop_size(module, stage):
  """Same stage contract (diffusion settings, resolutions, U-Net levels and attention pattern), a
  model under 10M parameters whose loss traces on the stage's own encoded batch."""
  full, tiny = module.get_config(stage), module.get_config(f"{stage},tiny")
  assert tiny.diffusion.to_dict() == full.diffusion.to_dict() and tiny.resolution == full.resolution
  if stage != "prior":
    assert len(tiny.model.block_channels) == len(full.model.block_channels)
    assert list(tiny.model.attention_levels) == list(full.model.attention_levels)
  built = aot.build_stage(tiny, TINY_CLIP)
  params = jax.eval_shape(built.init_params, jax.random.key(0))
  assert 0 < _param_count(params) < 10_000_000
  batch = built.encode_batch(aot.host_batch(tiny, 2))
  loss, _ = jax.eval_shape(built.loss, params, batch, jax.random.key(1))
  assert loss.shape == ()
