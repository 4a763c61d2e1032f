"""Pixel analysis of Shapes-world images (spec: shared/SHAPES.md): which objects an image shows.

Generated images are noisy and a little off-palette, so nothing here relies on
exact colours. The steps, for an RGB uint8 image [R, R, 3] of any size R:

1. Pixels. On a white canvas an object's anti-aliased edge pixel is a blend
   white + a * (colour - white), a in [0, 1]. So each pixel is projected onto
   the five segments white -> palette colour; the segment with the smallest
   residual (RGB distance to it) gives the pixel's colour and `a` its coverage.
   Plain nearest-colour classification would not do: a red / white blend at
   a = 0.5, (237, 142, 142), is nearer to yellow than to red or white. A pixel
   with residual above `max_residual` (80) fits no colour and is ignored (the
   segments are >= 105 apart, so the nearest one is the right one for noise
   well beyond that; 60 dropped ~14% of the pixels inside objects at noise std
   30). Coverage is then stretched, clip((a - 0.2) / 0.6, 0, 1): that keeps the
   0.5 crossing (the edge's position) and reads noise within 0.2 of 0 or 1 as
   0 or 1, so noise cannot inflate the measured extents (step 3). Pixels with
   coverage below 0.5 are background.
2. Objects. Per colour, the 8-connected components of its pixels with at least
   `min_area` * R^2 pixels (0.5% of the canvas; the smallest spec object, a pair
   triangle, covers ~2.1%) are objects; smaller ones are specks and ignored. An
   object's soft mask is its component's coverage, plus its rim (this colour's
   pixels of coverage < 0.5 touching it), with enclosed holes (pixels that noise
   pushed to another colour) counted as covered.
3. Features, on the soft coverage (so they hold to a fraction of a pixel even at
   16 or 32 px): the object's width and height are the sums over columns / rows
   of the largest coverage in each (an edge column half covered counts 0.5);
     fill   = area / (width * height): square 1, circle pi/4 = 0.785, triangle 0.5;
     offset = (mass centroid row - centre of the row extent) / height: 0 for a
              circle or a square, +1/6 for an up-pointing triangle (its centroid
              sits a third of the height above its base).
   The shape: a triangle if offset > 0.05 or fill < 0.64 (halfway between the
   triangle's 0.5 and the circle's 0.785), else a circle if fill < 0.89 (halfway
   between pi/4 and 1), else a square. The offset is the triangle's surest sign:
   a first moment, averaged over every pixel, it stays near 1/6 where the fill
   does not: on the 446 objects of scenes 0-299 of seed 12345, triangles have
   offset 0.146-0.167 at R = 64 and 0.048-0.167 at R = 16 (3-pixel triangles,
   whose faint apex rows shrink the measured height and push the fill up to
   0.86), circles and squares within 0.01 of 0 at R = 64 and 0.03 at R = 16;
   fills: squares 1.00-1.04, circles 0.73-0.87 (0.76-0.81 at R = 64), triangles
   0.51-0.57 at R = 64.
4. Against a caption: an object of a caption colour is its largest component.
     colour:   every caption colour has an object, and no other colour covers as
               much as half the area of the smallest of them ("dominates");
     shape:    each caption colour's object has the caption's shape;
     relation: (two-object captions) the first colour's object's mass centroid
               lies on the relation's side of the second's by more than
               `relation_margin` (0.05 R) along the relation's axis, rows growing
               downwards ("above" = smaller row); the other axis is not checked;
     count:    as many objects (all colours) as the caption names;
     all correct: colour, shape, count and (two objects) relation in the same image.
5. Speckle (cleanliness, not a caption check): the fraction of background pixels, those more than
   one pixel away from every object's mask (component, rim and holes of step 2, so that anti-aliased
   edges do not count), that are visibly off white (RGB distance from white above SPECKLE_DISTANCE).
   Specks below `min_area` count here. Exact renders score 0.
"""

import dataclasses
import math
import re
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from unclip_jax.data import shapes as shapes_data

COLOR_NAMES = tuple(shapes_data.COLORS)
_WHITE = np.full(3, 255.0)
_DIRECTIONS = np.array([shapes_data.COLORS[c] for c in COLOR_NAMES], np.float64) - _WHITE  # [5, 3]
_EIGHT_CONNECTED = np.ones((3, 3), bool)
MAX_RESIDUAL = 80.0  # RGB distance from a pixel to its colour's white -> colour segment, at most
COVERAGE_MARGIN = 0.2  # coverage within this of 0 or 1 is read as 0 or 1
MIN_AREA = 0.005  # of the canvas: smaller components are specks
SPECKLE_DISTANCE = 40.0  # RGB distance from white above which a background pixel is a speck (step 5)
# Shape decision thresholds (module docstring, step 3).
TRIANGLE_OFFSET = 0.05
TRIANGLE_FILL = (0.5 + math.pi / 4) / 2
CIRCLE_FILL = (math.pi / 4 + 1.0) / 2

