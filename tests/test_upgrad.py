"""The properties the Jacobian-descent paper proves for UPGrad, beyond the reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv


def conflicting(seed: int, num_tasks: int, dim: int = 30) -> np.ndarray:
  rng = np.random.default_rng(seed)
  shared = rng.normal(size=dim)
  return rng.uniform(-1, 1.5, (num_tasks, 1)) * shared + rng.normal(size=(num_tasks, dim))


@pytest.mark.parametrize("num_tasks", [2, 4, 8])
def test_update_conflicts_with_no_task(num_tasks):
  """Non-conflicting: <g_t, d> >= 0 for every task (the paper's Proposition 2)."""
  conflicts = 0
  for seed in range(5):
    grads = conflicting(seed, num_tasks)
    conflicts += np.sum(grads @ grads.T < 0)
    with enable_x64(True):
      weights = np.asarray(jax.jit(ogv.upgrad_weights)(grads @ grads.T))
    update = weights @ grads
    assert np.all(grads @ update >= -1e-10 * np.abs(grads).max() ** 2)
    assert np.all(weights >= 1 / num_tasks - 1e-12)
  assert conflicts > 0


def test_without_conflicts_the_update_is_the_mean():
  rng = np.random.default_rng(1)
  grads = np.abs(rng.normal(size=(5, 12)))  # positive entries: every inner product > 0
  weights = jax.jit(ogv.upgrad_weights)(jnp.asarray(grads @ grads.T, jnp.float32))
  np.testing.assert_allclose(weights, np.full(5, 0.2), rtol=1e-6)


def test_two_tasks_give_the_mean_of_pcgrad_projections():
  """With two tasks the dual cone's projection of g_1 removes its component along g_2
  when they conflict (and nothing otherwise): PCGrad with a mean."""
  rng = np.random.default_rng(2)
  for seed in range(5):
    grads = {"w": jnp.asarray(conflicting(seed, 2) * rng.uniform(0.1, 10, (2, 1)), jnp.float32)}
    params = {"w": jnp.zeros(30)}
    upgrad, pcgrad = ogv.upgrad(2), ogv.pcgrad(2, reduction="mean")
    expected, _ = jax.jit(pcgrad.update)(grads, pcgrad.init(params))
    actual, _ = jax.jit(upgrad.update)(grads, upgrad.init(params))
    np.testing.assert_allclose(actual["w"], expected["w"], rtol=1e-5, atol=1e-5)
