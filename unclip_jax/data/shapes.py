"""The Shapes world: procedural captioned images (spec: shared/SHAPES.md).

Scenes live in continuous canvas units ([0, 1]^2, x right, y down) and are
drawn anti-aliased at any resolution, so scene i of seed s is the same picture
at every size. Each scene is drawn from its own generator seeded by (s, i),
which makes it independent of batch size, worker count and device count.
"""

import dataclasses
import math
from collections.abc import Iterator

import numpy as np

from unclip_jax.data import ordering

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 200, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("left of", "right of", "above", "below")
SINGLE_SIZE = (0.30, 0.45)
PAIR_SIZE = (0.22, 0.32)
MIN_AXIS_GAP = 0.35  # centres apart along the relation's axis, at least
MAX_CROSS_GAP = 0.15  # and along the other axis, at most
_TRIANGLE_HEIGHT = math.sqrt(3) / 2  # of an equilateral triangle with side 1


@dataclasses.dataclass(frozen=True)
class Thing:
  """One object; (cx, cy) is its bounding box's centre, size its width."""
  shape: str
  color: str
  cx: float
  cy: float
  size: float

  @property
  def height(self) -> float:
    return self.size * _TRIANGLE_HEIGHT if self.shape == "triangle" else self.size


@dataclasses.dataclass(frozen=True)
class Scene:
  things: tuple[Thing, ...]
  relation: str | None  # how things[0] stands to things[1]

  @property
  def caption(self) -> str:
    first = f"a {self.things[0].color} {self.things[0].shape}"
    if self.relation is None:
      return first
    return f"{first} {self.relation} a {self.things[1].color} {self.things[1].shape}"


def _place(rng, shape, color, size) -> Thing:
  height = size * _TRIANGLE_HEIGHT if shape == "triangle" else size
  return Thing(shape, color, float(rng.uniform(size / 2, 1 - size / 2)),
               float(rng.uniform(height / 2, 1 - height / 2)), size)


def _satisfies(a: Thing, b: Thing, relation: str) -> bool:
  dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b; y grows downwards
  along, across = {"left of": (dx, dy), "right of": (-dx, dy), "above": (dy, dx), "below": (-dy, dx)}[relation]
  return along >= MIN_AXIS_GAP and abs(across) <= MAX_CROSS_GAP


def sample_scene(seed: int, index: int) -> Scene:
  """Scene `index` of the data set with this seed."""
  rng = np.random.default_rng([seed, index])
  if rng.random() < 0.5:
    size = rng.uniform(*SINGLE_SIZE)
    return Scene((_place(rng, rng.choice(SHAPES), rng.choice(list(COLORS)), size),), None)
  colors = rng.choice(list(COLORS), size=2, replace=False)
  shapes = rng.choice(SHAPES, size=2)
  sizes = rng.uniform(*PAIR_SIZE, size=2)
  relation = str(rng.choice(RELATIONS))
  while True:  # rejection sampling keeps the placement uniform over valid pairs
    a = _place(rng, str(shapes[0]), str(colors[0]), float(sizes[0]))
    b = _place(rng, str(shapes[1]), str(colors[1]), float(sizes[1]))
    if _satisfies(a, b, relation):
      return Scene((a, b), relation)


_FLIPPED = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def twin(scene: Scene, rng: np.random.Generator) -> Scene:
  """The scene's closest counterfactual: what it shows changed just enough to falsify its caption.

  Two objects: they trade places, so the caption's relation flips ("a red circle
  above a blue square" -> "... below ..."). One object: its colour or its shape
  changes. Contrastive training that sees each scene next to its twin cannot
  match captions by their bag of words; a CLIP trained only against random
  captions embeds "above" and "below" alike (NegCLIP, Yuksekgonul et al. 2023,
  makes the same point with caption-only negatives).
  """
  if scene.relation is not None:
    a, b = scene.things
    return Scene((dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy)),
                 _FLIPPED[scene.relation])
  thing = scene.things[0]
  if rng.random() < 0.5:
    return Scene((dataclasses.replace(thing, color=str(rng.choice([c for c in COLORS if c != thing.color]))),), None)
  changed = dataclasses.replace(thing, shape=str(rng.choice([s for s in SHAPES if s != thing.shape])))
  # A square is taller than the triangle of its width: keep it on the canvas.
  return Scene((dataclasses.replace(changed, cy=min(max(thing.cy, changed.height / 2), 1 - changed.height / 2)),),
               None)


def signed_distance(thing: Thing, x, y):
  """Signed distance (canvas units, negative inside) from points (x, y) to the shape."""
  dx, dy = x - thing.cx, y - thing.cy
  half = thing.size / 2
  if thing.shape == "circle":
    return np.hypot(dx, dy) - half
  if thing.shape == "square":
    return np.maximum(np.abs(dx), np.abs(dy)) - half
  # Equilateral triangle pointing up (apex at cy - h/2, base at cy + h/2): the
  # base's half-plane intersected with the two slanted edges' (mirrored in x).
  h = thing.height
  base = dy - h / 2
  slant = (np.abs(dx) * h - (dy + h / 2) * half) / math.hypot(h, half)
  return np.maximum(base, slant)


def render(scene: Scene, resolution: int) -> np.ndarray:
  """The scene as uint8 [R, R, 3]; coverage is anti-aliased over one pixel."""
  centres = (np.arange(resolution) + 0.5) / resolution
  x, y = np.meshgrid(centres, centres)  # [R, R], x along columns, y along rows
  image = np.full((resolution, resolution, 3), 255.0)
  for thing in scene.things:
    coverage = np.clip(0.5 - signed_distance(thing, x, y) * resolution, 0.0, 1.0)[..., None]
    image = image * (1 - coverage) + np.array(COLORS[thing.color], np.float64) * coverage
  return np.round(image).astype(np.uint8)


def generate(seed: int, indices, resolution: int) -> tuple[np.ndarray, list[str]]:
  """Images [N, R, R, 3] uint8 and captions for the given scene indices."""
  scenes = [sample_scene(seed, int(i)) for i in indices]
  return np.stack([render(s, resolution) for s in scenes]), [s.caption for s in scenes]


def batches(seed: int, resolution: int, batch_size: int, *, start: int = 0, rows: np.ndarray | None = None
            ) -> Iterator[dict]:
  """Endless batches {'image', 'caption', 'index'}: scene i is global example i; a host
  reads only its `rows` of each global batch (None: all of it; see data/ordering.py).

  `start` counts global scenes already consumed (the resume position), so the
  stream continues exactly where it stopped whatever the batch size.
  """
  for indices in ordering.host_batch_positions(start, batch_size, rows):
    images, captions = generate(seed, indices, resolution)
    yield {"image": images, "caption": captions, "index": indices}
