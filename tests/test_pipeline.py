"""The pipeline on a tiny random stack (CLIP, prior, decoder, sr1, sr2; tests/tiny_stack.py): text to
image, and the applications (variations, interpolations, text diffs). sample.py's side of it:
tests/test_sample_py.py."""

import gc
import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_stack import DDIM, FAST, IMAGE_A, IMAGE_B

from configs import shapes
from unclip_jax import cli, imaging, parallel, pipeline
from unclip_jax.diffusion import schedules
from unclip_jax.models import unet as unet_lib
from unclip_jax.pipeline import StageOptions
from unclip_jax.stages import contract


def test_text_to_image_shapes_and_seeds(pipe):
  prompts = ["a red circle above a blue square", "a green triangle"]
  a = pipe.text_to_image(prompts, [1, 2], FAST)
  assert a.shape == (2, 64, 64, 3) and a.dtype == np.uint8  # 16 -> 32 -> 64
  np.testing.assert_array_equal(a, pipe.text_to_image(prompts, [1, 2], FAST))  # bitwise repeatable
  b = pipe.text_to_image(prompts, [1, 3], FAST)
  np.testing.assert_array_equal(a[0], b[0])
  assert np.abs(a[1].astype(int) - b[1]).max() > 0
  low = pipe.text_to_image(prompts, [1, 2], FAST, up_to="decoder")
  assert low.shape == (2, 16, 16, 3)


def test_upsample_alone_continues_decode(pipe):
  """pipe.upsample on decode's 16 px floats gives decode's 64 px images (the same per-image noise);
  on 32 px images it starts at sr2; other sizes are refused with the upsamplers' input sizes."""
  z_i = pipe.prior(["a red circle above a blue square", "a green triangle"], [1, 2], FAST)
  low = pipe.decode(z_i, "", [1, 2], FAST, up_to="decoder")
  full = pipe.decode(z_i, "", [1, 2], FAST)
  np.testing.assert_allclose(pipe.upsample(low, [1, 2], FAST, as_float=True), full, atol=1e-5)
  mid = pipe.upsample(low, [1, 2], FAST, up_to="sr1")
  assert mid.shape == (2, 32, 32, 3) and mid.dtype == np.uint8
  assert pipe.upsample(mid, [1, 2], FAST).shape == (2, 64, 64, 3)
  with pytest.raises(ValueError, match=r"input size \{'sr1': 16, 'sr2': 32\}, got 20x20"):
    pipe.upsample(np.zeros((1, 20, 20, 3), np.uint8), [0], FAST)


def test_dpm_solver_reaches_every_stage(pipe):
  """At 2 steps every DPM-Solver++ step is first order (diffusion/dpm_solver.step_orders), which is
  DDIM with eta = 0: the option reaches each stage's loop (the prior's and decoder's preset is DDPM).
  Its higher-order steps are tested against diffusers in tests/test_dpm_solver.py."""
  prompts, seeds = ["a red circle above a blue square"], [4]
  def chain(sampler, steps):
    stage = dict(num_steps=steps, sampler=sampler, eta=0.0)
    options = {s: dict(stage, guidance_scale=3.0) if s in ("prior", "decoder") else stage for s in FAST}
    return pipe.text_to_image(prompts, seeds, options, as_float=True)
  np.testing.assert_allclose(chain("dpmpp_2m", 2), chain("ddim", 2), atol=1e-4, rtol=0)


def test_spacing_option_reaches_every_stage(pipe, monkeypatch):
  """StageOptions.spacing builds each stage's chain (the prior's inside its jit, the others' in
  their sampler_from_export); an unknown spacing is refused with the options."""
  made = []
  make_schedule = schedules.make_schedule

  def spy(name="cosine", num_timesteps=1000, num_steps=None, spacing="linspace", **kwargs):
    made.append((num_steps, spacing))
    return make_schedule(name, num_timesteps, num_steps, spacing, **kwargs)

  monkeypatch.setattr(schedules, "make_schedule", spy)
  options = {s: dict(num_steps=4, sampler="dpmpp_2m", spacing="logsnr") for s in FAST}
  images = pipe.text_to_image(["a red circle"], [4], options, as_float=True)
  assert made.count((4, "logsnr")) == len(FAST) and np.all(np.isfinite(images))
  with pytest.raises(ValueError, match="Bad sampling options"):
    pipe.options_for("text", {"decoder": {"spacing": "karras"}})


