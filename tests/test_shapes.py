"""The Shapes world against its spec (shared/SHAPES.md)."""

import re

import numpy as np
import pytest

from unclip_jax.data import shapes

CAPTION = re.compile(
    r"^a (red|green|blue|yellow|purple) (circle|square|triangle)"
    r"( (left of|right of|above|below) a (red|green|blue|yellow|purple) (circle|square|triangle))?$")
SCENES = [shapes.sample_scene(7, i) for i in range(300)]


def _pixel_grid(resolution):
  c = (np.arange(resolution) + 0.5) / resolution
  return np.meshgrid(c, c)


def test_captions_follow_the_grammar_and_describe_the_scene():
  for scene in SCENES:
    assert CAPTION.match(scene.caption), scene.caption
    words = scene.caption.split()
    assert words[1:3] == [scene.things[0].color, scene.things[0].shape]
    if scene.relation:
      assert scene.things[0].color != scene.things[1].color
      assert scene.caption.endswith(f"a {scene.things[1].color} {scene.things[1].shape}")


def test_object_counts_sizes_and_placement():
  counts = [len(s.things) for s in SCENES]
  assert 0.4 < counts.count(1) / len(counts) < 0.6
  for scene in SCENES:
    low, high = shapes.SINGLE_SIZE if len(scene.things) == 1 else shapes.PAIR_SIZE
    for t in scene.things:
      assert low <= t.size <= high
      assert t.size / 2 <= t.cx <= 1 - t.size / 2 and t.height / 2 <= t.cy <= 1 - t.height / 2
  relations = [s.relation for s in SCENES if s.relation]
  assert set(relations) == set(shapes.RELATIONS)


@pytest.mark.parametrize("resolution", [32, 64])
def test_exact_fills_white_background_and_no_overlap(resolution):
  x, y = _pixel_grid(resolution)
  margin = 1.0 / resolution  # anti-aliasing touches only pixels within one pixel of an edge
  for scene in SCENES[:60]:
    image = shapes.render(scene, resolution)
    distances = [shapes.signed_distance(t, x, y) for t in scene.things]
    outside = np.all([d > margin for d in distances], axis=0)
    assert np.all(image[outside] == 255)
    for t, d in zip(scene.things, distances):
      inside = d < -margin
      assert inside.sum() > 0
      assert np.all(image[inside] == shapes.COLORS[t.color])
    if len(distances) == 2:
      assert not np.any((distances[0] < margin) & (distances[1] < margin))


def _color_centroid(image, color):
  mask = np.all(image == shapes.COLORS[color], axis=-1)
  rows, cols = np.nonzero(mask)
  r = image.shape[0]
  return (cols.mean() + 0.5) / r, (rows.mean() + 0.5) / r


def test_relations_hold_in_the_pixels():
  for scene in [s for s in SCENES if s.relation][:60]:
    image = shapes.render(scene, 64)
    (x1, y1), (x2, y2) = (_color_centroid(image, t.color) for t in scene.things)
    along, across = {"left of": (x2 - x1, y2 - y1), "right of": (x1 - x2, y2 - y1),
                     "above": (y2 - y1, x2 - x1), "below": (y1 - y2, x2 - x1)}[scene.relation]
    # A triangle's pixel centroid sits below its box centre by h/6 (< 0.05 here).
    assert along >= shapes.MIN_AXIS_GAP - 0.1 and abs(across) <= shapes.MAX_CROSS_GAP + 0.1
    a, b = scene.things
    d_box = {"left of": b.cx - a.cx, "right of": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}
    assert d_box[scene.relation] >= shapes.MIN_AXIS_GAP


def test_triangles_point_up():
  scene = shapes.Scene((shapes.Thing("triangle", "red", 0.5, 0.5, 0.4),), None)
  mask = np.any(shapes.render(scene, 64) != 255, axis=-1)  # any ink, anti-aliased edges included
  widths = mask.sum(1)
  rows = np.nonzero(widths)[0]
  assert widths[rows[0]] < widths[rows[-1]]  # narrow at the top, wide at the base
  assert abs(widths.max() / 64 - 0.4) <= 3 / 64  # partial pixels on both sides, and the slant past the base
  assert abs(len(rows) / 64 - 0.4 * np.sqrt(3) / 2) < 2 / 64


def test_same_scene_at_every_resolution():
  for scene in SCENES[:20]:
    small, large = shapes.render(scene, 32), shapes.render(scene, 128)
    for t in scene.things:
      (xs, ys), (xl, yl) = _color_centroid(small, t.color), _color_centroid(large, t.color)
      assert abs(xs - xl) < 1 / 32 and abs(ys - yl) < 1 / 32
    # Box-downsampling the large render lands close to the small one.
    down = large.reshape(32, 4, 32, 4, 3).mean((1, 3))
    assert np.abs(down - small).mean() < 3.0


def test_determinism_across_batch_size_and_shards():
  whole = next(shapes.batches(3, 16, 8))
  assert [shapes.sample_scene(3, i).caption for i in range(8)] == whole["caption"]
  halves = [next(shapes.batches(3, 16, 8, rows=rows)) for rows in ([0, 1, 4, 5], [2, 3, 6, 7])]
  merged = sorted(zip(np.concatenate([h["index"] for h in halves]),
                      [c for h in halves for c in h["caption"]]))
  assert [c for _, c in merged] == whole["caption"]
  np.testing.assert_array_equal(np.concatenate([h["image"] for h in halves])[np.argsort(
      np.concatenate([h["index"] for h in halves]))], whole["image"])
  # Resuming from a position continues the same stream with any batch size.
  stream = shapes.batches(3, 16, 4)
  first_two = [next(stream), next(stream)]
  resumed = next(shapes.batches(3, 16, 2, start=4))
  assert resumed["caption"] == first_two[1]["caption"][:2]
  a, _ = shapes.generate(3, [5], 16)
  b, _ = shapes.generate(3, [5], 16)
  c, _ = shapes.generate(4, [5], 16)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) or shapes.sample_scene(3, 5) == shapes.sample_scene(4, 5)


def test_twins_are_true_of_their_image_and_false_of_the_original():
  from unclip_jax.eval import shapes as shapes_eval

  changed = set()
  for i, scene in enumerate(SCENES[:120]):
    twin = shapes.twin(scene, np.random.default_rng(i))
    assert CAPTION.match(twin.caption) and twin.caption != scene.caption, twin.caption
    assert all(shapes.twin(scene, np.random.default_rng(i)) == twin for _ in range(2))  # rng-determined
    true = shapes_eval.score_image(shapes.render(twin, 64), twin.caption)  # drawn as it says
    assert true.color and true.shape and true.relation is not False and true.count, twin
    false = shapes_eval.score_image(shapes.render(scene, 64), twin.caption)
    if scene.relation:  # the same objects trade places: only the relation word changes
      a, b = scene.things
      assert twin.things[0].color == a.color and (twin.things[0].cx, twin.things[0].cy) == (b.cx, b.cy)
      assert twin.caption.replace(twin.relation, scene.relation, 1) == scene.caption
      assert false.color and false.relation is False
      assert shapes.twin(twin, np.random.default_rng(0)) == scene
    else:  # one word of the two changed: colour or shape
      diff = [k for k, (a, b) in enumerate(zip(scene.caption.split(), twin.caption.split())) if a != b]
      assert len(diff) == 1 and not (false.color and false.shape)
      changed.add(diff[0])
  assert changed == {1, 2}  # both kinds of change occur
