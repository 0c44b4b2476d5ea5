"""CAGrad's primal problem, its limits in c, the degenerate case and its hyper-parameters."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import qp_reference as reference
from jax_compat import enable_x64

import optax_gradvac as ogv


def conflicting(seed: int, num_tasks: int, dim: int = 20) -> np.ndarray:
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=dim)
  rows = rng.uniform(-1.5, 1.5, (num_tasks, 1)) * shared + rng.normal(size=(num_tasks, dim))
  return rows * rng.uniform(0.3, 3, (num_tasks, 1))


def cagrad_update(rows: np.ndarray, c: float, **kwargs) -> np.ndarray:
  with enable_x64(True):
    weights = jax.jit(ogv.cagrad_weights, static_argnames="rescale")(rows @ rows.T, c, **kwargs)
  return np.asarray(weights) @ rows


@pytest.mark.parametrize("c", [0.1, 0.5, 0.9, 2.0])
@pytest.mark.parametrize("num_tasks", [2, 3, 6])
def test_update_solves_the_primal_problem(c, num_tasks):
  """max_d min_i <g_i, d> over |d - g_0| <= c |g_0|, solved by SLSQP in the gradients' space."""
  for seed in range(3):
    rows = conflicting(seed, num_tasks)
    update = cagrad_update(rows, c, rescale=False)
    mean = rows.mean(axis=0)
    assert np.linalg.norm(update - mean) <= c * np.linalg.norm(mean) * (1 + 1e-9)
    primal = reference.cagrad_primal(rows, c)
    value = reference.worst_improvement(rows, primal)
    np.testing.assert_allclose(
      reference.worst_improvement(rows, update), value, rtol=1e-7, atol=1e-9
    )
    np.testing.assert_allclose(update, primal, atol=1e-6 * np.abs(rows).max())


def test_zero_radius_is_the_mean_and_rescaling_is_one_plus_c_squared():
  rows = conflicting(1, 4)
  np.testing.assert_allclose(cagrad_update(rows, 0.0), rows.mean(axis=0), rtol=1e-12)
  for c in [0.3, 1.5]:
    np.testing.assert_allclose(
      cagrad_update(rows, c) * (1 + c**2), cagrad_update(rows, c, rescale=False), rtol=1e-12
    )


def test_large_radius_tends_to_mgda():
  rows = conflicting(2, 5)
  mgda = reference.mgda(rows)
  update = cagrad_update(rows, 1e4, rescale=False)
  cosine = update @ mgda / (np.linalg.norm(update) * np.linalg.norm(mgda))
  assert cosine > 1 - 1e-6


def test_a_hull_around_zero_gives_the_closest_optimal_direction():
  """0 in the hull and c large: the best worst-case improvement is 0, reached on the dual
  cone within the ball; the update is the projection of g_0 onto that cone."""
  rows = np.array([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.5, 1.0, 0.0]])
  for c in [0.9, 3.0]:
    update = cagrad_update(rows, c, rescale=False)
    np.testing.assert_allclose(update, [0.0, 1 / 3, 0.0], atol=1e-9)  # g_0 = (1/6, 1/3, 0)
    update32 = jax.jit(ogv.cagrad_weights)(jnp.asarray(rows @ rows.T, jnp.float32), c)
    np.testing.assert_allclose(np.asarray(update32) @ rows * (1 + c**2), update, atol=1e-6)
  np.testing.assert_allclose(
    cagrad_update(rows, 0.3, rescale=False), reference.cagrad(rows, 0.3, rescale=False), atol=1e-9
  )


def test_c_is_injectable_as_a_schedule():
  rows = conflicting(3, 3)
  grads = {"w": jnp.asarray(rows, jnp.float32)}
  params = {"w": jnp.zeros(rows.shape[1])}
  schedule = optax.linear_schedule(0.0, 1.0, 3)
  injected = optax.inject_hyperparams(
    ogv.cagrad, static_args=("num_tasks", "granularity", "rescale")
  )(num_tasks=3, c=schedule)
  state = injected.init(params)
  update = jax.jit(injected.update)
  for step in range(3):
    updates, state = update(grads, state, params)
    expected = reference.cagrad(rows, float(schedule(step)))
    np.testing.assert_allclose(updates["w"], expected, rtol=1e-4, atol=1e-5 * np.abs(rows).max())


def test_negative_c_is_rejected():
  with pytest.raises(ValueError, match="c must be non-negative"):
    ogv.cagrad(2, c=-0.1)
