"""End to end against diffusers: a tiny random UnCLIPPipeline with Karlo's
component types, saved as safetensors, converted by `python -m unclip_jax.convert`'s
code path, then both pipelines run with the same initial and per-step noise,
steps and guidance; final images agree to 1e-3 (float32)."""

import os
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import random_karlo  # noqa: E402
from diffusers import UnCLIPImageVariationPipeline, UnCLIPPipeline, UnCLIPScheduler  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection  # noqa: E402
from unclip_oracle import FixedNoise  # noqa: E402

from configs import karlo as karlo_configs  # noqa: E402
from unclip_jax import imaging, pipeline  # noqa: E402
from unclip_jax.convert import diffusers_pipeline  # noqa: E402
from unclip_jax.convert.__main__ import main as convert_main  # noqa: E402
from unclip_jax.convert.common import ConversionError  # noqa: E402
from unclip_jax.diffusion import samplers  # noqa: E402
from unclip_jax.models import prior as prior_lib  # noqa: E402
from unclip_jax.models import unet as unet_lib  # noqa: E402
from unclip_jax.pipeline import StageOptions  # noqa: E402

WIDTH = random_karlo.SIZES["tiny"].clip_width  # CLIP hidden = projection = the prior's embedding width
PROMPTS = ["a red circle above a blue square", "a blue circle"]
SEEDS = [3, 4]
STEPS = {"prior": 3, "decoder": 3, "sr1": 3}
GUIDANCE = {"prior": 4.0, "decoder": 8.0}


@pytest.fixture(scope="module")
def karlo(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("karlo"))
  pipe = UnCLIPPipeline(**random_karlo.components(tmp, "tiny"))
  src, dst = os.path.join(tmp, "diffusers"), os.path.join(tmp, "converted")
  pipe.save_pretrained(src, safe_serialization=True)
  assert convert_main(["--from", "diffusers", "--src", src, "--dst", dst]) == 0
  return dict(torch=pipe, src=src, dst=dst, ours=pipeline.Pipeline.load(dst))


def _our_noise(seeds, stage, shape, num_steps):
  """The x_T and per-step noise our pipeline draws for a stage (samplers.sample's draws)."""
  keys = pipeline.stage_keys(seeds, stage)
  if stage == "prior":  # the prior's rows: one candidate per image
    keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
  x_T = samplers.initial_noise(keys, shape)
  _, step_rng = samplers._split(keys)
  steps = [samplers.normal(samplers._fold_in(step_rng, k), shape) for k in range(num_steps)]
  return np.asarray(x_T), [np.asarray(s) for s in steps]


class NoiseQueue(FixedNoise):
  """The scheduler's successive randn draws, in order (all three stages' steps with t > 0)."""

  def __init__(self, noises):
    self.queue = list(noises)

  @property
  def noise(self):
    return self.queue.pop(0)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def test_config_and_options_are_karlos(karlo):
  ours = karlo["ours"]
  assert ours.stages == ("prior", "decoder", "sr1")
  assert ours.exports["sr1"].params_last and set(ours.params["sr1"]) == {"first", "last"}
  assert ours.default_options["prior"] == StageOptions(25, "ddpm", guidance_scale=4.0, clip_range=5.0)
  assert ours.default_options["decoder"] == StageOptions(25, "ddpm", guidance_scale=8.0, clip_range=1.0)
  assert ours.default_options["sr1"] == StageOptions(7, "ddpm", clip_range=1.0)
  assert ours.exports["decoder"].diffusion.variance_type == "learned_range"
  assert ours.exports["decoder"].resolution == 16 and ours.exports["sr1"].resolution == 32


def float64_schedulers(pipe, monkeypatch):
  """The pipeline's UnCLIPSchedulers with float64 constants (unclip_oracle.float64_unclip_scheduler's
  reason: in float32 their steps lose up to 1e-3 where they form 1 - abar and 1 - beta), each step's
  output cast back to float32 for the next model call.

  Measured on this model with stock float32 schedulers: z_i off by 2e-3, the decoder's image by
  1.4e-3, and the random upsampler amplifies that to 0.14 max abs in the final image; with float64
  constants: z_i 4e-6, decoder 6e-5, final 3e-5.
  """
  for scheduler in [c for c in pipe.components.values() if isinstance(c, UnCLIPScheduler)]:
    scheduler.betas = scheduler.betas.double()
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.cumprod(scheduler.alphas, dim=0)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
  step = UnCLIPScheduler.step

  def float32_step(self, *args, **kwargs):
    out = step(self, *args, **kwargs)
    out.prev_sample = out.prev_sample.float()
    return out

  monkeypatch.setattr(UnCLIPScheduler, "step", float32_step)


