"""The shared solvers against exhaustive searches, in float64 and float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qp_reference as reference
from jax_compat import enable_x64

from optax_gradvac._solvers import min_norm_weights, nonnegative_qp


def task_matrix(kind: str, num_tasks: int, dim: int, seed: int) -> np.ndarray:
  """``[T, P]`` rows of the shapes that make these problems easy or hard."""
  rng = np.random.default_rng(seed)
  if kind == "shared":  # a common direction that some rows follow and others oppose
    shared = rng.normal(size=dim)
    rows = rng.uniform(-1.5, 1.5, (num_tasks, 1)) * shared
    return rows + rng.uniform(0.3, 1, (num_tasks, 1)) * rng.normal(size=(num_tasks, dim))
  if kind == "scales":  # norms spread over 3.5 orders of magnitude
    return rng.normal(size=(num_tasks, dim)) * np.exp(rng.uniform(-4, 4, (num_tasks, 1)))
  if kind == "low-rank":  # rank 2
    return rng.normal(size=(num_tasks, 2)) @ rng.normal(size=(2, dim))
  if kind == "duplicates":  # rows 0, 1 identical; row 2 opposite to them
    rows = rng.normal(size=(max(num_tasks, 3), dim))
    rows[1], rows[2] = rows[0], -0.5 * rows[0]
    return rows[:num_tasks]
  if kind == "wide":  # fewer dimensions than rows
    return rng.normal(size=(num_tasks, max(num_tasks // 2, 1)))
  raise ValueError(kind)


KINDS = ["shared", "scales", "low-rank", "duplicates", "wide"]


def relative_error(actual: np.ndarray, expected: np.ndarray, rows: np.ndarray) -> float:
  """Largest error of a combination of rows, relative to the largest row."""
  return float(np.abs(actual - expected).max() / np.linalg.norm(rows, axis=1).max())


# nonnegative_qp: min 1/2 x^T Q x + q^T x over x >= 0 with Q = A^T A, q = -A^T b is
# NNLS min |A x - b|, which the reference solves on A itself.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_vars", [1, 3, 8])
def test_nonnegative_qp_matches_nnls_in_float64(kind, num_vars):
  rng = np.random.default_rng(num_vars)
  for seed in range(3):
    columns = task_matrix(kind, num_vars, 12, seed)  # A^T
    target = rng.normal(size=columns.shape[1])
    expected = reference.nonnegative_least_squares(columns.T, target)
    with enable_x64(True):
      x = np.asarray(jax.jit(nonnegative_qp)(columns @ columns.T, -columns @ target))
    assert x.dtype == np.float64 and (x >= 0).all()
    # The minimiser need not be unique (duplicates, low rank); A x is.
    tolerance = 1e-6 if kind == "wide" else 1e-10
    assert relative_error(x @ columns, expected @ columns, columns) < tolerance


@pytest.mark.parametrize("kind", KINDS)
def test_nonnegative_qp_float32_is_accurate_to_rounding(kind):
  """Problems of UPGrad's shape: row i of ``linear`` is ``Q e_i``, 8 variables."""
  for seed in range(3):
    rows = task_matrix(kind, 8, 200, seed)
    gram = rows @ rows.T
    expected = np.stack([reference.dual_cone_projection(rows, row) for row in rows])
    lam = np.asarray(jax.jit(nonnegative_qp)(jnp.asarray(gram, jnp.float32), gram), np.float64)
    assert lam.shape == (8, 8) and (lam >= 0).all()
    projections = rows + lam @ rows
    assert relative_error(projections, expected, rows) < 1e-5


