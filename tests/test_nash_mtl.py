"""nash_mtl against the bargaining solution in float64, its invariants and the special inputs
whose answer is its own; the common ones are in test_gram_methods.py."""

import closed_form_reference as reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_matches_the_bargaining_solution(granularity, num_tasks, x64):
  """Several steps, each warm-started from the state.

  With 5 or 8 tasks, the 3-parameter group of "layer" has no bargaining solution
  (some positive combination of its gradients is 0); its penalised solution has
  weights beta up to ~200, where float32's rounding of the cosines (eps = 1.2e-7)
  is amplified by beta^2: the tolerance is 4 eps beta^2 (about 2e-2 at beta = 200,
  the 4 a margin on the constant of that first-order bound), 1e-4 when smaller.
  """
  rng = np.random.default_rng(num_tasks)
  groups = reference.GROUPS[granularity]
  tx = ogv.nash_mtl(num_tasks, granularity=granularity)
  dtype, rtol, atol = (jnp.float64, 1e-9, 1e-11) if x64 else (jnp.float32, 1e-4, 1e-6)
  state = None
  with enable_x64(x64):
    for _ in range(3):
      grads = reference.task_gradients(rng, num_tasks)
      weights = reference.group_weights(grads, groups, reference.nash_mtl, max_weight=100.0)
      updates, state = reference.run(tx, grads, dtype, state=state)
      assert state.weights.dtype == dtype
      flat = [np.concatenate([grads[n].reshape(num_tasks, -1) for n in g], 1) for g in groups]
      betas = weights * np.stack([np.linalg.norm(f, axis=1) for f in flat])
      for group, names in enumerate(groups):
        amplified = 4 * np.finfo(np.float32).eps * betas[group].max() ** 2
        group_rtol = rtol if x64 else max(rtol, amplified)
        np.testing.assert_allclose(state.weights[group], weights[group], group_rtol, atol)
        np.testing.assert_allclose(state.iterate[group], betas[group], group_rtol, atol)
        expected = reference.group_updates(grads, [names], weights[group : group + 1])
        reference.assert_updates_close(updates, expected, group_rtol, atol)


def test_the_penalty_changes_no_well_posed_solution():
  rng = np.random.default_rng(0)
  for num_tasks in [2, 4, 8]:
    grads = rng.normal(size=(num_tasks, 40)) * rng.uniform(0.1, 3, size=(num_tasks, 1))
    exact, penalised = reference.nash_mtl(grads), reference.nash_mtl(grads, max_weight=100.0)
    np.testing.assert_allclose(penalised, exact, rtol=1e-12)


@pytest.mark.parametrize("num_tasks", [2, 4, 7])
def test_every_weight_times_its_directional_derivative_is_one(num_tasks):
  rng = np.random.default_rng(1)
  grads = rng.normal(size=(num_tasks, 30)) * rng.uniform(0.01, 10, size=(num_tasks, 1))
  with enable_x64(True):
    solution = ogv.nash_mtl_weights(jnp.asarray(grads @ grads.T), max_weight=1e6)
  weights = np.asarray(solution.weights)
  assert (weights > 0).all() and float(solution.residual) < 1e-12
  update = weights @ grads
  np.testing.assert_allclose(weights * (grads @ update), 1, rtol=1e-12)
  np.testing.assert_allclose(np.linalg.norm(update), np.sqrt(num_tasks), rtol=1e-12)


def test_scaling_one_task_divides_its_weight_and_keeps_the_update():
  rng = np.random.default_rng(2)
  grads = reference.task_gradients(rng, 4)
  factors = np.array([1e-3, 1.0, 50.0, 0.2])
  scaled = {k: v * factors.reshape(-1, *[1] * (v.ndim - 1)) for k, v in grads.items()}
  updates, state = reference.run(ogv.nash_mtl(4, granularity="layer"), grads)
  updates_scaled, state_scaled = reference.run(ogv.nash_mtl(4, granularity="layer"), scaled)
  np.testing.assert_allclose(state_scaled.weights * factors, state.weights, rtol=1e-4)
  for name in grads:
    np.testing.assert_allclose(updates_scaled[name], updates[name], rtol=1e-4, atol=1e-5)


