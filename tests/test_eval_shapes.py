"""The Shapes pixel analyser, R-precision and the Frechet distance (unclip_jax/eval)."""

import functools

import numpy as np
import pytest

from unclip_jax.data import shapes
from unclip_jax.eval import metrics
from unclip_jax.eval import shapes as evaluate

SEED = 3  # neither the training seed (0) nor the benchmark's (12345)
NUM_SCENES = 200
SWAPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@functools.cache
def _real(resolution):
  return shapes.generate(SEED, range(NUM_SCENES), resolution)


def test_parse_caption():
  assert evaluate.parse_caption("a red circle") == evaluate.Caption((("red", "circle"),))
  parsed = evaluate.parse_caption("a blue square left of a yellow triangle")
  assert parsed.objects == (("blue", "square"), ("yellow", "triangle")) and parsed.relation == "left of"
  assert parsed.colors == ("blue", "yellow")
  for caption in _real(16)[1]:
    parsed = evaluate.parse_caption(caption)
    assert len(parsed.objects) == (2 if parsed.relation else 1)
  for bad in ("a red", "a pink circle", "a red circle near a blue square", "a red circle above a red square",
              "red circle", "a red circle above"):
    with pytest.raises(ValueError):
      evaluate.parse_caption(bad)


@pytest.mark.parametrize("resolution", [32, 64])
def test_real_images_score_perfectly(resolution):
  # Measured on these 200 scenes: colour, shape, relation and count all 1.0 at 32 and 64 px
  # (also at 16 px, shape 0.997 on 300 scenes of seed 12345).
  images, captions = _real(resolution)
  acc = evaluate.accuracies(evaluate.score_images(images, captions))
  assert acc["color"] == 1.0 and acc["relation"] == 1.0 and acc["count"] == 1.0
  assert acc["shape"] >= 0.95 and acc["all_correct"] == acc["shape"]
  assert acc["speckle"] == 0.0  # anti-aliased edges lie within a pixel of their object
  assert acc["num_images"] == NUM_SCENES and 0.35 < acc["num_two_object"] / NUM_SCENES < 0.65


def test_blobs_match_the_scene():
  images, _ = _real(64)
  for i in range(40):
    scene = shapes.sample_scene(SEED, i)
    blobs = {b.color: b for b in evaluate.find_objects(images[i])}
    assert set(blobs) == {t.color for t in scene.things}
    for thing in scene.things:
      blob = blobs[thing.color]
      assert blob.shape == thing.shape
      assert abs(blob.width - thing.size) < 1.5 / 64 and abs(blob.height - thing.height) < 1.5 / 64
      # A triangle's mass centroid lies a third of its height above its base, h/6 below the box centre.
      cy = thing.cy + (thing.height / 6 if thing.shape == "triangle" else 0.0)
      assert abs(blob.cx - thing.cx) < 0.5 / 64 and abs(blob.cy - cy) < 0.5 / 64


def test_mismatched_captions_fail():
  images, captions = _real(32)
  for image, caption in zip(images[:80], captions[:80]):
    parsed = evaluate.parse_caption(caption)
    (color1, shape1), *rest = parsed.objects
    absent = next(c for c in evaluate.COLOR_NAMES if c not in parsed.colors)
    other_shape = next(s for s in shapes.SHAPES if s != shape1)
    assert not evaluate.score_image(image, caption.replace(f"a {color1} ", f"a {absent} ", 1)).color
    assert not evaluate.score_image(image, caption.replace(f"{color1} {shape1}", f"{color1} {other_shape}", 1)).shape
    if parsed.relation:
      (color2, shape2), = rest
      swapped = f"a {color1} {shape1} {SWAPPED[parsed.relation]} a {color2} {shape2}"
      flipped = f"a {color2} {shape2} {parsed.relation} a {color1} {shape1}"
      for wrong in (swapped, flipped):
        score = evaluate.score_image(image, wrong)
        assert score.color and score.relation is False
      # Naming one of the two objects only: the count is wrong.
      assert not evaluate.score_image(image, f"a {color1} {shape1}").count
    else:
      score = evaluate.score_image(image, caption)
      assert score.relation is None and score.color and score.shape


def test_another_colour_dominating_fails():
  image = shapes.render(shapes.Scene((shapes.Thing("square", "red", 0.3, 0.5, 0.3),
                                      shapes.Thing("circle", "blue", 0.75, 0.5, 0.3)), "left of"), 32)
  assert evaluate.score_image(image, "a red square left of a blue circle").color
  assert not evaluate.score_image(image, "a red square").color  # the blue circle is as large
  tiny = shapes.render(shapes.Scene((shapes.Thing("square", "red", 0.4, 0.5, 0.4),
                                     shapes.Thing("circle", "blue", 0.85, 0.5, 0.04)), "left of"), 64)
  score = evaluate.score_image(tiny, "a red square")  # a blue speck under 0.5% of the canvas is ignored
  assert score.color and score.count
  assert evaluate.score_image(np.full((64, 64, 3), 255, np.uint8), "a red square") == evaluate.Score(
      color=False, shape=False, relation=None, count=False, blobs=())


def test_speckle_is_the_off_white_fraction_of_the_background():
  """Grey single pixels (specks: no palette colour, under min_area) on a white canvas with one exact
  16 px red square: speckle = specks / (pixels more than a pixel from the square, 64^2 - 18^2)."""
  image = np.full((64, 64, 3), 255, np.uint8)
  image[20:36, 20:36] = shapes.COLORS["red"]
  specks = [(2, 2), (2, 60), (60, 2), (60, 60), (45, 10), (10, 50), (50, 45)]
  for r, c in specks:
    image[r, c] = 128
  score = evaluate.score_image(image, "a red square")
  assert score.all_correct and score.count
  assert score.speckle == pytest.approx(len(specks) / (64 ** 2 - 18 ** 2), abs=1e-12)
  image[21, 36] = 128  # touching the square: an edge, not background
  assert evaluate.score_image(image, "a red square").speckle == score.speckle
  wrong_shape = evaluate.score_image(image, "a red circle")
  assert wrong_shape.color and wrong_shape.count and not wrong_shape.all_correct


