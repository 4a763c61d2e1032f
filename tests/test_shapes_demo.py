"""The shipped Shapes demo checkpoint and the one command that trains it."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from configs import shapes
from unclip_jax import checkpoints, cli, imaging, pipeline
from unclip_jax.data import shapes as shapes_data
from unclip_jax.eval import shapes as shapes_eval
from unclip_jax.models import clip as clip_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "shapes_demo")


def _size_mb(path: str) -> float:
  return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files) / 2**20


@pytest.mark.slow  # compiles the four stages' sampling loops and runs them at the demo's own settings
def test_shipped_demo_loads_and_draws_a_prompt():
  assert _size_mb(DEMO) <= 30
  pipe = pipeline.Pipeline.load(DEMO)
  assert pipe.stages == ("prior", "decoder", "sr1", "sr2")
  image = pipe.text_to_image(["a red circle above a blue square"], [0])
  assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
  # The Shapes analyser finds the caption's two colours (and no other); noise or a flat canvas fails.
  # How good the demo is over many prompts is benchmarks/eval_shapes.py's job (docs/benchmarks.md).
  assert shapes_eval.score_image(image[0], "a red circle above a blue square").color


@pytest.mark.slow
def test_sample_py_is_quiet_before_its_progress_bars(tmp_path):
  """The quick start's command prints nothing but one compile line and one bar per stage on stderr
  (no absl/Orbax/JAX INFO lines, no transformers notices); --verbosity 0 brings the INFO lines back."""
  command = [sys.executable, "sample.py", "--prompt", "a red circle", "--up_to", "decoder", "--prior_steps", "2",
             "--decoder_steps", "2", "--out", str(tmp_path / "out"), "--compilation_cache", ""]
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("TRANSFORMERS_VERBOSITY", None)
  quiet = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=env)
  assert quiet.returncode == 0, quiet.stderr[-3000:]
  lines = [line for line in re.split(r"[\r\n]", quiet.stderr) if line.strip()]
  assert [line for line in lines if line.startswith("compiling")] == ["compiling prior...", "compiling decoder..."]
  assert all(re.match(r"(compiling (prior|decoder)\.\.\.|(prior|decoder): )", line) for line in lines), lines
  # With XLA_FLAGS setting no device count, the CPU is split into one device per core, at most one per image.
  env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  verbose = subprocess.run(command + ["--verbosity", "0", "--seed", "1", "--prompt", "a blue square"], cwd=ROOT,
                           capture_output=True, text=True, env=env)
  assert verbose.returncode == 0 and re.search(r"^I\d{4} ", verbose.stderr, re.MULTILINE), verbose.stderr[-3000:]
  assert f"sampling on {min(len(os.sched_getaffinity(0)), 2)} cpu device(s)" in verbose.stderr, verbose.stderr[-3000:]


@pytest.mark.slow
def test_sample_py_in_bfloat16_draws_the_captions_colours(tmp_path):
  """--dtype bfloat16: the demo held and run in bfloat16 still draws the caption's colours (the
  analyser's check), and the image's JSON records the dtype."""
  caption = "a red circle above a blue square"
  command = [sys.executable, "sample.py", "--prompt", caption, "--dtype", "bfloat16", "--up_to", "decoder",
             "--out", str(tmp_path), "--compilation_cache", ""]
  result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 0, result.stderr[-3000:]
  png = tmp_path / "a_red_circle_above_a_blue_square_seed0.png"
  assert shapes_eval.score_image(imaging.load_image(str(png)), caption).color
  assert json.loads(png.with_suffix(".json").read_text())["dtype"] == "bfloat16"


@pytest.mark.slow
def test_the_demo_repaints_the_masked_half_after_the_prompt():
  """Inpainting on the demo: a red circle above a blue square, the top half masked and repainted after
  "a green circle above a blue square": the analyser finds green and blue (the red is gone) in each
  image, and the bottom half is the input's. (4 seeds of 4 pass at resample_steps=5: 2026-12-01 at the
  earlier 25 / 10 / 10 decoder and upsampler steps, 2026-12-05 at today's 10 / 3 / 3.)"""
  scene = shapes_data.Scene((shapes_data.Thing("circle", "red", 0.5, 0.25, 0.35),
                             shapes_data.Thing("square", "blue", 0.5, 0.75, 0.35)), "above")
  image = shapes_data.render(scene, 64)
  mask = np.zeros((64, 64), np.uint8)
  mask[:32] = 255
  pipe = pipeline.Pipeline.load(DEMO)
  out = pipeline.inpaint(pipe, image, mask, "a green circle above a blue square", [0, 1], resample_steps=5)
  for repainted in out:
    assert shapes_eval.score_image(repainted, "a green circle above a blue square").color
  np.testing.assert_array_equal(out[:, 40:], np.broadcast_to(image[40:], out[:, 40:].shape))