def test_text_to_image_is_prior_then_decode(pipe):
  """The prior as a public step: its z_i decoded with the same captions and seeds are text_to_image's images."""
  prompts, seeds = ["a red circle above a blue square", "a green triangle"], [1, 2]
  z_i = pipe.prior(prompts, seeds, FAST)
  assert z_i.shape == (2, pipe.clip.embed_dim) and z_i.dtype == np.float32
  images = pipe.decode(z_i, prompts, seeds, FAST)
  np.testing.assert_array_equal(images, pipe.text_to_image(prompts, seeds, FAST, as_float=True))
  with pytest.raises(ValueError, match="2 prompts for 1 seeds"):
    pipe.prior(prompts, [1])


def test_caption_interpolation_end_frames_are_each_captions_own_image(pipe):
  """interpolate_captions: the ends are each caption's z_i (pipe.prior, same seed) decoded alone."""
  captions = ("a red circle", "a green square")
  frames = pipeline.interpolate_captions(pipe, *captions, 3, seed=5, options=FAST, up_to="decoder", as_float=True)
  assert frames.shape == (3, 16, 16, 3)
  options = pipe.options_for("interpolate", FAST)
  own = np.concatenate([pipe.decode(pipe.prior([c], [5], options), "", [5], options, up_to="decoder")
                        for c in captions])
  np.testing.assert_allclose(frames[[0, -1]], own, atol=DECODER_ATOL, rtol=0)
  # The middle frame is another image: ~1e-4 from either end (the random decoder depends on z_i only weakly).
  assert min(np.abs(frames[1] - own[0]).max(), np.abs(frames[1] - own[1]).max()) > 3 * DECODER_ATOL
  with pytest.raises(pipeline.InputError, match="num_frames"):
    pipeline.interpolate_captions(pipe, *captions, 1)


# Float tolerances of "the same image in another batch / on other devices". XLA
# compiles a batch of 4 (or a shard) with other loop blockings than a batch of 1,
# so sums are taken in another order: a few 1e-6 at the decoder's output. The
# random upsamplers then amplify such differences about 100x (their noisiest
# step divides the prediction by sqrt(abar) of the last training timestep), so
# the whole chain is compared at 1e-3 (measured: 3e-4), the decoder's images at 1e-5.
DECODER_ATOL, CHAIN_ATOL = 1e-5, 1e-3


def test_progress_bars_drawn_between_steps_leave_the_images_unchanged(pipe, capsys):
  """With progress on (sample.py's way: on all devices), each stage's loop runs a step per call under
  its bar (no host callback in it, so JAX's persistent cache can store it: tests/test_compile_cache.py),
  after one "compiling STAGE..." line, in two programs (its start and a step); the images are
  those of the one-call loops."""
  shown = pipeline.Pipeline(pipe.clip, pipe.params, pipe.exports, mesh=parallel.sampling_mesh(), progress=True)
  prompts, seeds = ["a red circle above a blue square", "a green triangle"], [1, 2]
  images = shown.text_to_image(prompts, seeds, FAST, as_float=True)
  err = capsys.readouterr().err
  for stage in FAST:
    steps = FAST[stage].num_steps
    assert err.count(f"compiling {stage}...") == 1 and f"{stage}: 100%" in err and f"{steps}/{steps}" in err
  # Two programs per stage: the start's outputs placed as a step's (batch-split), or a step compiles twice.
  assert [jitted._cache_size() for jitted in shown._compiled.values()] == [2] * len(FAST)
  np.testing.assert_allclose(images, pipe.text_to_image(prompts, seeds, FAST, as_float=True), atol=CHAIN_ATOL,
                             rtol=0)
  shown.text_to_image(prompts, seeds, FAST)
  assert "compiling" not in capsys.readouterr().err  # compiled once per stage, options and batch


