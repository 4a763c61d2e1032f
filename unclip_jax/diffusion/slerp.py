"""Spherical interpolation, for CLIP embeddings (interpolations, text diffs) and
diffusion noise (x_T between two inversions)."""

import numpy as np


def slerp(a, b, t):
  """Interpolates from a (t = 0) to b (t = 1): the direction along the great
  circle, the norm linearly.

  a, b: two points of the same shape, each taken as one flat vector (a CLIP
  embedding [D], or a whole x_T [H, W, C]). t: a scalar or a 1-D grid. Returns
  t.shape + a.shape in a's float dtype (computed in float64). Unit vectors stay
  unit vectors, and the point at t is at angle t * Omega from a and (1 - t) *
  Omega from b, Omega the angle between them. Parallel inputs fall back to a
  linear path (nothing to rotate); antipodal ones have no unique great circle
  and raise ValueError.
  """
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape:
    raise ValueError(f"slerp needs two points of one shape, got {a.shape} and {b.shape}.")
  dtype = a.dtype if np.issubdtype(a.dtype, np.floating) else np.float32
  t = np.asarray(t, np.float64)
  flat_a, flat_b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
  norm_a, norm_b = np.linalg.norm(flat_a), np.linalg.norm(flat_b)
  if norm_a == 0 or norm_b == 0:
    raise ValueError("slerp of a zero vector: it has no direction.")
  u_a, u_b = flat_a / norm_a, flat_b / norm_b
  cos = float(np.clip(u_a @ u_b, -1.0, 1.0))
  omega = np.arccos(cos)
  tt = t.reshape(t.shape + (1,))
  if np.sin(omega) < 1e-6:
    if cos < 0:
      raise ValueError("slerp between opposite directions is ambiguous (no unique great circle).")
    direction = (1.0 - tt) * u_a + tt * u_b
    direction = direction / np.linalg.norm(direction, axis=-1, keepdims=True)
  else:
    direction = (np.sin((1.0 - tt) * omega) * u_a + np.sin(tt * omega) * u_b) / np.sin(omega)
  out = direction * ((1.0 - tt) * norm_a + tt * norm_b)
  return out.reshape(t.shape + a.shape).astype(dtype)