@pytest.mark.parametrize("resolution", [32, 64])
def test_noisy_images_still_classify(resolution):
  # Measured (300 scenes, seed 12345): Gaussian noise std 10 and 20 leave every accuracy at 1.0 at 64 px
  # and >= 0.997 at 32 px; at std 30 shape accuracy is 0.997 (64 px) and 0.887 (32 px).
  images, captions = _real(resolution)
  rng = np.random.default_rng(0)
  noisy = np.clip(np.round(images + rng.normal(0.0, 10.0, images.shape)), 0, 255).astype(np.uint8)
  acc = evaluate.accuracies(evaluate.score_images(noisy, captions))
  assert acc["color"] == 1.0 and acc["relation"] == 1.0
  assert acc["shape"] >= 0.97 and acc["count"] >= 0.97


def test_r_precision_identity_and_adversarial():
  rng = np.random.default_rng(0)
  texts = rng.standard_normal((50, 32))
  images = 3.0 * texts + 0.1 * rng.standard_normal((50, 32))  # scale does not matter (cosine)
  assert metrics.r_precision(images, texts) == 1.0
  # Every image's first distractor is the image itself: its own caption can never win.
  distractors = rng.standard_normal((50, 20, 32))
  distractors[:, 0] = images
  assert metrics.r_precision(images, texts, distractors) == 0.0
  # A tie with a distractor is a miss.
  tie = np.repeat(texts[:, None], 20, axis=1)
  assert metrics.r_precision(images, texts, tie) == 0.0
  # Half the images point at a distractor, half at their caption.
  distractors = rng.standard_normal((50, 20, 32))
  mixed = np.where(np.arange(50)[:, None] < 25, distractors[:, 0], texts)
  hits = metrics.r_precision(mixed, texts, distractors, per_image=True)
  assert hits.dtype == bool and hits[25:].all() and not hits[:25].any()
  assert metrics.r_precision(mixed, texts, distractors) == 0.5


def test_r_precision_distractors_are_other_captions():
  captions = [f"caption {i % 30}" for i in range(90)]  # every caption three times
  index = metrics.sample_distractors(captions, captions, 20, seed=1)
  assert index.shape == (90, 20)
  for row, caption in zip(index, captions):
    texts = [captions[j] for j in row]
    assert caption not in texts and len(set(texts)) == 20
  np.testing.assert_array_equal(index, metrics.sample_distractors(captions, captions, 20, seed=1))
  # Identical rows for repeated captions: with the texts given they are never each other's distractors.
  rng = np.random.default_rng(0)
  texts = rng.standard_normal((30, 16))[np.arange(90) % 30]
  assert metrics.r_precision(texts, texts, captions=captions) == 1.0
  with pytest.raises(ValueError, match="distractors"):
    metrics.sample_distractors(captions[:10], captions[:10], 20)


def test_frechet_distance_closed_form():
  rng = np.random.default_rng(0)
  d = 6
  mu_a, mu_b = rng.standard_normal(d), rng.standard_normal(d)
  var_a, var_b = rng.uniform(0.5, 2.0, d), rng.uniform(0.5, 2.0, d)
  expected = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(var_a) - np.sqrt(var_b)) ** 2)
  for method in ("eigh", "sqrtm"):
    got = metrics.frechet_distance_gaussians(mu_a, np.diag(var_a), mu_b, np.diag(var_b), method)
    np.testing.assert_allclose(got, expected, rtol=1e-10)

  def exact_sample(mu, cov, n=500):
    """n points whose sample mean and (N - 1) covariance are exactly mu and cov."""
    z = rng.standard_normal((n, d))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T  # sample covariance = I
    return mu + z @ np.linalg.cholesky(cov).T

  feats_a, feats_b = exact_sample(mu_a, np.diag(var_a)), exact_sample(mu_b, np.diag(var_b))
  np.testing.assert_allclose(metrics.frechet_distance(feats_a, feats_b), expected, rtol=1e-8)
  assert abs(metrics.frechet_distance(feats_a, feats_a)) < 1e-8
  # Full covariances: eigh and scipy's sqrtm agree; the distance is symmetric.
  m = rng.standard_normal((d, d))
  cov_a, cov_b = m @ m.T + 0.1 * np.eye(d), np.cov(rng.standard_normal((50, d)), rowvar=False)
  forward = metrics.frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b)
  np.testing.assert_allclose(forward, metrics.frechet_distance_gaussians(mu_b, cov_b, mu_a, cov_a), rtol=1e-9)
  np.testing.assert_allclose(forward, metrics.frechet_distance_gaussians(mu_a, cov_a, mu_b, cov_b, "sqrtm"),
                             rtol=1e-7)


def test_frechet_distance_rank_deficient():
  # Fewer points than dimensions (singular covariances): finite, ~0 for identical sets, and sqrtm agrees.
  rng = np.random.default_rng(1)
  a, b = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1.0
  assert abs(metrics.frechet_distance(a, a)) < 1e-6 and abs(metrics.frechet_distance(a, a, "sqrtm")) < 1e-4
  np.testing.assert_allclose(metrics.frechet_distance(a, b), metrics.frechet_distance(a, b, "sqrtm"), rtol=1e-4)