_COLOR = "|".join(COLOR_NAMES)
_SHAPE = "|".join(shapes_data.SHAPES)
_RELATION = "|".join(shapes_data.RELATIONS)
_CAPTION = re.compile(rf"a ({_COLOR}) ({_SHAPE})(?: ({_RELATION}) a ({_COLOR}) ({_SHAPE}))?")


@dataclasses.dataclass(frozen=True)
class Caption:
  """A parsed Shapes caption: objects[0] stands in `relation` to objects[1]."""
  objects: tuple[tuple[str, str], ...]  # (colour, shape) per object
  relation: str | None = None

  @property
  def colors(self) -> tuple[str, ...]:
    return tuple(c for c, _ in self.objects)


def parse_caption(caption: str) -> Caption:
  """'a {color} {shape}' or 'a {color1} {shape1} {relation} a {color2} {shape2}' -> Caption."""
  match = _CAPTION.fullmatch(caption.strip())
  if match is None:
    raise ValueError(f"Not a Shapes caption: {caption!r} (expected 'a {{color}} {{shape}}' or "
                     "'a {color1} {shape1} {relation} a {color2} {shape2}').")
  color1, shape1, relation, color2, shape2 = match.groups()
  if relation is None:
    return Caption(((color1, shape1),))
  if color1 == color2:
    raise ValueError(f"The two objects of a Shapes caption have different colours: {caption!r}.")
  return Caption(((color1, shape1), (color2, shape2)), relation)


@dataclasses.dataclass(frozen=True)
class Blob:
  """One object found in an image; positions and sizes in canvas units (x right, y down)."""
  color: str
  shape: str
  cx: float  # mass centroid
  cy: float
  area: float  # soft coverage, as a fraction of the canvas
  width: float
  height: float
  fill: float  # area / (width * height)
  offset: float  # (centroid row - centre of the row extent) / height


@dataclasses.dataclass(frozen=True)
class Score:
  """How an image matches its caption."""
  color: bool
  shape: bool
  relation: bool | None  # None for a one-object caption
  count: bool
  blobs: tuple[Blob, ...]
  speckle: float = 0.0  # fraction of the background off white (module docstring, step 5)

  @property
  def all_correct(self) -> bool:
    return self.color and self.shape and self.count and self.relation is not False


def classify_pixels(image, max_residual: float = MAX_RESIDUAL, coverage_margin: float = COVERAGE_MARGIN):
  """(colour index [R, R] int, -1 where none fits; coverage of that colour [R, R] in [0, 1]).

  Pixels are projected on the white -> colour segments (module docstring, step 1).
  Coverage is 0 where no colour fits; pixels with coverage < 0.5 are background.
  """
  x = np.asarray(image, np.float64)
  if x.ndim != 3 or x.shape[-1] != 3:
    raise ValueError(f"Expected an RGB image [R, R, 3], got shape {x.shape}.")
  v = x - _WHITE  # [R, R, 3]
  alpha = np.clip(v @ _DIRECTIONS.T / np.sum(_DIRECTIONS**2, -1), 0.0, 1.0)  # [R, R, 5]
  residual = np.linalg.norm(v[..., None, :] - alpha[..., None] * _DIRECTIONS, axis=-1)  # [R, R, 5]
  index = np.argmin(residual, -1)
  fits = np.take_along_axis(residual, index[..., None], -1)[..., 0] <= max_residual
  coverage = np.where(fits, np.take_along_axis(alpha, index[..., None], -1)[..., 0], 0.0)
  coverage = np.clip((coverage - coverage_margin) / (1 - 2 * coverage_margin), 0.0, 1.0)
  return np.where(fits, index, -1), coverage


def classify_shape(fill: float, offset: float) -> str:
  """circle, square or triangle from the fill ratio and centroid offset (module docstring, step 3)."""
  if offset > TRIANGLE_OFFSET or fill < TRIANGLE_FILL:
    return "triangle"
  return "circle" if fill < CIRCLE_FILL else "square"


def _measure(color: str, soft: np.ndarray, resolution: int) -> Blob:
  rows, cols = np.nonzero(soft)
  weights = soft[rows, cols]
  area = weights.sum()
  row_extent = np.zeros(resolution)
  np.maximum.at(row_extent, rows, weights)
  col_extent = np.zeros(resolution)
  np.maximum.at(col_extent, cols, weights)
  height, width = row_extent.sum(), col_extent.sum()
  centres = np.arange(resolution) + 0.5
  cy = np.sum(weights * (rows + 0.5)) / area
  cx = np.sum(weights * (cols + 0.5)) / area
  mid_y = np.sum(row_extent * centres) / height
  fill = area / (width * height)
  offset = (cy - mid_y) / height
  return Blob(color=color, shape=classify_shape(fill, offset), cx=float(cx / resolution), cy=float(cy / resolution),
              area=float(area / resolution**2), width=float(width / resolution), height=float(height / resolution),
              fill=float(fill), offset=float(offset))


def find_objects(image, *, max_residual: float = MAX_RESIDUAL, min_area: float = MIN_AREA) -> list[Blob]:
  """The objects in an RGB uint8 image [R, R, 3], largest first (module docstring, steps 1-3)."""
  return _objects(image, max_residual, min_area)[0]


