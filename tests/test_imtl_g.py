"""imtl_g against the paper's closed form in float64, its invariant and the special inputs
whose answer is its own; the common ones are in test_gram_methods.py."""

import closed_form_reference as reference
import jax.numpy as jnp
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_matches_the_papers_closed_form(granularity, num_tasks, x64):
  """float32: the rounding of a [T, T] eigh (relative eps * condition number)."""
  rng = np.random.default_rng(num_tasks)
  groups = reference.GROUPS[granularity]
  tx = ogv.imtl_g(num_tasks, granularity=granularity)
  dtype, rtol, atol = (jnp.float64, 1e-9, 1e-11) if x64 else (jnp.float32, 1e-3, 1e-4)
  state = None
  with enable_x64(x64):
    for _ in range(3):
      grads = reference.task_gradients(rng, num_tasks)
      weights = reference.group_weights(grads, groups, reference.imtl_g)
      updates, state = reference.run(tx, grads, dtype, state=state)
      assert state.weights.dtype == dtype
      np.testing.assert_allclose(state.weights, weights, rtol, atol)
      expected = reference.group_updates(grads, groups, weights)
      reference.assert_updates_close(updates, expected, rtol, atol)


@pytest.mark.parametrize("num_tasks", [2, 4, 7])
def test_projections_on_unit_gradients_are_equal(num_tasks):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(num_tasks, 30)) * rng.uniform(0.01, 10, size=(num_tasks, 1))
  with enable_x64(True):
    weights = np.asarray(ogv.imtl_g_weights(jnp.asarray(grads @ grads.T)))
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  projections = units @ (weights @ grads)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-10)
  np.testing.assert_allclose(weights.sum(), 1, rtol=1e-12)


def test_negative_sum_follows_the_paper():
  """A small third gradient can make the update's projections equal and negative."""
  grads = np.array([[-1.4, 0.5, 1.0], [-0.2, -1.1, 0.9], [-0.13, -0.07, 0.06]])
  expected = reference.imtl_g(grads)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  assert (units @ (expected @ grads) < 0).all()  # the case exists
  weights = ogv.imtl_g_weights(jnp.asarray(grads @ grads.T, jnp.float32))
  np.testing.assert_allclose(weights, expected, rtol=1e-4)


# Special inputs.


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_opposite_tasks_give_a_zero_update(ratio):
  """Only the zero vector has equal projections on u and -u: the paper's answer too."""
  g = np.random.default_rng(5).normal(size=(1, 6))
  updates, state = reference.run(ogv.imtl_g(2), {"w": np.concatenate([g, -ratio * g])})
  np.testing.assert_allclose(updates["w"], 0, atol=1e-6)
  assert np.isfinite(state.weights).all()


def test_opposite_pair_beside_a_third_task_follows_least_squares():
  rng = np.random.default_rng(6)
  g = rng.normal(size=(2, 6))
  grads = np.stack([g[0], -2 * g[0], g[1]])
  expected = reference.imtl_g_least_squares(grads)
  updates, state = reference.run(ogv.imtl_g(3), {"w": grads})
  np.testing.assert_allclose(state.weights[0], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["w"], expected @ grads, rtol=1e-4, atol=1e-5)


def test_more_tasks_than_parameters_follows_least_squares():
  grads = np.random.default_rng(7).normal(size=(6, 3))
  expected = reference.imtl_g_least_squares(grads)
  assert np.abs(expected).sum() > 0
  updates, state = reference.run(ogv.imtl_g(6), {"w": grads})
  np.testing.assert_allclose(state.weights[0], expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(updates["w"], expected @ grads, rtol=1e-3, atol=1e-4)
