"""sample.py on the tiny random stack (tests/tiny_stack.py): its outputs (PNGs, JSON settings, a grid), its
one-line errors, the applications' modes, and the per-stage flags."""

import dataclasses
import json
import os

import numpy as np
import pytest
from tiny_stack import FAST, IMAGE_A, IMAGE_B

from unclip_jax import imaging, pipeline
from unclip_jax.cli import sample as sample_cli


def test_outputs_are_pngs_with_json_settings_and_a_grid(pipe, tmp_path):
  from PIL import Image

  jobs = [("a red circle", 11), ("a red circle", 12), ("a blue square above a green circle", 13)]
  images = pipe.text_to_image([p for p, _ in jobs], [s for _, s in jobs], FAST, up_to="decoder")
  paths = sample_cli.write_outputs(str(tmp_path), images, jobs, dict(pipeline.PRESETS["karlo"], **FAST),
                                   {"preset": "karlo"})
  assert len(paths) == 4 and "grid" in paths[-1]
  for (prompt, seed), path, image in zip(jobs, paths, images):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    meta = json.load(open(path[:-4] + ".json"))
    assert meta["prompt"] == prompt and meta["seed"] == seed and meta["options"]["decoder"]["num_steps"] == 3
  assert np.asarray(Image.open(paths[-1])).shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 3 images in a 2x2 grid


def test_sample_py_errors_are_one_line_with_nonzero_exit(tmp_path, stack_dir):
  import subprocess
  import sys

  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def run(*args):
    out = subprocess.run([sys.executable, "sample.py", *args], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    return out.returncode, out.stderr.strip()

  code, err = run("--prompt", "  ")
  assert code != 0 and err.startswith("error: give a non-empty --prompt")
  code, err = run("--prompt", "a red circle", "--checkpoint", str(tmp_path / "missing"))
  assert code != 0 and "does not exist" in err and "Traceback" not in err
  code, err = run("--prompt", "a red circle", "--checkpoint", str(tmp_path))
  assert code != 0 and "no pipeline.json" in err and "Traceback" not in err
  code, err = run("--prompt", "a red circle", "--mode", "dream")
  assert code != 0 and "--mode" in err and "Traceback" not in err
  # The applications' inputs are checked before anything is loaded.
  code, err = run("--mode", "variations")
  assert code != 0 and err == "error: --mode=variations needs --image."
  not_an_image = tmp_path / "x.png"
  not_an_image.write_text("hello")
  code, err = run("--mode", "variations", "--image", str(not_an_image))
  assert code != 0 and err.startswith("error: --image: cannot read") and str(not_an_image) in err
  assert len(err.splitlines()) == 1
  code, err = run("--mode", "textdiff", "--image", str(not_an_image), "--prompt", "a red circle")
  assert code != 0 and err == "error: --mode=textdiff needs --prompt2."


def test_sample_py_interpolate_writes_frames_with_json(pipe, tmp_path, monkeypatch):
  """sample.py in-process, with the test stack as the loaded checkpoint (its compiled functions reused)."""
  from absl import flags
  from PIL import Image

  import sample

  for name, image in (("a", IMAGE_A), ("b", IMAGE_B)):
    imaging.save_png(image, str(tmp_path / f"{name}.png"))
  monkeypatch.setattr(pipeline.Pipeline, "load", lambda *args, **kwargs: pipe)
  out = tmp_path / "out"
  flags.FLAGS(["sample.py", "--mode", "interpolate", "--image", str(tmp_path / "a.png"), "--image2",
               str(tmp_path / "b.png"), "--num_frames", "3", "--seed", "5", "--checkpoint", str(tmp_path),
               "--decoder_steps", "3", "--decoder_guidance", "3", "--up_to", "decoder", "--out", str(out),
               "--compilation_cache", ""])
  try:
    sample.main(["sample.py"])
  finally:
    flags.FLAGS.unparse_flags()
  frames = sorted(out.glob("interpolate_a_b_seed5_frame*.png"))
  assert [p.name[-11:] for p in frames] == ["frame00.png", "frame01.png", "frame02.png"]
  expected = pipeline.interpolate(pipe, IMAGE_A, IMAGE_B, 3, seed=5, options=FAST, up_to="decoder")
  for k, path in enumerate(frames):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected[k])
    meta = json.load(open(path.with_suffix(".json")))
    assert meta["mode"] == "interpolate" and meta["frame"] == k and meta["theta"] == [0.0, 0.5, 1.0][k]
    assert meta["seed"] == 5 and meta["prompt"] == "" and meta["image2"] == str(tmp_path / "b.png")
    assert meta["preset"] == "checkpoint" and "prior" not in meta["options"]
    assert meta["options"]["decoder"] == {"num_steps": 3, "sampler": "ddim", "eta": 0.0, "guidance_scale": 3.0,
                                          "clip_range": 1.0, "dynamic_threshold": None, "spacing": "linspace"}
  grid, = out.glob("grid_*.png")
  assert np.asarray(Image.open(grid)).shape == (16 + 4, 3 * 18 + 2, 3)  # one row of frames


