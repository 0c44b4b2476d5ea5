"""config_weights: the Gram form of the paper's pseudo-inverse, against the paper's formula in
float64 (one compiled function for all problems); the common checks are in test_gram_methods.py."""

import functools

import closed_form_reference as reference
import jax
import numpy as np
from jax_compat import enable_x64

import optax_gradvac as ogv

NUM_TASKS, DIM = 4, 10


def problems() -> list[np.ndarray]:
  """Independent gradients (conflicting, norms 1e-2 to 1e2 apart), a zero gradient, a task
  repeated, tasks two by two opposite (g, -3 g, 2 g, -g), and more tasks than dimensions."""
  rng = np.random.default_rng(0)
  grads = []
  for _ in range(3):
    shared = rng.normal(size=DIM)
    rows = rng.uniform(-1, 1.5, (NUM_TASKS, 1)) * shared + rng.normal(size=(NUM_TASKS, DIM))
    grads.append(rows * 10.0 ** rng.uniform(-2, 2, (NUM_TASKS, 1)))
  rows = rng.normal(size=(NUM_TASKS, DIM))
  grads.append(np.concatenate([rows[:3], np.zeros((1, DIM))]))
  grads.append(np.concatenate([rows[:3], 2 * rows[:1]]))
  grads.append(np.array([1.0, -3.0, 2.0, -1.0])[:, None] * rows[:1])
  grads.append(np.pad(rng.normal(size=(NUM_TASKS, 3)), ((0, 0), (0, DIM - 3))))
  return grads


@functools.cache
def solutions() -> np.ndarray:
  grams = np.stack([g @ g.T for g in problems()])
  with enable_x64(True):
    return np.asarray(jax.jit(jax.vmap(ogv.config_weights))(grams))


def test_the_gram_form_of_the_pseudo_inverse():
  """pinv(U) = U^T (U U^T)^+ for the unit gradients U, full rank or not (the SVD of U:
  V S^+ W^T = V S W^T W S^+2 W^T)."""
  for grads in problems():
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    units = np.divide(grads, norms, out=np.zeros_like(grads), where=norms > 0)
    direct = np.linalg.pinv(units)
    through_gram = units.T @ np.linalg.pinv(units @ units.T)
    np.testing.assert_allclose(through_gram, direct, atol=1e-12)


def test_update_matches_the_paper_in_float64():
  """Against pinv(U) 1, normalised and scaled by the sum of projections, on U itself:
  float64 rounding times the condition number of U U^T (below 1e3 here)."""
  for grads, weights in zip(problems(), solutions(), strict=True):
    expected = reference.config(grads)
    scale = np.linalg.norm(grads, axis=1).max()
    np.testing.assert_allclose(weights @ grads, expected, atol=1e-11 * scale)


def test_independent_gradients_get_equal_positive_cosines():
  for grads, weights in zip(problems()[:3], solutions()[:3], strict=True):
    update = weights @ grads
    cosines = grads @ update / np.linalg.norm(grads, axis=1) / np.linalg.norm(update)
    np.testing.assert_allclose(cosines, cosines[0], rtol=1e-10)
    assert cosines[0] > 0
    # The length is the sum of the projections on the direction.
    length = np.sum(grads @ update) / np.linalg.norm(update)
    np.testing.assert_allclose(np.linalg.norm(update), length, rtol=1e-12)


def test_special_inputs():
  zero, repeated, opposite, _ = solutions()[3:]
  assert zero[3] == 0  # a zero gradient is left out
  np.testing.assert_array_equal(opposite, 0)  # no direction improves g and -g alike
  assert np.isfinite(repeated).all()