def test_batch_equals_single_runs(pipe):
  prompts = ["a red circle", "a blue square", "a yellow triangle", "a purple circle"]
  seeds = [5, 6, 7, 8]
  for up_to, atol in (("decoder", DECODER_ATOL), (None, CHAIN_ATOL)):
    batch = pipe.text_to_image(prompts, seeds, FAST, up_to=up_to, as_float=True)
    singles = np.concatenate([pipe.text_to_image([p], [s], FAST, up_to=up_to, as_float=True)
                              for p, s in zip(prompts, seeds)])
    assert batch.dtype == np.float32 and batch.shape == (4,) + 2 * (16 if up_to else 64,) + (3,)
    np.testing.assert_allclose(batch, singles, atol=atol, rtol=0)


def test_eight_devices_equal_one(stack_dir, pipe):
  mesh = parallel.sampling_mesh()  # what sample.py uses: all 8 local devices on "data"
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  sharded = pipeline.Pipeline.load(stack_dir, mesh=mesh)
  prompts = ["a red circle", "a blue square", "a green square"]  # 3: padded to 8 devices
  for up_to, atol in (("decoder", DECODER_ATOL), (None, CHAIN_ATOL)):
    one = pipe.text_to_image(prompts, [1, 2, 3], FAST, up_to=up_to, as_float=True)
    eight = sharded.text_to_image(prompts, [1, 2, 3], FAST, up_to=up_to, as_float=True)
    assert eight.shape == one.shape
    np.testing.assert_allclose(eight, one, atol=atol, rtol=0)


def test_sharded_params_equal_replicated(stack_dir, pipe):
  """shard_params: every weight of >= parallel.FSDP_MIN_SIZE elements is split over the 8 devices (each
  holds an eighth), and the images are the replicated pipeline's within the 8-device tolerance (a split
  weight changes XLA's summation order, as a split batch does)."""
  sharded = pipeline.Pipeline.load(stack_dir, mesh=parallel.sampling_mesh(), shard_params=True)
  for stage in sharded.stages:
    weight = max(jax.tree.leaves(sharded.params[stage]), key=lambda x: x.size)
    assert weight.size >= parallel.FSDP_MIN_SIZE and len(weight.sharding.device_set) == 8
    assert {s.data.size for s in weight.addressable_shards} == {weight.size // 8}, (stage, weight.sharding)
  prompts = ["a red circle", "a blue square", "a green square"]
  for up_to, atol in (("decoder", DECODER_ATOL), (None, CHAIN_ATOL)):
    one = pipe.text_to_image(prompts, [1, 2, 3], FAST, up_to=up_to, as_float=True)
    split = sharded.text_to_image(prompts, [1, 2, 3], FAST, up_to=up_to, as_float=True)
    np.testing.assert_allclose(split, one, atol=atol, rtol=0)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_pipeline_held_in_a_narrower_dtype(stack_dir, pipe, dtype):
  """dtype: weights held and computed in it (the prior's latent stats stay float32); the decoder's
  images stay near float32's: a mean absolute difference of 0.030 (bfloat16) and 0.0056 (float16) on
  [-1, 1] (this random tiny stack; a pixel here and there moves more under guidance)."""
  narrow = pipeline.Pipeline.load(stack_dir, dtype=dtype)
  floats = [x for x in jax.tree.leaves({k: v for k, v in narrow.params.items() if k != "prior"})]
  floats += jax.tree.leaves(narrow.params["prior"]["params"])
  assert {np.asarray(x).dtype.name for x in floats} == {dtype}
  assert {np.asarray(x).dtype.name for x in jax.tree.leaves(narrow.params["prior"]["stats"])} == {"float32"}
  assert narrow.exports["prior"].dtype == dtype and narrow.exports["decoder"].model.dtype == dtype
  one = pipe.text_to_image(["a red circle", "a blue square"], [1, 2], FAST, up_to="decoder", as_float=True)
  low = narrow.text_to_image(["a red circle", "a blue square"], [1, 2], FAST, up_to="decoder", as_float=True)
  assert np.abs(low - one).mean() < {"bfloat16": 0.06, "float16": 0.015}[dtype]
  with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16"):
    pipeline.Pipeline.load(stack_dir, dtype="int8")


def test_inpainting_keeps_the_pixels_outside_the_mask(pipe):
  """pipeline.inpaint: at every stage's resolution the kept pixels are the image's (its centre square
  resized), so the final image equals the input outside the mask (after the same resize), and the
  painted part differs between seeds. A mask of another size, an empty mask and DPM-Solver are
  one-line errors."""
  mask = np.zeros(IMAGE_A.shape[:2], np.uint8)
  mask[:12] = 255  # repaint the top half
  for up_to in ("decoder", None):
    out = pipeline.inpaint(pipe, IMAGE_A, mask, "a blue square", [3, 4], FAST, resample_steps=2, up_to=up_to)
    size = out.shape[1]
    expected = imaging.square(IMAGE_A, size)[0]
    kept = imaging.square(np.repeat(mask[..., None], 3, -1), size)[0, ..., 0] < 128
    assert kept.any() and (~kept).any()
    np.testing.assert_array_equal(out[:, kept], np.broadcast_to(expected[kept], out[:, kept].shape))
    assert np.abs(out[0, ~kept].astype(int) - out[1, ~kept]).mean() > 1
  with pytest.raises(pipeline.InputError, match="same size"):
    pipeline.inpaint(pipe, IMAGE_A, mask[:10], "a blue square", [0], FAST)
  with pytest.raises(pipeline.InputError, match="no white pixels"):
    pipeline.inpaint(pipe, IMAGE_A, np.zeros_like(mask), "a blue square", [0], FAST)
  with pytest.raises(pipeline.InputError, match="ddpm or ddim"):
    pipeline.inpaint(pipe, IMAGE_A, mask, "a blue square", [0], dict(FAST, decoder={"sampler": "dpmpp_2m"}))


def test_cpu_devices_follow_the_cores_and_the_batch(monkeypatch):
  """sample.py's and train.py's split of a CPU host (cli.use_cpu_cores): one device per core, no more
  than the batch's images, other XLA flags kept, and a device count the user set left alone."""
  monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(4)))
  environ = {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}
  assert cli.use_cpu_cores(16, environ) == 4
  assert environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_force_host_platform_device_count=4"
  assert cli.use_cpu_cores(16, environ) is None and environ["XLA_FLAGS"].count("device_count") == 1
  environ = {}
  assert cli.use_cpu_cores(3, environ) == 3 and environ["XLA_FLAGS"].endswith("=3")
  assert cli.use_cpu_cores(0, {}) == 1
  # train.py's data axis: the largest count of at most one per core that divides the batch
  assert cli.use_cpu_cores(16, {}, divide_batch=True) == 4
  assert cli.use_cpu_cores(6, {}, divide_batch=True) == 3
  assert cli.use_cpu_cores(7, {}, divide_batch=True) == 1