def speckle(image, object_mask) -> float:
  """Fraction of the background, more than a pixel from object_mask [R, R], that is off white (step 5)."""
  background = ~ndimage.binary_dilation(object_mask, structure=_EIGHT_CONNECTED)
  if not background.any():
    return 0.0
  off_white = np.linalg.norm(np.asarray(image, np.float64) - _WHITE, axis=-1) > SPECKLE_DISTANCE
  return float(np.mean(off_white[background]))


def _objects(image, max_residual: float, min_area: float) -> tuple[list[Blob], np.ndarray]:
  """find_objects' blobs and the union of their masks [R, R] bool."""
  image = np.asarray(image)
  resolution = image.shape[0]
  if image.shape[1] != resolution:
    raise ValueError(f"Shapes images are square, got shape {image.shape}.")
  index, coverage = classify_pixels(image, max_residual)
  min_pixels = max(1, math.ceil(min_area * resolution**2))
  blobs, covered = [], np.zeros(index.shape, bool)
  for c, color in enumerate(COLOR_NAMES):
    mine = index == c
    labels, count = ndimage.label(mine & (coverage >= 0.5), structure=_EIGHT_CONNECTED)
    if count == 0:
      continue
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    for label in np.nonzero(sizes >= min_pixels)[0]:
      if label == 0:
        continue
      # The component and its partly covered rim (pixels of this colour next to it).
      component = labels == label
      rim = ndimage.binary_dilation(component, structure=_EIGHT_CONNECTED) & mine & (labels == 0)
      holes = ndimage.binary_fill_holes(component) & ~component
      soft = np.where(component | rim, coverage, 0.0)
      blobs.append(_measure(color, np.where(holes, 1.0, soft), resolution))
      covered |= component | holes | (rim & (coverage > 0))  # (white pixels fit any colour at coverage 0)
  return sorted(blobs, key=lambda b: -b.area), covered


def _relation_holds(first: Blob, second: Blob, relation: str, margin: float) -> bool:
  dx, dy = second.cx - first.cx, second.cy - first.cy  # from first to second; y grows downwards
  along = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[relation]
  return along > margin


def score_image(image, caption: str | Caption, *, max_residual: float = MAX_RESIDUAL, min_area: float = MIN_AREA,
                dominance: float = 0.5, relation_margin: float = 0.05) -> Score:
  """Checks an RGB uint8 image [R, R, 3] against its caption (module docstring, step 4)."""
  parsed = parse_caption(caption) if isinstance(caption, str) else caption
  blobs, covered = _objects(image, max_residual, min_area)
  main = {}
  for blob in blobs:  # largest first: the first of each colour is its object
    main.setdefault(blob.color, blob)
  present = all(c in main for c in parsed.colors)
  color_ok = present
  if present:
    smallest = min(main[c].area for c in parsed.colors)
    for other in set(COLOR_NAMES) - set(parsed.colors):
      if sum(b.area for b in blobs if b.color == other) >= dominance * smallest:
        color_ok = False
  shape_ok = present and all(main[c].shape == s for c, s in parsed.objects)
  relation_ok = None
  if parsed.relation is not None:
    first, second = parsed.colors
    relation_ok = (first in main and second in main
                   and _relation_holds(main[first], main[second], parsed.relation, relation_margin))
  return Score(color=bool(color_ok), shape=bool(shape_ok), relation=relation_ok,
               count=len(blobs) == len(parsed.objects), blobs=tuple(blobs), speckle=speckle(image, covered))


def score_images(images, captions: Sequence[str], **kwargs) -> dict[str, np.ndarray]:
  """Per-image booleans for a batch: {'color', 'shape', 'count', 'relation', 'two_object', 'all_correct'}
  arrays [N], and each image's 'speckle' fraction [N].

  'relation' is False where 'two_object' is False; average it over the two-object
  images only (see `accuracies`).
  """
  images = np.asarray(images)
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images for {len(captions)} captions.")
  scores = [score_image(image, caption, **kwargs) for image, caption in zip(images, captions)]
  return {"color": np.array([s.color for s in scores]), "shape": np.array([s.shape for s in scores]),
          "count": np.array([s.count for s in scores]),
          "relation": np.array([bool(s.relation) for s in scores]),
          "two_object": np.array([s.relation is not None for s in scores]),
          "all_correct": np.array([s.all_correct for s in scores]),
          "speckle": np.array([s.speckle for s in scores])}


def accuracies(scores: dict[str, np.ndarray]) -> dict[str, float]:
  """Mean of each score; 'relation' over two-object images only (nan if there are none)."""
  two = scores["two_object"]
  return {"color": float(np.mean(scores["color"])), "shape": float(np.mean(scores["shape"])),
          "count": float(np.mean(scores["count"])), "all_correct": float(np.mean(scores["all_correct"])),
          "speckle": float(np.mean(scores["speckle"])),
          "relation": float(np.mean(scores["relation"][two])) if two.any() else float("nan"),
          "num_images": int(len(two)), "num_two_object": int(two.sum())}
