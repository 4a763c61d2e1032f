"""What the sampling side does when things break (issue #23): bad command lines of sample.py and of the
converter are one-line errors before any model work; a damaged checkpoint is one line naming what is
damaged; a run never replaces the images of other settings; transparency is composited on white."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import flags
from PIL import Image

from unclip_jax import imaging, pipeline
from unclip_jax.cli import sample as sample_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "assets", "shapes_demo")
SEED_MAX = 2**32 - 1
NOT_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no folder is unwritable")


def _run(module_or_script: list[str], args: list[str], tmp_path) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, *module_or_script, *[a.format(tmp=tmp_path) for a in args]], cwd=ROOT,
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _prepare(tmp_path):
  """What the cases name: a file, a folder no one may write in, an image, a Latin-1 prompts file."""
  (tmp_path / "a_file").write_text("not a folder")
  (tmp_path / "locked").mkdir()
  os.chmod(tmp_path / "locked", 0o500)
  imaging.save_png(np.zeros((8, 8, 3), np.uint8), tmp_path / "a.png")
  (tmp_path / "prompts.txt").write_bytes("a red circle\nun cercle rouge tr\xe8s vif\n".encode("latin-1"))


# --- sample.py: each case one line, exit status 1, no traceback, before the model loads ---------------------

SAMPLE_CASES = {
    # id: (arguments after sample.py ({tmp} is tmp_path), the last line of stderr)
    "out is a file": (["--prompt", "a red circle", "--out", "{tmp}/a_file"],
                      "error: --out '{tmp}/a_file' is a file: name a folder (it is created if missing)."),
    "out inside a file": (["--prompt", "a red circle", "--out", "{tmp}/a_file/samples"],
                          "error: --out '{tmp}/a_file/samples' is inside '{tmp}/a_file', which is a file: name a "
                          "folder (it is created if missing)."),
    "out not writable": pytest.param(["--prompt", "a red circle", "--out", "{tmp}/locked/samples"],
                                     "error: --out '{tmp}/locked/samples': cannot write in '{tmp}/locked'; name a "
                                     "folder you can write to.", marks=NOT_ROOT),
    "seed -1": (["--prompt", "a red circle", "--seed", "-1"],
                f"error: --seed must be in 0..{SEED_MAX} (2**32 - 1), got -1."),
    "seed 2**32": (["--prompt", "a red circle", "--seed", str(SEED_MAX + 1)],
                   f"error: --seed must be in 0..{SEED_MAX} (2**32 - 1), got {SEED_MAX + 1}."),
    "seed + num_images past 2**32 - 1": (
        ["--prompt", "a red circle", "--num_images", "2", "--seed", str(SEED_MAX)],
        f"error: --seed {SEED_MAX} with 2 images needs seeds up to {SEED_MAX + 1}, past 2**32 - 1 = {SEED_MAX}: "
        f"use a --seed of at most {SEED_MAX - 1}."),
    "seeds of two prompts past 2**32 - 1": (
        ["--prompt", "a red circle", "--prompt", "a blue square", "--num_images", "2", "--seed", str(SEED_MAX - 2)],
        f"error: --seed {SEED_MAX - 2} with 4 images needs seeds up to {SEED_MAX + 1}, past 2**32 - 1 = {SEED_MAX}: "
        f"use a --seed of at most {SEED_MAX - 3}."),
    "variations' seeds past 2**32 - 1": (
        ["--mode", "variations", "--image", "{tmp}/a.png", "--num_images", "3", "--seed", str(SEED_MAX - 1)],
        f"error: --seed {SEED_MAX - 1} with 3 images needs seeds up to {SEED_MAX + 1}, past 2**32 - 1 = {SEED_MAX}: "
        f"use a --seed of at most {SEED_MAX - 2}."),
    "caption interpolation without --prompt2": (["--mode", "interpolate", "--prompt", "a red circle"],
                                                "error: --mode=interpolate needs --prompt2."),
    "caption interpolation with inverted noise": (
        ["--mode", "interpolate", "--prompt", "a red circle", "--prompt2", "a blue square", "--interp_noise", "slerp"],
        "error: --interp_noise=slerp slerps the two images' DDIM inversions; between captions every frame starts "
        "from --seed's x_T (drop --interp_noise)."),
    "prompts file not UTF-8": (["--prompts_file", "{tmp}/prompts.txt"],
                               "error: --prompts_file '{tmp}/prompts.txt' is not UTF-8 text (byte 0xe8 at offset "
                               "31): save it as UTF-8."),
}


@pytest.mark.parametrize("args,expected", list(SAMPLE_CASES.values()), ids=list(SAMPLE_CASES))
def test_sample_py_bad_input_is_one_line_before_any_model_work(args, expected, tmp_path):
  _prepare(tmp_path)
  out = _run(["sample.py"], args, tmp_path)
  assert out.returncode == 1, out.stderr
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == expected.format(tmp=tmp_path)


# --- python -m unclip_jax.convert -----------------------------------------------------------------------------

CONVERT_CASES = {
    "dst is a file": (["--src", "{tmp}", "--dst", "{tmp}/a_file"],
                      "error: --dst '{tmp}/a_file' is a file: name a folder (it is created if missing)."),
    "dst inside a file": (["--src", "{tmp}", "--dst", "{tmp}/a_file/karlo"],
                          "error: --dst '{tmp}/a_file/karlo' is inside '{tmp}/a_file', which is a file: name a "
                          "folder (it is created if missing)."),
    "dst not writable": pytest.param(["--src", "{tmp}", "--dst", "{tmp}/locked/karlo"],
                                     "error: --dst '{tmp}/locked/karlo': cannot write in '{tmp}/locked'; name a "
                                     "folder you can write to.", marks=NOT_ROOT),
    "src missing": (["--src", "{tmp}/missing", "--dst", "{tmp}/karlo"],
                    "error: --src '{tmp}/missing' is not a folder: name a diffusers unCLIP pipeline folder (prior/, "
                    "decoder/, ...)."),
    "src is a file": (["--src", "{tmp}/a_file", "--dst", "{tmp}/karlo"],
                      "error: --src '{tmp}/a_file' is not a folder: name a diffusers unCLIP pipeline folder (prior/, "
                      "decoder/, ...)."),
}


@pytest.mark.parametrize("args,expected", list(CONVERT_CASES.values()), ids=list(CONVERT_CASES))
def test_convert_bad_input_is_one_line_before_any_work(args, expected, tmp_path):
  _prepare(tmp_path)
  out = _run(["-m", "unclip_jax.convert", "--from", "diffusers"], args, tmp_path)
  assert out.returncode == 1, out.stderr
  assert "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == expected.format(tmp=tmp_path)
  assert not os.path.exists(tmp_path / "karlo")


def test_convert_without_its_extra_is_one_line(tmp_path):
  """An install without [convert]: safetensors (and torch, diffusers) missing is one line naming the extra."""
  (tmp_path / "src").mkdir()
  script = ("import sys; sys.modules['safetensors'] = None; from unclip_jax.convert.__main__ import main; "
            "sys.exit(main(sys.argv[1:]))")
  out = _run(["-c", script], ["--from", "diffusers", "--src", "{tmp}/src", "--dst", "{tmp}/karlo"], tmp_path)
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      "error: converting needs 'safetensors', which is not installed: pip install 'unclip-jax[convert]' "
      "(in a checkout: pip install -r requirements-dev.txt)")


# --- a damaged inference checkpoint ----------------------------------------------------------------------------

def _largest_file(folder):
  files = [os.path.join(root, f) for root, _, names in os.walk(folder) for f in names]
  return max(files, key=os.path.getsize)


def _truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


def _nan_bytes(path):
  """64 bytes of 0xff in the middle of the prior's largest array file: NaNs in its float32 data."""
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    f.write(b"\xff" * 64)