def test_interpolation_end_frames_are_the_plain_decodes(pipe):
  z = np.concatenate([pipe.image_embeddings(IMAGE_A), pipe.image_embeddings(IMAGE_B)])
  decoder_only = pipe.options_for("interpolate", DDIM)
  assert decoder_only["decoder"] == DDIM["decoder"]
  # Fixed noise: every frame starts from seed 5's x_T, so the ends are decode(z_a), decode(z_b) for seed 5.
  frames = pipeline.interpolate(pipe, IMAGE_A, IMAGE_B, 3, seed=5, options=FAST, up_to="decoder", as_float=True)
  plain = pipe.decode(z, "", [5, 5], decoder_only, up_to="decoder")
  assert frames.shape == (3, 16, 16, 3)
  np.testing.assert_allclose(frames[[0, -1]], plain, atol=DECODER_ATOL, rtol=0)
  # The middle frame is another image (the random decoder's output depends on z_i only weakly).
  assert min(np.abs(frames[1] - plain[0]).max(), np.abs(frames[1] - plain[1]).max()) > 10 * DECODER_ATOL
  # Slerped noise: the ends start from each image's own DDIM inversion.
  frames = pipeline.interpolate(pipe, IMAGE_A, IMAGE_B, 3, seed=5, options=FAST, noise="slerp", up_to="decoder",
                                as_float=True)
  x_T = np.concatenate([pipe.invert(IMAGE_A, options=FAST), pipe.invert(IMAGE_B, options=FAST)])
  ends = pipe.decode(z, "", [5, 5], decoder_only, x_T=x_T, up_to="decoder")
  np.testing.assert_allclose(frames[[0, -1]], ends, atol=DECODER_ATOL, rtol=0)