@pytest.mark.slow
def test_text_to_image_matches_unclip_pipeline(karlo, fixed_unclip_noise, monkeypatch):
  ours, ref = karlo["ours"], karlo["torch"]
  float64_schedulers(ref, monkeypatch)
  n = len(PROMPTS)
  prior_T, prior_steps = _our_noise(SEEDS, "prior", (n, WIDTH), STEPS["prior"])
  dec_T, dec_steps = _our_noise(SEEDS, "decoder", (n, 16, 16, 3), STEPS["decoder"])
  sr_T, sr_steps = _our_noise(SEEDS, "sr1", (n, 32, 32, 3), STEPS["sr1"])
  # diffusers draws noise only at steps with t > 0: all but each chain's last
  queue = ([torch.from_numpy(s.copy()) for s in prior_steps[:-1]] + [_nchw(s) for s in dec_steps[:-1]]
           + [_nchw(s) for s in sr_steps[:-1]])
  with torch.no_grad():
    expected = ref(PROMPTS, prior_num_inference_steps=STEPS["prior"],
                   decoder_num_inference_steps=STEPS["decoder"], super_res_num_inference_steps=STEPS["sr1"],
                   generator=NoiseQueue(queue), prior_latents=torch.from_numpy(prior_T.copy()),
                   decoder_latents=_nchw(dec_T), super_res_latents=_nchw(sr_T),
                   prior_guidance_scale=GUIDANCE["prior"], decoder_guidance_scale=GUIDANCE["decoder"],
                   output_type="np").images
  options = {stage: {"num_steps": steps, **({"guidance_scale": GUIDANCE[stage]} if stage in GUIDANCE else {})}
             for stage, steps in STEPS.items()}
  got = ours.text_to_image(PROMPTS, SEEDS, options, num_candidates=1, as_float=True)
  got = np.clip(got * 0.5 + 0.5, 0, 1)
  assert got.shape == expected.shape == (n, 32, 32, 3)
  assert np.mean((expected > 0.01) & (expected < 0.99)) > 0.3  # mostly not clamped
  err = np.abs(got - expected).max()
  assert err < 1e-3, err


def test_missing_and_misshaped_tensors_are_named(karlo, tmp_path, capsys):
  src = str(tmp_path / "broken")
  shutil.copytree(karlo["src"], src)
  path = os.path.join(src, "super_res_last", "diffusion_pytorch_model.safetensors")
  state = load_file(path)
  del state["conv_in.bias"]
  state["conv_out.weight"] = state["conv_out.weight"][:2]
  save_file(state, path)
  shutil.rmtree(os.path.join(src, "text_proj"))
  with pytest.raises(ConversionError, match="missing \\['text_proj'\\]"):
    diffusers_pipeline.convert(src, str(tmp_path / "out"))
  shutil.copytree(os.path.join(karlo["src"], "text_proj"), os.path.join(src, "text_proj"))
  with pytest.raises(ConversionError) as info:
    diffusers_pipeline.convert(src, str(tmp_path / "out"))
  assert "missing tensor 'conv_in.bias'" in str(info.value)
  # The command line reports it in one line and exits 1, without a traceback.
  assert convert_main(["--from", "diffusers", "--src", src, "--dst", str(tmp_path / "cli")]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "missing tensor 'conv_in.bias'" in err and "Traceback" not in err
  assert "conv_out/kernel: checkpoint shape (3, 3, 64, 2)" in str(info.value) or "conv_out" in str(info.value)
  assert not os.path.exists(tmp_path / "out" / "pipeline.json")


@pytest.fixture(scope="module")
def karlo_variations(tmp_path_factory):
  tmp = str(tmp_path_factory.mktemp("karlo_variations"))
  parts = random_karlo.components(tmp, "tiny")
  for name in ("prior", "prior_scheduler"):
    del parts[name]
  torch.manual_seed(7)
  vision = CLIPVisionModelWithProjection(CLIPVisionConfig(
      hidden_size=WIDTH, projection_dim=WIDTH, image_size=32, patch_size=8, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=37)).eval()
  parts["image_encoder"] = random_karlo.randomize(vision, 8, 0.02)
  parts["feature_extractor"] = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
  pipe = UnCLIPImageVariationPipeline(**parts)
  src, dst = os.path.join(tmp, "diffusers"), os.path.join(tmp, "converted")
  pipe.save_pretrained(src, safe_serialization=True)
  assert convert_main(["--from", "diffusers", "--src", src, "--dst", dst]) == 0
  return dict(torch=pipe, src=src, dst=dst, ours=pipeline.Pipeline.load(dst))


@pytest.mark.slow
def test_variations_match_unclip_image_variation_pipeline(karlo_variations, fixed_unclip_noise, monkeypatch):
  ours, ref = karlo_variations["ours"], karlo_variations["torch"]
  float64_schedulers(ref, monkeypatch)
  assert ours.stages == ("decoder", "sr1")
  with pytest.raises(pipeline.CheckpointError, match="no prior"):
    ours.text_to_image(["a red circle"], [0])
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)  # CLIP's crop size: no resampling on either side
  seeds = [5, 6]
  n = len(seeds)
  dec_T, dec_steps = _our_noise(seeds, "decoder", (n, 16, 16, 3), STEPS["decoder"])
  sr_T, sr_steps = _our_noise(seeds, "sr1", (n, 32, 32, 3), STEPS["sr1"])
  queue = [_nchw(s) for s in dec_steps[:-1]] + [_nchw(s) for s in sr_steps[:-1]]
  with torch.no_grad():
    expected = ref(Image.fromarray(image), num_images_per_prompt=n, decoder_num_inference_steps=STEPS["decoder"],
                   super_res_num_inference_steps=STEPS["sr1"], generator=NoiseQueue(queue),
                   decoder_latents=_nchw(dec_T), super_res_latents=_nchw(sr_T),
                   decoder_guidance_scale=GUIDANCE["decoder"], output_type="np").images
  options = {"decoder": {"num_steps": STEPS["decoder"], "sampler": "ddpm", "guidance_scale": GUIDANCE["decoder"]},
             "sr1": {"num_steps": STEPS["sr1"]}}
  got = np.clip(pipeline.variations(ours, image, seeds, options, as_float=True) * 0.5 + 0.5, 0, 1)
  assert got.shape == expected.shape == (n, 32, 32, 3)
  assert np.mean((expected > 0.01) & (expected < 0.99)) > 0.3
  err = np.abs(got - expected).max()
  assert err < 1e-3, err


