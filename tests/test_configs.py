"""Configs: a config file's ARG is parsed strictly, every paper-shaped config has a ",tiny"
variant that builds the same stage at laptop size, and every key a config sets is read."""

import contextlib
import sys

import jax
import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from configs import common, karlo, paper, shapes
from unclip_jax import aot
from unclip_jax.diffusion import losses
from unclip_jax.models import clip as clip_lib
from unclip_jax.stages import STAGES, build

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



def _leaves(config, prefix="") -> set:
  """Every leaf's dotted path (a list is one leaf)."""
  leaves = set()
  for key, value in config.items():
    leaves |= _leaves(value, f"{prefix}{key}.") if isinstance(value, ml_collections.ConfigDict) else {prefix + key}
  return leaves


@contextlib.contextmanager
def _reads(config):
  """The dotted paths of config's keys read inside the block (by attribute, [key] or get()), and PATH.*
  for a block read whole (to_dict())."""
  owners, read = {}, set()

  def own(c, prefix):
    owners[id(c)] = prefix
    for key, value in c.items():
      if isinstance(value, ml_collections.ConfigDict):
        own(value, f"{prefix}{key}.")

  own(config, "")
  getitem, to_dict = ml_collections.ConfigDict.__getitem__, ml_collections.ConfigDict.to_dict

  def recorded_getitem(self, key):
    if id(self) in owners:
      read.add(owners[id(self)] + key)
    return getitem(self, key)

  def recorded_to_dict(self, *args, **kwargs):
    if id(self) in owners:
      read.add(owners[id(self)] + "*")
    return to_dict(self, *args, **kwargs)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(ml_collections.ConfigDict, "__getitem__", recorded_getitem)
    patch.setattr(ml_collections.ConfigDict, "to_dict", recorded_to_dict)
    yield read


@pytest.mark.parametrize("module, stage", [(shapes, s) for s in STAGES] + [(paper, s) for s in STAGES[1:]]
                         + [(karlo, s) for s in ("prior", "decoder", "sr1")])
def test_every_key_a_config_sets_is_read(module, stage, tmp_path, monkeypatch):
  """Building the stage as train.py does (stages/build.py, on a stand-in CLIP and Shapes data), tracing
  its init and loss and writing its export config reads every key the config sets besides the train
  loop's own (common.base_config) and the data block (every key any data kind reads): a key nothing
  reads would be a setting that silently does nothing. The full-size variant has the tiny one's keys."""
  config = module.get_config(f"{stage},tiny")
  assert _leaves(config) == _leaves(module.get_config(stage))
  config.data.update(kind="shapes", workers=0)  # data keys are not checked here
  if "clip_dir" in config:
    config.clip_dir = config.clip_dir or "stand-in"  # the stand-in CLIP is loaded in its place
  monkeypatch.setattr(clip_lib, "load_clip", lambda path: TINY_CLIP)
  with _reads(config) as read:
    built, batches = build.build(config, str(tmp_path))
    params = jax.eval_shape(built.init_params, jax.random.key(0))
    jax.eval_shape(built.loss, params, built.encode_batch(next(batches(0))), jax.random.key(1))
    built.inference_config()
  # A model block may go whole into its dataclass (which refuses unknown keys); any other block read whole
  # (to_dict, e.g. dumped into a JSON) proves nothing.
  covered = lambda key: key in read or key.startswith("model.") and "model.*" in read
  loop = _leaves(common.base_config(stage))
  unread = {key for key in _leaves(config) - loop if not key.startswith("data.") and not covered(key)}
  assert not unread, f"{module.__name__}:{stage} sets keys nothing reads: {sorted(unread)}"


@pytest.mark.parametrize("stage", ["prior", "decoder", "sr1"])
def test_min_snr_gamma_reaches_the_stage_loss(stage, tmp_path, monkeypatch):
  """config.min_snr_gamma weights the loss the stage trains on (tests/test_losses.py has the weights'
  closed form), with the stage's own prediction type; 0 leaves the plain MSE."""
  monkeypatch.setattr(clip_lib, "load_clip", lambda path: TINY_CLIP)
  calls = []
  weight = losses.min_snr_weight
  monkeypatch.setattr(losses, "min_snr_weight", lambda *a: calls.append(a[2:]) or weight(*a))
  for gamma in (0.0, 3.0):
    config = shapes.get_config(f"{stage},tiny")
    config.update(min_snr_gamma=gamma, clip_dir="stand-in")
    built, batches = build.build(config, str(tmp_path / str(gamma)))
    params = jax.eval_shape(built.init_params, jax.random.key(0))
    jax.eval_shape(built.loss, params, built.encode_batch(next(batches(0))), jax.random.key(1))
  prediction = {"prior": "x0", "decoder": "eps", "sr1": "v"}[stage]
  assert calls == [(3.0, prediction)]


@pytest.mark.parametrize("module", [paper, karlo, shapes])
def test_unet_shape_overrides_from_the_command_line(module, monkeypatch):
  """`--config.model.block_channels='(32, 64)'` as train.py's and aot's flags parse it: the U-Net's tuple
  fields take command-line overrides (ml_collections refuses to override a list), and the model built
  from the overridden config has those widths."""
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values)
  argv = ["prog", f"--config={module.__file__}:decoder,tiny", "--config.model.block_channels=(32, 64)",
          "--config.model.attention_levels=(False, True)"]
  monkeypatch.setattr(sys, "argv", argv)  # config_flags finds the overrides in sys.argv
  flag_values(argv)
  config = flag_values.config
  params = jax.eval_shape(aot.build_stage(config, TINY_CLIP).init_params, jax.random.key(0))
  conv_widths = {x.shape[-1] for x in jax.tree.leaves(params) if x.ndim == 4}
  assert {32, 64} <= conv_widths and max(conv_widths) == 64, conv_widths