def test_nonnegative_qp_solves_rows_independently_and_vmaps():
  rows = task_matrix("shared", 5, 30, 0)
  gram = jnp.asarray(rows @ rows.T, jnp.float32)
  linear = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5)), jnp.float32)
  solve = jax.jit(nonnegative_qp)
  together = solve(gram, linear)
  for k in range(4):
    np.testing.assert_allclose(solve(gram, linear[k]), together[k], rtol=1e-5, atol=1e-6)
  batched = jax.jit(jax.vmap(nonnegative_qp))(
    jnp.stack([gram, 2 * gram]), jnp.stack([linear, linear])
  )
  np.testing.assert_allclose(batched[0], together, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(batched[1], together / 2, rtol=1e-5, atol=1e-6)


def test_nonnegative_qp_holds_masked_and_zero_diagonal_variables_at_zero():
  rows = task_matrix("shared", 4, 10, 1)
  rows[2] = 0  # zero diagonal: its variable does not enter the objective
  gram = rows @ rows.T
  target = -rows.sum(axis=0)
  mask = np.array([True, True, True, False])
  with enable_x64(True):
    x = np.asarray(nonnegative_qp(gram, -rows @ target, mask=mask))
  expected = np.zeros(4)
  expected[:2] = reference.nonnegative_least_squares(rows[:2].T, target)
  np.testing.assert_allclose(x, expected, rtol=1e-10, atol=1e-12)


def test_nonnegative_qp_without_variables_in_play_is_zero():
  x = nonnegative_qp(jnp.zeros((3, 3)), jnp.zeros(3))
  np.testing.assert_array_equal(x, 0)
  x = nonnegative_qp(jnp.eye(3), -jnp.ones(3), mask=jnp.zeros(3, bool))
  np.testing.assert_array_equal(x, 0)


# min_norm_weights: the min-norm point of a convex hull, against trying every support.


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("num_tasks", [1, 2, 5, 8])
def test_min_norm_weights_match_exhaustive_search(kind, num_tasks):
  for seed in range(2):
    rows = task_matrix(kind, num_tasks, 40, seed)
    expected = reference.min_norm_weights(rows) @ rows
    with enable_x64(True):
      weights = np.asarray(jax.jit(min_norm_weights)(rows @ rows.T))
    np.testing.assert_allclose(weights.sum(), 1, rtol=1e-12)
    assert (weights >= 0).all()
    assert relative_error(weights @ rows, expected, rows) < 1e-9
    weights32 = jax.jit(min_norm_weights)(jnp.asarray(rows @ rows.T, jnp.float32))
    weights32 = np.asarray(weights32, np.float64)
    assert relative_error(weights32 @ rows, expected, rows) < 2e-5


def test_min_norm_weights_of_two_vectors_in_closed_form():
  """For two vectors the min-norm point is a clipped 1-D minimisation."""
  rng = np.random.default_rng(3)
  for _ in range(10):
    a, b = rng.normal(size=(2, 6)) * rng.uniform(0.01, 100, size=(2, 1))
    gamma = np.clip((b - a) @ b / np.sum((a - b) ** 2), 0, 1)  # weight of a
    with enable_x64(True):
      weights = jax.jit(min_norm_weights)(np.stack([a, b]) @ np.stack([a, b]).T)
    np.testing.assert_allclose(weights, [gamma, 1 - gamma], rtol=1e-10, atol=1e-12)


def test_min_norm_weights_leave_out_masked_and_zero_vectors():
  rows = task_matrix("shared", 5, 20, 4)
  rows[3] = 0
  solve = jax.jit(min_norm_weights)
  with enable_x64(True):
    weights = np.asarray(solve(rows @ rows.T, np.array([True, True, False, True, True])))
    assert weights[3] == 1  # a zero vector in the hull is its min-norm point
    weights = np.asarray(solve(rows @ rows.T, np.array([True, True, False, False, True])))
    assert weights[2] == 0 and weights[3] == 0
    keep = [0, 1, 4]
    np.testing.assert_allclose(weights[keep], reference.min_norm_weights(rows[keep]), atol=1e-10)
    all_but_zero = solve(rows @ rows.T, np.array([True, True, True, False, True]))
    np.testing.assert_allclose(solve(rows @ rows.T), all_but_zero, atol=1e-10)
  np.testing.assert_array_equal(min_norm_weights(jnp.zeros((3, 3))), 0)


def test_min_norm_weights_are_scale_invariant():
  rows = task_matrix("shared", 6, 20, 5)
  gram = jnp.asarray(rows @ rows.T, jnp.float32)
  solve = jax.jit(min_norm_weights)
  weights = solve(gram)
  for scale in [1e-30, 1e-6, 1e6, 1e30]:
    np.testing.assert_allclose(solve(gram * scale), weights, rtol=1e-5, atol=1e-6)
