"""dualproj_weights: the properties of a projection onto the dual cone, in float64 (one compiled
function for all problems); the reference and common checks are in test_gram_methods.py."""

import functools

import jax
import numpy as np
import qp_reference as reference
from jax_compat import enable_x64

import optax_gradvac as ogv

NUM_TASKS, DIM = 4, 10


def problems() -> np.ndarray:
  """Conflicting gradients, norms 1e-2 to 1e2 apart; the last with no conflict at all."""
  rng = np.random.default_rng(1)
  grads = []
  for _ in range(5):
    shared = rng.normal(size=DIM)
    rows = rng.uniform(-1, 1.5, (NUM_TASKS, 1)) * shared + rng.normal(size=(NUM_TASKS, DIM))
    grads.append(rows * 10.0 ** rng.uniform(-2, 2, (NUM_TASKS, 1)))
  grads.append(np.abs(rng.normal(size=(NUM_TASKS, DIM))))
  return np.stack(grads)


@functools.cache
def solutions() -> np.ndarray:
  grams = np.einsum("btp,bsp->bts", problems(), problems())
  with enable_x64(True):
    return np.asarray(jax.jit(jax.vmap(ogv.dualproj_weights))(grams))


def test_the_update_is_the_projection_of_the_mean():
  """Moreau: the update d is in the cone (<g_t, d> >= 0), d - mean is in the polar cone
  (a non-negative combination of the gradients' negatives: v >= 1 / T) and is orthogonal to
  d. Tolerances: float64 rounding relative to the largest squared norm (1e4 here)."""
  for grads, weights in zip(problems(), solutions(), strict=True):
    update, mean = weights @ grads, grads.mean(axis=0)
    scale = np.abs(grads @ grads.T).max()
    assert np.all(grads @ update >= -1e-12 * scale)
    assert np.all(weights >= 1 / NUM_TASKS - 1e-12)
    assert abs(update @ (update - mean)) <= 1e-12 * scale
    np.testing.assert_allclose(update, reference.dualproj(grads), atol=1e-10 * np.sqrt(scale))


def test_without_conflict_the_update_is_the_mean():
  np.testing.assert_allclose(solutions()[-1], 1 / NUM_TASKS, rtol=1e-12)
