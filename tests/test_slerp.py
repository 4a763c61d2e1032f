"""slerp: closed-form checks."""

import numpy as np
import pytest

from unclip_jax.diffusion.slerp import slerp


def _unit(v):
  return v / np.linalg.norm(v)


def test_endpoints_are_exact():
  rng = np.random.default_rng(0)
  a, b = rng.standard_normal(16).astype(np.float32), 3 * rng.standard_normal(16).astype(np.float32)
  out = slerp(a, b, [0.0, 1.0])
  assert out.dtype == np.float32 and out.shape == (2, 16)
  np.testing.assert_array_equal(out[0], a)  # computed in float64: bitwise after the float32 cast
  np.testing.assert_array_equal(out[1], b)


def test_orthogonal_unit_vectors_follow_the_quarter_circle():
  e1, e2 = np.eye(3)[0], np.eye(3)[1]
  t = np.linspace(0.0, 1.0, 7)
  out = slerp(e1, e2, t)
  expected = np.cos(t * np.pi / 2)[:, None] * e1 + np.sin(t * np.pi / 2)[:, None] * e2
  np.testing.assert_allclose(out, expected, atol=1e-12)


def test_unit_norm_and_angles():
  rng = np.random.default_rng(1)
  a, b = _unit(rng.standard_normal(32)), _unit(rng.standard_normal(32))
  omega = np.arccos(a @ b)
  t = np.linspace(0.0, 1.0, 11)
  out = slerp(a, b, t)
  np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-12)  # stays on the sphere
  np.testing.assert_allclose(np.arccos(np.clip(out @ a, -1, 1)), t * omega, atol=1e-7)  # angle t * Omega from a
  np.testing.assert_allclose(np.arccos(np.clip(out @ b, -1, 1)), (1 - t) * omega, atol=1e-7)
  mid = slerp(a, b, 0.5)
  np.testing.assert_allclose(mid, _unit(a + b), atol=1e-12)  # the midpoint bisects the angle


def test_norm_is_interpolated_linearly_and_shapes_are_kept():
  e1, e2 = np.eye(2)
  np.testing.assert_allclose(np.linalg.norm(slerp(2 * e1, 4 * e2, 0.5)), 3.0)
  x = np.random.default_rng(2).standard_normal((2, 4, 4, 3))  # whole tensors (x_T) are one vector each
  assert slerp(x[0], x[1], [0.0, 0.3, 1.0]).shape == (3, 4, 4, 3)


def test_parallel_and_degenerate_inputs():
  a = np.array([1.0, 2.0, 2.0])
  np.testing.assert_allclose(slerp(a, 2 * a, 0.5), 1.5 * a)  # same direction: only the norm moves
  with pytest.raises(ValueError, match="opposite"):
    slerp(a, -a, 0.5)
  with pytest.raises(ValueError, match="zero"):
    slerp(a, 0 * a, 0.5)
  with pytest.raises(ValueError, match="shape"):
    slerp(a, a[:2], 0.5)