def test_text_diff_at_theta_zero_is_the_inversion_reconstruction(pipe):
  frames = pipeline.text_diff(pipe, IMAGE_A, "a red square", "a blue circle", [0.0, 0.5], FAST, seed=3,
                              up_to="decoder", as_float=True)
  z = pipe.image_embeddings(IMAGE_A)
  x_T = pipe.invert(IMAGE_A, options=FAST)
  reconstruction = pipe.decode(np.repeat(z, 2, 0), "", [3, 3], pipe.options_for("textdiff", FAST),
                               x_T=np.repeat(x_T, 2, 0), up_to="decoder")
  np.testing.assert_allclose(frames[0], reconstruction[0], atol=DECODER_ATOL, rtol=0)
  assert np.abs(frames[1] - frames[0]).max() > 0.1  # theta = 0.5 moves toward the target caption
  with pytest.raises(pipeline.InputError, match="same CLIP embedding"):
    pipeline.text_diff(pipe, IMAGE_A, "a red square", "a red square", [0.5], FAST)


def test_variations(pipe, tmp_path):
  assert pipe.options_for("variations")["decoder"].sampler == "ddim"  # the default: DDIM with eta = 1
  assert pipe.options_for("variations")["decoder"].eta == 1.0
  options = dict(FAST, decoder=StageOptions(3, "ddim", eta=1.0, guidance_scale=3.0))
  a = pipeline.variations(pipe, IMAGE_A, [1, 2, 3], options, up_to="decoder")
  assert a.shape == (3, 16, 16, 3) and a.dtype == np.uint8  # one per seed
  np.testing.assert_array_equal(a, pipeline.variations(pipe, IMAGE_A, [1, 2, 3], options, up_to="decoder"))
  assert all(np.abs(a[i].astype(int) - a[j]).max() > 0 for i, j in ((0, 1), (0, 2), (1, 2)))
  imaging.save_png(IMAGE_A, str(tmp_path / "a.png"))  # a file gives the same images as its array
  np.testing.assert_array_equal(pipeline.variations(pipe, str(tmp_path / "a.png"), [1, 2, 3], options,
                                                   up_to="decoder"), a)


class _GaussianImageDenoiser:
  """Stands in for the decoder's U-Net: the exact E[eps | x_t] for images whose
  pixels are N(m, 0.3^2), m set by z_i and the caption (the null z_i: m = 0)."""

  def __init__(self, cfg, alphas_cumprod):
    self.cfg, self.alphas_cumprod = cfg, jnp.asarray(alphas_cumprod, jnp.float32)

  def apply(self, variables, x, t, *, image_embed, text_embed, drop_image, **unused):
    m = jnp.where(drop_image[:, None], 0.0, 0.3 * jnp.tanh(image_embed[:, :3] + text_embed[:, :3]))
    a = self.alphas_cumprod[t][:, None, None, None]
    eps = jnp.sqrt(1.0 - a) * (x - jnp.sqrt(a) * m[:, None, None, :]) / (a * 0.09 + 1.0 - a)
    return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)  # learned-range channels: unused by DDIM


def test_ddim_inversion_round_trip(pipe, monkeypatch):
  """invert then decode gives the image back, through the pipeline's own resizing,
  conditioning, guidance (3), x_0 clamp (+-1) and 10-step DDIM chain.

  The U-Net is the exact denoiser of Gaussian images here: a random U-Net is no
  denoiser, and at the cosine schedule's last step (abar = 2.4e-9) its x_0
  prediction is clamp noise that decides the decode, which makes decoding it
  non-invertible in practice (measured: relative error ~2 whatever the
  iterations). With a denoiser every DDIM step is affine and well conditioned,
  so 8 fixed-point iterations reach float32 precision: relative error < 1e-4
  (the exact-model bound of tests/test_samplers.py), against > 1e-3 for plain
  inversion.
  """
  diffusion = pipe.exports["decoder"].diffusion
  alphas_cumprod = np.cumprod(1.0 - schedules.make_betas(diffusion.schedule, diffusion.num_timesteps))
  monkeypatch.setattr(unet_lib, "UNet", lambda cfg: _GaussianImageDenoiser(cfg, alphas_cumprod))
  exact = pipeline.Pipeline(pipe.clip, pipe.params, pipe.exports)  # its own compiled functions
  options = {"decoder": StageOptions(10, "ddim", guidance_scale=3.0)}
  images = np.stack([IMAGE_A, IMAGE_A[::-1, ::-1]])
  target = imaging.to_model_range(imaging.square(images, 16))
  z = exact.image_embeddings(images)

  def error(x_T):
    out = exact.decode(z, "", [0, 1], exact.options_for("textdiff", options), x_T=x_T, up_to="decoder")
    return np.linalg.norm(out - target) / np.linalg.norm(target)

  assert error(exact.invert(images, options=options)) < 1e-4
  assert error(exact.invert(images, options=options, fixed_point_iters=0)) > 1e-3
  assert error(exact.invert(images, -z, options=options)) > 1e-2  # inverted under another z_i


