"""aligned_mtl against the paper's Algorithm 1 in float64, its invariant and the special inputs
whose answer is its own; the common ones are in test_gram_methods.py."""

import closed_form_reference as reference
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_matches_algorithm_1(granularity, num_tasks, x64):
  """float32: the rounding of a [T, T] eigh (relative eps * condition number)."""
  rng = np.random.default_rng(num_tasks)
  groups = reference.GROUPS[granularity]
  tx = ogv.aligned_mtl(num_tasks, granularity=granularity)
  dtype, rtol, atol = (jnp.float64, 1e-9, 1e-11) if x64 else (jnp.float32, 1e-3, 1e-4)
  state = None
  with enable_x64(x64):
    for _ in range(3):
      grads = reference.task_gradients(rng, num_tasks)
      weights = reference.group_weights(grads, groups, reference.aligned_mtl)
      updates, state = reference.run(tx, grads, dtype, state=state)
      assert state.weights.dtype == dtype
      np.testing.assert_allclose(state.weights, weights, rtol, atol)
      reference.assert_updates_close(
        updates, reference.group_updates(grads, groups, weights), rtol, atol
      )


def test_task_weights_weigh_the_aligned_gradients():
  rng = np.random.default_rng(1)
  task_weights = np.array([0.5, 2.0, 1.0, 0.1])
  grads = reference.task_gradients(rng, 4)
  groups = reference.GROUPS["layer"]
  weights = reference.group_weights(grads, groups, reference.aligned_mtl, task_weights)
  tx = ogv.aligned_mtl(4, jnp.asarray(task_weights), granularity="layer")
  _, state = reference.run(tx, grads)
  np.testing.assert_allclose(state.weights, weights, rtol=1e-3, atol=1e-4)
  _, mean_state = reference.run(ogv.aligned_mtl(4, np.full(4, 0.25), granularity="layer"), grads)
  _, sum_state = reference.run(ogv.aligned_mtl(4, granularity="layer"), grads)
  np.testing.assert_allclose(mean_state.weights, sum_state.weights / 4, rtol=1e-6)
  with pytest.raises(ValueError, match=r"task_weights must have shape \(4,\)"):
    ogv.aligned_mtl(4, np.ones(3))


def test_task_weights_can_be_injected():
  rng = np.random.default_rng(2)
  grads = reference.task_gradients(rng, 3)
  tx = optax.inject_hyperparams(ogv.aligned_mtl, static_args=("num_tasks",))(
    num_tasks=3, task_weights=jnp.ones(3)
  )
  _, state = reference.run(tx, grads)
  state.hyperparams["task_weights"] = jnp.array([1.0, 0.0, 2.0])
  _, state = reference.run(tx, grads, state=state)
  expected = reference.group_weights(
    grads, reference.GROUPS["model"], reference.aligned_mtl, np.array([1.0, 0.0, 2.0])
  )
  np.testing.assert_allclose(state.inner_state.weights, expected, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("num_tasks", [2, 4, 7])
def test_aligned_gradients_are_orthogonal_with_the_smallest_norm(num_tasks):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(num_tasks, 30)) * rng.uniform(0.01, 10, size=(num_tasks, 1))
  gram = grads @ grads.T
  with enable_x64(True):
    basis = np.eye(num_tasks)
    # Column i of the balance transformation: task weights one-hot on i.
    balance = np.stack(
      [np.asarray(ogv.aligned_mtl_weights(jnp.asarray(gram), jnp.asarray(e))) for e in basis], 1
    )
  aligned = balance.T @ grads
  smallest = np.linalg.eigvalsh(gram)[0]
  expected = smallest * np.eye(num_tasks)
  np.testing.assert_allclose(aligned @ aligned.T, expected, atol=1e-9 * smallest)


# Special inputs.


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_opposite_tasks_give_their_sum(ratio):
  """Rank 1 again: equal norms cancel, unequal ones leave the plain sum."""
  g = np.random.default_rng(7).normal(size=(1, 6))
  grads = np.concatenate([g, -ratio * g])
  updates, state = reference.run(ogv.aligned_mtl(2), {"w": grads})
  np.testing.assert_allclose(state.weights[0], reference.aligned_mtl(grads), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(updates["w"], (1 - ratio) * g[0], rtol=1e-5, atol=1e-6)


def test_more_tasks_than_parameters():
  grads = np.random.default_rng(8).normal(size=(6, 3))
  expected = reference.aligned_mtl(grads)
  updates, state = reference.run(ogv.aligned_mtl(6), {"w": grads})
  np.testing.assert_allclose(state.weights[0], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["w"], expected @ grads, rtol=1e-4, atol=1e-5)