def test_warm_start_from_the_solution_takes_no_step():
  rng = np.random.default_rng(4)
  grads = rng.normal(size=(6, 20))
  gram = jnp.asarray(grads @ grads.T, jnp.float32)
  cold = ogv.nash_mtl_weights(gram)
  assert 2 <= int(cold.iterations) < 20 and float(cold.residual) <= 100 * np.finfo(np.float32).eps
  warm = ogv.nash_mtl_weights(gram, cold.iterate)
  assert int(warm.iterations) <= 1
  np.testing.assert_allclose(warm.weights, cold.weights, rtol=1e-5)
  capped = ogv.nash_mtl_weights(gram, max_iterations=1)
  assert int(capped.iterations) == 1 and float(capped.residual) > float(cold.residual)


def test_the_state_carries_the_iterate_between_steps():
  rng = np.random.default_rng(5)
  grads = reference.task_gradients(rng, 3)
  tx = ogv.nash_mtl(3, granularity="layer", max_iterations=3)
  state = None
  for _ in range(4):  # the same gradients: each step continues from the last
    _, state = reference.run(tx, grads, state=state)
  weights = reference.group_weights(grads, reference.GROUPS["layer"], reference.nash_mtl, 100.0)
  np.testing.assert_allclose(state.weights, weights, rtol=1e-4, atol=1e-6)
  assert int(state.count) == 4


def test_hyperparameters_can_be_injected_and_are_checked():
  rng = np.random.default_rng(7)
  grads = reference.task_gradients(rng, 3)
  tx = optax.inject_hyperparams(ogv.nash_mtl, static_args=("num_tasks",))(
    num_tasks=3, max_weight=100.0, max_iterations=20
  )
  _, state = reference.run(tx, grads)
  state.hyperparams["max_iterations"] = jnp.asarray(1)
  _, one_step = reference.run(
    tx,
    grads,
    state=state._replace(
      inner_state=tx.init(
        jax.tree.map(lambda g: jnp.zeros(g.shape[1:]), reference.nest(grads))
      ).inner_state
    ),
  )
  assert not np.allclose(one_step.inner_state.weights, state.inner_state.weights, rtol=1e-6)
  with pytest.raises(ValueError, match="max_weight must be positive"):
    ogv.nash_mtl(3, max_weight=0.0)
  with pytest.raises(ValueError, match="max_iterations must be at least 1"):
    ogv.nash_mtl(3, max_iterations=0)


# Special inputs.


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_opposite_tasks_cancel(ratio):
  """No bargaining solution exists; the penalised one has a near-zero update."""
  rng = np.random.default_rng(10)
  g, h = rng.normal(size=(2, 1, 8))
  updates, state = reference.run(ogv.nash_mtl(2), {"w": np.concatenate([g, -ratio * g])})
  assert np.isfinite(state.weights).all() and np.isfinite(state.iterate).all()
  assert np.linalg.norm(updates["w"]) < 1e-3
  # Beside a third task, the update follows the third task's gradient off the
  # pair's direction (to about 1 / max_weight).
  grads = np.concatenate([g, -ratio * g, h])
  updates, state = reference.run(ogv.nash_mtl(3), {"w": grads})
  expected = reference.nash_mtl(grads, max_weight=100.0) @ grads
  np.testing.assert_allclose(updates["w"], expected, atol=1e-3)
  off_pair = h[0] - (h[0] @ g[0]) / (g[0] @ g[0]) * g[0]
  np.testing.assert_allclose(updates["w"], off_pair / np.linalg.norm(off_pair), atol=3e-2)


def test_more_tasks_than_parameters_keeps_finite_weights():
  grads = np.random.default_rng(11).normal(size=(16, 4))
  updates, state = reference.run(ogv.nash_mtl(16, max_iterations=100), {"w": grads})
  expected = reference.nash_mtl(grads, max_weight=100.0)
  assert np.isfinite(state.weights).all()
  np.testing.assert_allclose(updates["w"], expected @ grads, atol=1e-3)
