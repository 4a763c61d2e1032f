"""`python -m unclip_jax.eval` (issue #25): the metrics against closed forms, one-line input errors before
any model is loaded, and one end-to-end run on a few Shapes PNGs with a tiny CLIP."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from unclip_jax.cli import evaluate
from unclip_jax.data import shapes as shapes_data
from unclip_jax.eval import folder, metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_frechet_distance_closed_forms():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(200, 4))
  assert metrics.frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
  # Diagonal Gaussians: |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
  mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, -1.0, 2.0])
  var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  for method in ("eigh", "sqrtm"):
    got = metrics.frechet_distance_gaussians(mu_a, np.diag(var_a), mu_b, np.diag(var_b), method)
    assert got == pytest.approx(expected, rel=1e-9)
  # Full covariances that commute (same eigenvectors): Tr(S_a + S_b - 2 sqrt(S_a S_b)) in the eigenbasis.
  q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
  got = metrics.frechet_distance_gaussians(mu_a, q @ np.diag(var_a) @ q.T, mu_b, q @ np.diag(var_b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-9)


def test_r_precision_and_clip_score_on_constructed_embeddings():
  n = 6
  texts = np.eye(8)[:n]  # orthogonal captions
  captions = [f"caption {i}" for i in range(n)]
  perfect = folder.scores(texts + 0.1, texts, captions)
  assert perfect["r_precision"] == 1.0 and perfect["r_precision_distractors"] == n - 1
  deranged = folder.scores(np.roll(texts, 1, axis=0), texts, captions)  # each image is another's caption
  assert deranged["r_precision"] == 0.0
  assert deranged["clip_score"] == 0.0  # orthogonal: cos 0
  assert folder.scores(texts, texts, captions)["clip_score"] == pytest.approx(100.0)
  assert folder.scores(texts, texts, captions)["clip_s"] == pytest.approx(2.5)
  assert folder.scores(-texts, texts, captions)["clip_score"] == 0.0  # max(cos, 0)
  cos = np.array([0.2, 0.4, -0.5])
  images = np.stack([cos, np.sqrt(1 - cos ** 2), np.zeros(3)], 1)  # cos to e_0 as given
  assert metrics.clip_score(images, np.tile([1.0, 0, 0], (3, 1))) == pytest.approx(100 * 0.6 / 3)
  same = folder.scores(texts, texts, ["one caption"] * n)
  assert same["r_precision"] is None and same["r_precision_distractors"] == 0


def _write_images(folder_path, indices, *, sidecars=True, size=32):
  os.makedirs(folder_path, exist_ok=True)
  captions = []
  for i in indices:
    scene = shapes_data.sample_scene(0, i)
    Image.fromarray(shapes_data.render(scene, size)).save(os.path.join(folder_path, f"{i:03d}.png"))
    if sidecars:
      with open(os.path.join(folder_path, f"{i:03d}.json"), "w") as f:
        json.dump({"prompt": scene.caption, "seed": i}, f)
    captions.append(scene.caption)
  return captions


@pytest.mark.parametrize("case", ["missing dir", "no images", "caption count", "missing sidecar", "bad clip",
                                  "text-only clip", "one reference image"])
def test_bad_input_is_one_line_before_any_model(case, tmp_path, monkeypatch):
  images, clip_dir = str(tmp_path / "images"), str(tmp_path / "clip")
  _write_images(images, range(3))
  os.makedirs(clip_dir)
  with open(os.path.join(clip_dir, "config.json"), "w") as f:
    json.dump({"model_type": "clip_text_model" if case == "text-only clip" else "clip"}, f)
  captions, reference = None, None
  if case == "missing dir":
    images = str(tmp_path / "nope")
  elif case == "no images":
    images = str(tmp_path)
  elif case == "caption count":
    captions = str(tmp_path / "captions.txt")
    (tmp_path / "captions.txt").write_text("a red circle\na blue square\n")
  elif case == "missing sidecar":
    os.remove(os.path.join(images, "001.json"))
  elif case == "bad clip":
    clip_dir = str(tmp_path / "no_clip")
  elif case == "one reference image":
    reference = str(tmp_path / "reference")
    _write_images(reference, [9])
  expected = {"missing dir": "is not a folder", "no images": "holds no images",
              "caption count": "has 2 captions for 3 images", "missing sidecar": "001.png has no caption sidecar",
              "bad clip": "is not a CLIP folder", "text-only clip": "needs a full CLIPModel",
              "one reference image": "at least 2 images on each side"}[case]
  monkeypatch.setattr(evaluate.clip_lib, "load_clip", lambda path: pytest.fail("a model was loaded"))
  with pytest.raises(folder.InputError, match=expected) as error:
    evaluate.read_inputs(images, captions, reference)
    folder.check_clip_dir(clip_dir)
  assert "\n" not in str(error.value)


def test_eval_cli_end_to_end(tmp_path, shapes_clip_dir):
  """The real entry point on 4 Shapes PNGs with sidecars (and a grid sample.py would write, skipped) and a
  reference set of 3."""
  captions = _write_images(str(tmp_path / "images"), range(4))
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "grid_20250101-000000_seed0.png")
  _write_images(str(tmp_path / "reference"), range(10, 13), sidecars=False)
  (tmp_path / "captions.txt").write_text("\n".join(captions) + "\n")
  out = subprocess.run([sys.executable, "-m", "unclip_jax.eval", "--images", str(tmp_path / "images"),
                        "--clip", shapes_clip_dir, "--reference", str(tmp_path / "reference"),
                        "--json", str(tmp_path / "scores.json")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert "| clip_score |" in out.stdout and "| r_precision |" in out.stdout
  scores = json.load(open(tmp_path / "scores.json"))
  assert scores["num_images"] == 4 and scores["num_reference_images"] == 3
  assert 0 <= scores["clip_score"] <= 100 and 0 <= scores["clip_s"] <= 2.5
  assert scores["r_precision_distractors"] == len(set(captions)) - 1
  assert scores["r_precision"] in [k / 4 for k in range(5)]
  assert scores["frechet_clip_distance"] >= 0
  assert folder.captions_from_file(str(tmp_path / "captions.txt"), 4) == captions  # in the sorted name order
  # Bad input through the real entry point: one line, no traceback.
  bad = subprocess.run([sys.executable, "-m", "unclip_jax.eval", "--images", str(tmp_path / "images"),
                        "--clip", shapes_clip_dir, "--captions", str(tmp_path / "missing.txt")],
                       cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert bad.returncode == 1 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: cannot read --captions")