def _cut_json(path):
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text[:len(text) // 2])


PRIOR_DATA = "the prior's largest array file"
DAMAGES = {
    # id: (what to damage: a file of the checkpoint, how, what the message starts with ({c}: the checkpoint))
    "params data truncated": (PRIOR_DATA, _truncate, "prior: '{c}/prior/params' does not restore ("),
    "params data overwritten": (PRIOR_DATA, _nan_bytes, "prior: '{c}/prior/params'"),
    "orbax _METADATA cut": ("prior/params/_METADATA", _cut_json,
                            "prior: '{c}/prior/params' does not restore (JSONDecodeError: "),
    "pipeline.json cut": ("pipeline.json", _cut_json, "'{c}/pipeline.json' is not valid JSON ("),
    "export config.json cut": ("prior/config.json", _cut_json, "prior: '{c}/prior/config.json' is not valid JSON ("),
    "CLIP weights truncated": ("clip/flax_model.msgpack", _truncate, "CLIP: '{c}/clip' does not load ("),
    "CLIP vocab.json cut": ("clip/vocab.json", _cut_json, "CLIP: '{c}/clip/vocab.json' is not valid JSON ("),
}


@pytest.fixture
def damaged(tmp_path):
  """damaged(case) -> a copy of the shipped demo checkpoint with one DAMAGES case applied."""
  def make(case):
    where, how, _ = DAMAGES[case]
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(DEMO, checkpoint)
    how(_largest_file(checkpoint / "prior" / "params") if where == PRIOR_DATA else checkpoint / where)
    return checkpoint
  return make


@pytest.mark.parametrize("case", list(DAMAGES))
def test_a_damaged_checkpoint_is_one_line(case, damaged, monkeypatch):
  """The error names the damaged folder or file; no "Event loop is closed" from reads still in flight when
  Orbax gave up (they reach sys.unraisablehook, from TensorStore's threads)."""
  unraisable = []
  monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
  checkpoint = damaged(case)
  with pytest.raises(pipeline.CheckpointError) as error:
    pipeline.Pipeline.load(str(checkpoint))
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(DAMAGES[case][2].format(c=checkpoint)), message
  assert not unraisable, [str(u.exc_value) for u in unraisable]


def test_sample_py_with_a_damaged_checkpoint_is_one_line(damaged, tmp_path):
  checkpoint = damaged("params data truncated")
  out = _run(["sample.py"], ["--prompt", "a red circle", "--checkpoint", str(checkpoint), "--out", "{tmp}/out"],
             tmp_path)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: prior: '{checkpoint}/prior/params' does not restore (ValueError: OUT_OF_RANGE: ")
  assert last.endswith("): the export is damaged or incomplete; copy it again, or export it again.")
  assert not os.path.exists(tmp_path / "out")


def test_sample_py_prior_ar_without_an_ar_prior_is_one_line(tmp_path):
  """--prior ar on a checkpoint whose pipeline.json names no ar_prior folder: one line, before its CLIP
  or any stage loads (the folder is not even read)."""
  checkpoint = tmp_path / "checkpoint"
  checkpoint.mkdir()
  layout = json.loads(open(os.path.join(DEMO, "pipeline.json")).read())
  layout.pop("ar_prior", None)
  (checkpoint / "pipeline.json").write_text(json.dumps(layout))  # and no stage folders at all
  out = _run(["sample.py"], ["--prompt", "a red circle", "--prior", "ar", "--checkpoint", str(checkpoint),
                             "--out", "{tmp}/out"], tmp_path)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.strip().splitlines()[-1] == (
      f"error: {checkpoint}/pipeline.json names no 'ar_prior' folder: this checkpoint has no autoregressive "
      "prior (use the diffusion prior).")


# --- outputs are never replaced by those of other settings ----------------------------------------------------

def _outputs(folder):
  return sorted(os.listdir(folder))


def test_write_outputs_keeps_the_images_of_other_settings(tmp_path):
  images = np.zeros((2, 4, 4, 3), np.uint8)
  jobs = [("a red circle", 0), ("a red circle", 1)]

  def write(steps, images=images):
    options = {"decoder": pipeline.StageOptions(steps, "ddim")}
    return sample_cli.write_outputs(str(tmp_path), images, jobs, options, {"mode": "text"})

  def suffix(written):
    return os.path.basename(written[0])[len("a_red_circle_seed0"):-len(".png")]

  first = write(2)
  assert [os.path.basename(p) for p in first[:2]] == ["a_red_circle_seed0.png", "a_red_circle_seed1.png"]
  again = write(2, images + 1)  # the same settings: the same names (and, sampled, the same images)
  assert again[:2] == first[:2] and again[2] != first[2]  # a grid is never replaced
  np.testing.assert_array_equal(np.asarray(Image.open(first[0])), images[0] + 1)

  other = write(3)  # other settings: every file of the call gets one suffix, _HASH
  assert len(suffix(other)) == 9 and suffix(other).startswith("_") and other[1].endswith(f"_seed1{suffix(other)}.png")
  assert json.load(open(first[0][:-4] + ".json"))["options"]["decoder"]["num_steps"] == 2
  assert json.load(open(other[0][:-4] + ".json"))["options"]["decoder"]["num_steps"] == 3
  assert write(3)[:2] == other[:2]

  os.remove(first[1][:-4] + ".json")  # a PNG without its JSON: of unknown settings, kept
  kept = write(2)
  assert kept[:2] == [p[:-4] + suffix(kept) + ".png" for p in first[:2]] and suffix(kept) not in ("", suffix(other))
  assert len([f for f in _outputs(tmp_path) if f.endswith(".png") and not f.startswith("grid")]) == 6


@pytest.fixture(scope="module")
def demo_pipe():
  return pipeline.Pipeline.load(DEMO)


@pytest.mark.slow
def test_sample_py_reruns_keep_both_images(demo_pipe, tmp_path, monkeypatch):
  """sample.py in-process with the demo loaded once: other settings keep the first image; the same settings
  again write the same image under the same name."""
  monkeypatch.setattr(pipeline.Pipeline, "load", lambda *args, **kwargs: demo_pipe)

  def sample(*args):
    flags.FLAGS(["sample.py", "--prompt", "a red circle", "--up_to", "decoder", "--prior_steps", "2",
                 "--decoder_steps", "2", "--prior_candidates", "1", "--out", str(tmp_path), "--compilation_cache", "",
                 *args])
    try:
      sample_cli.main(["sample.py"])
    finally:
      flags.FLAGS.unparse_flags()
    return {f: np.asarray(Image.open(tmp_path / f)) for f in _outputs(tmp_path) if not f.startswith("grid")
            and f.endswith(".png")}

  first = sample("--decoder_guidance", "3")
  assert list(first) == ["a_red_circle_seed0.png"]
  both = sample("--decoder_guidance", "1")
  assert len(both) == 2 and not np.array_equal(*both.values())
  np.testing.assert_array_equal(both["a_red_circle_seed0.png"], first["a_red_circle_seed0.png"])
  assert sample("--decoder_guidance", "3").keys() == both.keys()  # the same settings: the same name


# --- transparency ----------------------------------------------------------------------------------------------

def test_transparency_is_composited_on_white(tmp_path):
  rgba = np.zeros((2, 3, 4), np.uint8)
  rgba[..., 0] = 200  # red under every alpha
  rgba[0, :, 3] = 0  # transparent: white, not the black PIL's convert("RGB") leaves
  rgba[1, :, 3] = [255, 128, 64]  # opaque, half and a quarter: red over white by alpha
  Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
  loaded = imaging.load_image(str(tmp_path / "rgba.png"))
  alpha = rgba[..., 3:] / 255.0
  want = np.round(rgba[..., :3] * alpha + 255 * (1 - alpha))
  np.testing.assert_allclose(loaded, want, atol=1)
  assert (loaded[0] == 255).all() and (loaded[1, 0] == [200, 0, 0]).all()

  grey_alpha = Image.fromarray(rgba, "RGBA").convert("LA")  # the other alpha modes and a palette's transparency
  palette = Image.fromarray(rgba[..., :3]).convert("P")
  palette.info["transparency"] = palette.getpixel((0, 0))
  assert (np.asarray(imaging.to_rgb(grey_alpha))[0] == 255).all()
  assert (np.asarray(imaging.to_rgb(palette))[0, 0] == 255).all()
  # training's decode path (data/loader.py) too
  square = imaging.resize_center_crop(Image.fromarray(np.dstack([rgba[..., :3], np.zeros((2, 3), np.uint8)])), 2)
  assert (square == 255).all()