def test_bad_images_are_clear_errors(pipe, tmp_path):
  not_an_image = tmp_path / "x.png"
  not_an_image.write_text("hello")
  with pytest.raises(imaging.ImageError, match="x.png"):
    pipeline.variations(pipe, str(not_an_image), [0])
  with pytest.raises(imaging.ImageError, match="does not exist"):
    pipe.image_embeddings(str(tmp_path / "missing.png"))
  with pytest.raises(imaging.ImageError, match="uint8"):
    pipe.image_embeddings(IMAGE_A / 255.0)
  with pytest.raises(imaging.ImageError, match="RGB"):
    pipe.image_embeddings(np.zeros((8, 8, 4), np.uint8))
  with pytest.raises(imaging.ImageError, match="one image"):
    pipeline.variations(pipe, np.stack([IMAGE_A, IMAGE_A]), [0])
  with pytest.raises(pipeline.InputError, match="num_frames"):
    pipeline.interpolate(pipe, IMAGE_A, IMAGE_B, 1)
  assert isinstance(imaging.ImageError("x"), ValueError)


def test_checkpoint_default_options(tmp_path, stack_dir, pipe):
  assert pipe.default_options == pipeline.PRESETS["karlo"]  # a pipeline.json without "options"
  folders = {name: f"{stack_dir}/{name}" for name in ("clip", "prior", "decoder")}
  path = pipeline.assemble(str(tmp_path / "ckpt"), options={"decoder": {"num_steps": 7, "guidance_scale": 2.0},
                                                            "sr1": StageOptions(3, "ddim")}, **folders)
  loaded = pipeline.Pipeline.load(path)
  karlo = pipeline.PRESETS["karlo"]
  assert loaded.default_options == dict(karlo, decoder=StageOptions(7, "ddpm", guidance_scale=2.0),
                                        sr1=StageOptions(3, "ddim"))
  assert loaded.options_for("text") == loaded.default_options  # what text_to_image uses when options is None
  assert loaded.options_for("text", {"decoder": {"num_steps": 4}})["decoder"] == StageOptions(4, guidance_scale=2.0)
  with pytest.raises(ValueError, match="Unknown sampling option"):
    pipeline.assemble(str(tmp_path / "bad"), options={"decoder": {"steps": 7}}, **folders)
  layout = json.load(open(f"{path}/pipeline.json"))
  layout["options"] = {"decoder": {"steps": 7}}
  json.dump(layout, open(f"{path}/pipeline.json", "w"))
  with pytest.raises(pipeline.CheckpointError, match="options"):
    pipeline.Pipeline.load(path)