def _run_sample_py(argv):
  from absl import flags

  import sample

  flags.FLAGS(["sample.py", *argv, "--compilation_cache", ""])
  try:
    sample.main(["sample.py"])
  finally:
    flags.FLAGS.unparse_flags()


def test_sample_py_on_the_converted_variations_checkpoint(karlo_variations, tmp_path, monkeypatch):
  """sample.py --checkpoint CONVERTED: variations write the pipeline's images; text is a one-line error."""
  ours, dst = karlo_variations["ours"], karlo_variations["dst"]
  loaded = []

  def load(path, **kwargs):  # the fixture's pipeline (already compiled), after checking what sample.py asks for
    loaded.append(path)
    return ours

  monkeypatch.setattr(pipeline.Pipeline, "load", load)
  image = np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  imaging.save_png(image, str(tmp_path / "cat.png"))
  out = tmp_path / "out"
  _run_sample_py(["--mode", "variations", "--image", str(tmp_path / "cat.png"), "--num_images", "2", "--seed", "5",
                  "--checkpoint", dst, "--decoder_steps", str(STEPS["decoder"]), "--decoder_sampler", "ddpm",
                  "--decoder_guidance", str(GUIDANCE["decoder"]), "--sr1_steps", str(STEPS["sr1"]), "--out", str(out)])
  assert loaded == [dst]
  options = {"decoder": {"num_steps": STEPS["decoder"], "sampler": "ddpm", "guidance_scale": GUIDANCE["decoder"]},
             "sr1": {"num_steps": STEPS["sr1"]}}
  expected = pipeline.variations(ours, image, [5, 6], options)
  for k, seed in enumerate((5, 6)):
    got = np.asarray(Image.open(out / f"cat_variation_seed{seed}.png"))
    np.testing.assert_array_equal(got, expected[k])
  with pytest.raises(SystemExit, match="^error: This checkpoint has no prior"):
    _run_sample_py(["--prompt", "a red circle", "--checkpoint", dst, "--out", str(out)])


def test_karlo_training_configs_hold_karlos_architecture():
  prior = karlo_configs.get_config("prior")
  assert (prior.model.width, prior.model.num_layers, prior.model.num_heads) == (2048, 20, 32)
  assert prior_lib.karlo_config().num_layers == 20
  decoder = karlo_configs.get_config("decoder")
  assert tuple(decoder.model.block_channels) == unet_lib.karlo_decoder().block_channels
  assert decoder.model.context_dim == 1536 and decoder.diffusion.variance_type == "learned_range"
  assert decoder.guidance_scale == 8.0 and decoder.sample_steps == 25
  sr = karlo_configs.get_config("sr1")
  assert sr.model.scale_shift is False and sr.sample_steps == 7 and (sr.low_res_resolution, sr.resolution) == (64, 256)
  with pytest.raises(ValueError, match="unknown stage 'sr2'.*prior, decoder, sr1"):  # Karlo has no 256 -> 1024
    karlo_configs.get_config("sr2")
