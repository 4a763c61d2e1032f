"""The text-to-image pipeline on a tiny random stack (CLIP, prior, decoder, sr1, sr2)."""

import jax
import numpy as np
import pytest

from configs import shapes
from unclip_jax import parallel, pipeline, train_loop
from unclip_jax.pipeline import StageOptions
from unclip_jax.stages import build

FAST = {"prior": StageOptions(3, "ddpm", guidance_scale=4.0, clip_range=5.0),
        "decoder": StageOptions(3, "ddpm", guidance_scale=3.0), "sr1": StageOptions(2, "ddim"),
        "sr2": StageOptions(2, "ddim")}


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory, shapes_clip_dir):
  root = tmp_path_factory.mktemp("stack")
  folders = {"clip": shapes_clip_dir}
  for i, stage_name in enumerate(pipeline.STAGES):
    config = shapes.get_config(f"{stage_name},tiny")
    config.clip_dir = shapes_clip_dir
    stage, _ = build.build(config, str(root / stage_name))
    params = stage.init_params(jax.random.key(i))
    params = jax.tree.map(lambda p: p + 0.02 * np.random.default_rng(i).standard_normal(p.shape), params)
    train_loop.export(stage, params, str(root / stage_name / "export"))
    folders[stage_name] = str(root / stage_name / "export")
  return pipeline.assemble(str(root / "checkpoint"), **folders)


@pytest.fixture(scope="module")
def pipe(stack_dir):
  return pipeline.Pipeline.load(stack_dir)


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


def test_batch_equals_single_runs(pipe):
  prompts = ["a red circle", "a blue square", "a yellow triangle", "a purple circle"]
  seeds = [5, 6, 7, 8]
  batch = pipe.text_to_image(prompts, seeds, FAST).astype(int)
  singles = np.concatenate([pipe.text_to_image([p], [s], FAST) for p, s in zip(prompts, seeds)]).astype(int)
  assert np.abs(batch - singles).max() <= 1  # uint8 rounding of float differences below 1e-5


def test_eight_devices_equal_one(stack_dir, pipe):
  sharded = pipeline.Pipeline.load(stack_dir, mesh=parallel.make_mesh({"data": -1}))
  prompts = ["a red circle", "a blue square", "a green square"]  # 3: padded to 8 devices
  one = pipe.text_to_image(prompts, [1, 2, 3], FAST).astype(int)
  eight = sharded.text_to_image(prompts, [1, 2, 3], FAST).astype(int)
  assert eight.shape == one.shape and np.abs(eight - one).max() <= 1


def test_bad_checkpoints_are_clear_errors(tmp_path, stack_dir):
  with pytest.raises(pipeline.CheckpointError, match="no pipeline.json"):
    pipeline.Pipeline.load(str(tmp_path))
  with pytest.raises(pipeline.CheckpointError, match="CLIP"):
    pipeline.Pipeline.load(stack_dir, clip_dir=str(tmp_path / "nothing"))


def test_outputs_are_pngs_with_json_settings_and_a_grid(pipe, tmp_path):
  import json

  from PIL import Image

  jobs = [("a red circle", 11), ("a red circle", 12), ("a blue square above a green circle", 13)]
  images = pipe.text_to_image([p for p, _ in jobs], [s for _, s in jobs], FAST, up_to="decoder")
  paths = pipeline.write_outputs(str(tmp_path), images, jobs, dict(pipeline.PRESETS["karlo"], **FAST),
                                 {"preset": "karlo"})
  assert len(paths) == 4 and "grid" in paths[-1]
  for (prompt, seed), path, image in zip(jobs, paths, images):
    np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
    meta = json.load(open(path[:-4] + ".json"))
    assert meta["prompt"] == prompt and meta["seed"] == seed and meta["options"]["decoder"]["num_steps"] == 3
  assert np.asarray(Image.open(paths[-1])).shape == (2 * 18 + 2, 2 * 18 + 2, 3)  # 3 images in a 2x2 grid


def test_sample_py_errors_are_one_line_with_nonzero_exit(tmp_path, stack_dir):
  import os
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