def test_sample_py_interpolates_between_two_captions(pipe, tmp_path, monkeypatch):
  """--mode interpolate --prompt A --prompt2 B: the frames of applications.interpolate_captions, with the
  prior's options recorded (it samples both captions' z_i)."""
  from absl import flags
  from PIL import Image

  import sample

  monkeypatch.setattr(pipeline.Pipeline, "load", lambda *args, **kwargs: pipe)
  out = tmp_path / "out"
  flags.FLAGS(["sample.py", "--mode", "interpolate", "--prompt", "a red circle", "--prompt2", "a blue square",
               "--num_frames", "3", "--seed", "5", "--checkpoint", str(tmp_path), "--prior_steps", "3",
               "--prior_sampler", "ddpm", "--prior_guidance", "4", "--decoder_steps", "3", "--decoder_guidance", "3",
               "--up_to", "decoder", "--out", str(out), "--compilation_cache", ""])
  try:
    sample.main(["sample.py"])
  finally:
    flags.FLAGS.unparse_flags()
  frames = sorted(out.glob("interpolate_a_red_circle_a_blue_square_seed5_frame*.png"))
  assert len(frames) == 3
  expected = pipeline.interpolate_captions(pipe, "a red circle", "a blue square", 3, seed=5, options=FAST,
                                           up_to="decoder")
  for k, path in enumerate(frames):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected[k])
    meta = json.load(open(path.with_suffix(".json")))
    assert meta["prompt_a"] == "a red circle" and meta["prompt_b"] == "a blue square" and meta["prompt"] == ""
    assert meta["frame"] == k and meta["theta"] == [0.0, 0.5, 1.0][k] and meta["prior_candidates"] == 2
    assert meta["options"]["prior"] == dataclasses.asdict(FAST["prior"])
    assert meta["options"]["decoder"]["sampler"] == "ddim"


def test_sample_py_inpaints(pipe, tmp_path, monkeypatch):
  """--mode inpaint --image --mask --prompt: pipeline.inpaint's images, with the mask and resample_steps
  recorded; a missing --mask is a one-line error."""
  from absl import flags
  from PIL import Image

  import sample

  monkeypatch.setattr(pipeline.Pipeline, "load", lambda *args, **kwargs: pipe)
  mask = np.zeros(IMAGE_A.shape[:2], np.uint8)
  mask[:, :12] = 255
  Image.fromarray(IMAGE_A).save(tmp_path / "a.png")
  Image.fromarray(mask).save(tmp_path / "mask.png")
  out = tmp_path / "out"
  common = ["--prompt", "a blue square", "--image", str(tmp_path / "a.png"), "--checkpoint", str(tmp_path),
            "--out", str(out), "--compilation_cache", ""]
  for argv, error in ((["--mode", "inpaint"] + common, "--mode=inpaint needs --mask"),
                      (["--mode", "inpaint", "--mask", str(tmp_path / "mask.png"), "--num_images", "2", "--seed", "7",
                        "--resample_steps", "2", "--prior_steps", "3", "--prior_sampler", "ddpm", "--prior_guidance",
                        "4", "--decoder_steps", "3", "--decoder_sampler", "ddpm", "--decoder_guidance", "3",
                        "--up_to", "decoder"] + common, None)):
    flags.FLAGS(["sample.py"] + argv)
    try:
      if error:
        with pytest.raises(SystemExit, match=error):
          sample.main(["sample.py"])
      else:
        sample.main(["sample.py"])
    finally:
      flags.FLAGS.unparse_flags()
  expected = pipeline.inpaint(pipe, IMAGE_A, mask, "a blue square", [7, 8], FAST, resample_steps=2, up_to="decoder")
  for k, seed in enumerate((7, 8)):
    path = out / f"a_blue_square_inpaint_a_seed{seed}.png"
    np.testing.assert_array_equal(np.asarray(Image.open(path)), expected[k])
    meta = json.load(open(path.with_suffix(".json")))
    assert meta["mask"] == str(tmp_path / "mask.png") and meta["resample_steps"] == 2 and meta["mode"] == "inpaint"


def test_stage_flags_change_the_stage_options(pipe):
  """cli/stage_flags.py (sample.py's and eval_shapes.py's per-stage flags): each flag changes its stage's
  option and nothing else."""
  from absl import flags

  from unclip_jax.cli import stage_flags

  flags.FLAGS(["sample.py", "--prior_steps", "7", "--decoder_sampler", "dpmpp_2m", "--decoder_spacing", "logsnr",
               "--decoder_guidance", "2.5"])
  try:
    before = pipe.options_for("text")
    after = stage_flags.apply(before)
  finally:
    flags.FLAGS.unparse_flags()
  assert after["prior"] == dataclasses.replace(before["prior"], num_steps=7)
  assert after["decoder"] == dataclasses.replace(before["decoder"], sampler="dpmpp_2m", spacing="logsnr",
                                                 guidance_scale=2.5)
  assert after["sr1"] == before["sr1"] and after["sr2"] == before["sr2"]