def test_float16_storage_halves_the_checkpoint_and_samples_in_float32(tmp_path, stack_dir, pipe):
  from unclip_jax import checkpoints

  folders = {name: f"{stack_dir}/{name}" for name in ("clip", *pipeline.STAGES)}
  path = pipeline.assemble(str(tmp_path / "f16"), param_dtype="float16", **folders)
  stored, _ = checkpoints.load_inference(f"{path}/decoder")
  assert {x.dtype for x in jax.tree.leaves(stored)} == {np.dtype("float16")}
  original, _ = checkpoints.load_inference(f"{stack_dir}/decoder")
  for a, b in zip(jax.tree.leaves(stored), jax.tree.leaves(original)):  # rounded, not rescaled or reordered
    np.testing.assert_array_equal(a, b.astype(np.float16))
  half = pipeline.Pipeline.load(path)
  assert {x.dtype for x in jax.tree.leaves(half.params)} == {np.dtype("float32")}
  z_i = pipe.image_embeddings([IMAGE_A, IMAGE_A[::-1]])
  ours = half.decode(z_i, "", [1, 2], FAST, up_to="decoder")
  full = pipe.decode(z_i, "", [1, 2], FAST, up_to="decoder")
  assert np.abs(ours - full).max() < 2e-2  # float16 rounding of the weights, nothing more


def test_a_dropped_pipeline_is_garbage_collected(pipe):
  """The compiled loops are cached on the pipeline, not in a global cache that would keep it (its
  params and executables) alive until the process ends."""
  other = pipeline.Pipeline(pipe.clip, pipe.params, pipe.exports)
  other.decode(pipe.image_embeddings(IMAGE_A), "", [0], FAST, up_to="decoder")
  assert other._compiled  # a compiled loop to keep it alive, were it cached globally
  gone = weakref.ref(other)
  del other
  gc.collect()
  assert gone() is None


def test_rng_streams_keep_their_numbers():
  """A stage's noise comes from fold_in(key(seed), its stream): renumbering would change every image."""
  assert pipeline.RNG_STREAMS == {"prior": 0, "decoder": 1, "sr1": 2, "sr2": 3}
  want = jax.random.key_data(jax.random.fold_in(jax.random.key(4), 2))
  np.testing.assert_array_equal(jax.random.key_data(pipeline.stage_keys([3, 4], "sr1"))[1], want)


def test_export_records_read_what_earlier_versions_wrote():
  """The demo's exports predate the records (no prediction or variance type, no prior dtype) and a Karlo
  conversion spells the fixed variance the diffusers way: each reads as the record those versions
  sampled with, and a record's own JSON reads back to itself."""
  demo = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shapes_demo")
  exports = {}
  for stage in pipeline.STAGES:
    with open(os.path.join(demo, stage, "config.json")) as f:
      exports[stage] = contract.read(json.load(f))
    assert contract.read(exports[stage].to_json()) == exports[stage]
  assert exports["prior"].diffusion == contract.Diffusion("cosine", 1000, "x0", "fixed_small")
  assert exports["prior"].dtype == "float32"
  assert exports["decoder"].diffusion.variance_type == "learned_range"  # from its 6 output channels
  assert exports["sr2"].diffusion == contract.Diffusion("linear", 1000, "v", "fixed_small")
  karlo_prior = dict(exports["prior"].to_json(), diffusion={
      "schedule": "cosine", "num_timesteps": 1000, "prediction_type": "x0", "variance_type": "fixed_small_log",
      "clip_sample_range": 5.0})
  assert contract.read(karlo_prior) == exports["prior"]
  with pytest.raises(ValueError, match="variance_type"):
    contract.read(dict(exports["sr1"].to_json(), diffusion={"variance_type": "learned_range"}))  # 3 channels


def test_bad_checkpoints_are_clear_errors(tmp_path, stack_dir):
  with pytest.raises(pipeline.CheckpointError, match="no pipeline.json"):
    pipeline.Pipeline.load(str(tmp_path))
  with pytest.raises(pipeline.CheckpointError, match="CLIP"):
    pipeline.Pipeline.load(stack_dir, clip_dir=str(tmp_path / "nothing"))


def test_a_clip_of_other_widths_is_refused_at_load(tmp_path, stack_dir):
  from unclip_jax.stages import clip as clip_stage

  config = shapes.get_config("clip,tiny")
  config.model.embed_dim = 24  # the stack's stages were built for 16
  stage = clip_stage.ClipStage(config, str(tmp_path))
  stage.export(stage.init_params(jax.random.key(0)), str(tmp_path / "clip24"))
  with pytest.raises(pipeline.CheckpointError, match=r"The prior does not fit the CLIP .* expects embedding width 16 "
                     r"\(the CLIP has 24\)"):
    pipeline.Pipeline.load(stack_dir, clip_dir=str(tmp_path / "clip24"))