@pytest.mark.slow
def test_the_demos_autoregressive_prior_draws_the_captions():
  """--prior ar on the demo: the AR prior's z_i for 8 held-out captions, decoded at the decoder's 16 px,
  show their captions' colours (the analyser's check) at least 6 times (over 200 captions at 64 px its
  colour accuracy is 0.915, docs/benchmarks.md "The two priors"; 8 of 8 here at 25 and at 10 decoder
  steps), and it runs with the checkpoint's "ar_prior" options."""
  pipe = pipeline.Pipeline.load(DEMO, prior="ar")
  assert pipe.exports["prior"].stage == "ar_prior" and pipe.default_options["prior"].guidance_scale == 1.5
  captions = [shapes_data.sample_scene(12345, i).caption for i in range(8)]
  images = pipe.text_to_image(captions, list(range(8)), up_to="decoder")
  right = [shapes_eval.score_image(image, caption).color for image, caption in zip(images, captions)]
  assert sum(right) >= 6, list(zip(captions, right))


@pytest.mark.slow
def test_train_script_runs_every_stage_and_assembles_a_checkpoint(tmp_path):
  runs, out = tmp_path / "runs", tmp_path / "demo"
  # The command as on a CPU machine: no device count in XLA_FLAGS (not conftest.py's 8 fake devices), so
  # train.py splits the host into one device per core that divides the batch. XLA's backend optimisation
  # level 0: the processes' time is compiling, and what is checked below (exit status, devices,
  # checkpoints, exports, the assembled checkpoint) does not depend on how fast the code XLA generates runs.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "train_shapes_demo.sh"), "tiny", str(runs), str(out)],
                          capture_output=True, text=True, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  devices = cli.use_cpu_cores(shapes.get_config("clip,tiny").batch_size, environ={}, divide_batch=True)
  assert result.stderr.count(f"Mesh {{'data': {devices}, 'fsdp': 1, 'tensor': 1}}") == 6, result.stderr[-3000:]
  for stage in ("clip", "prior", "ar_prior", "decoder", "sr1", "sr2"):  # two steps each, checkpointed, exported
    assert "2" in os.listdir(runs / stage / "checkpoints"), stage
    if stage != "clip":  # the CLIP exports a Hugging Face folder
      assert json.load(open(runs / stage / "export" / "config.json"))["stage"] == stage
  embed_dim = shapes.get_config("clip,tiny").model.embed_dim
  assert clip_lib.load_clip(str(runs / "clip" / "export")).embed_dim == embed_dim
  prior_params, prior_config = checkpoints.load_inference(str(runs / "prior" / "export"))
  clip_mean = np.asarray(prior_params["stats"]["clip_mean"])  # the latent stats travel with the prior
  assert prior_config["model"]["clip_dim"] == embed_dim and clip_mean.shape == (embed_dim,)
  assert np.all(np.isfinite(clip_mean))
  codebook = checkpoints.load_inference(str(runs / "ar_prior" / "export"))[0]["codebook"]  # and the AR codebook
  assert np.asarray(codebook["components"]).shape == (shapes.get_config("ar_prior,tiny").model.num_codes, embed_dim)
  pipe = pipeline.Pipeline.load(str(out))
  assert pipe.stages == ("prior", "decoder", "sr1", "sr2")
  assert pipeline.Pipeline.load(str(out), prior="ar").exports["prior"].stage == "ar_prior"
