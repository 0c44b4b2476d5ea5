"""The properties MGDA's paper states for its update, beyond the reference comparison."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv


def conflicting(seed: int, num_tasks: int, dim: int = 30) -> np.ndarray:
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=dim)
  return rng.uniform(-0.5, 1.5, (num_tasks, 1)) * shared + rng.normal(size=(num_tasks, dim))


@pytest.mark.parametrize("num_tasks", [2, 4, 8])
def test_update_decreases_every_task_by_at_least_its_squared_norm(num_tasks):
  """For the min-norm point d of the hull, <g_t, d> >= |d|^2 for every t (optimality)."""
  for seed in range(5):
    grads = conflicting(seed, num_tasks)
    with enable_x64(True):
      weights = np.asarray(jax.jit(ogv.mgda_weights)(grads @ grads.T))
    update = weights @ grads
    assert np.all(grads @ update >= update @ update - 1e-10 * np.abs(grads).max() ** 2)
    np.testing.assert_allclose(weights.sum(), 1, rtol=1e-12)
    # Equality on the support: the tasks with positive weight are tight.
    support = weights > 1e-8
    np.testing.assert_allclose(grads[support] @ update, update @ update, rtol=1e-8)


def test_pareto_stationary_point_gives_a_zero_update():
  """When 0 is in the hull no direction improves every task: MGDA stops."""
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(3, 2))
  grads = np.concatenate([grads, [-grads.sum(axis=0)]])  # four vectors summing to 0
  weights = jax.jit(ogv.mgda_weights)(jnp.asarray(grads @ grads.T, jnp.float32))
  assert np.abs(np.asarray(weights) @ grads).max() < 1e-5 * np.abs(grads).max()


def test_weights_ignore_absent_tasks_and_vanish_without_any():
  grads = conflicting(1, 4)
  grads[2] = 0
  weights = np.asarray(jax.jit(ogv.mgda_weights)(jnp.asarray(grads @ grads.T, jnp.float32)))
  assert weights[2] == 0 and abs(weights.sum() - 1) < 1e-6
  np.testing.assert_array_equal(ogv.mgda_weights(jnp.zeros((3, 3))), 0)
