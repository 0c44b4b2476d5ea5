"""fairgrad_weights against the alpha-fair solution in float64, over alphas and problems (one
compiled function for all); the common checks are in test_gram_methods.py."""

import functools

import closed_form_reference as reference
import jax
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv

ALPHAS = np.array([0.1, 0.5, 1.0, 2.0, 5.0, 50.0])
WELL_POSED = [0.5, 1.0, 2.0, 5.0]  # every improvement far above float64 rounding here
WELL_POSED_PROBLEMS = [0, 1, 2, 3, 5]  # problem 4 has two opposite tasks
NUM_TASKS, DIM = 4, 12


def problems() -> list[np.ndarray]:
  """Conflicting gradients with norms up to 1e4 apart; two opposite tasks beside two others;
  gradients with positive entries (no conflict at all)."""
  rng = np.random.default_rng(0)
  grads = []
  for _ in range(4):
    shared = rng.normal(size=DIM)
    rows = rng.uniform(-1, 1.5, (NUM_TASKS, 1)) * shared + rng.normal(size=(NUM_TASKS, DIM))
    grads.append(rows * 10.0 ** rng.uniform(-2, 2, (NUM_TASKS, 1)))
  g = rng.normal(size=DIM)
  grads.append(np.stack([g, -2 * g, rng.normal(size=DIM), rng.normal(size=DIM)]))
  grads.append(np.abs(rng.normal(size=(NUM_TASKS, DIM))))
  return grads


@functools.cache
def solutions() -> np.ndarray:
  """``[problems, alphas, T]`` weights, from one compiled, doubly vmapped ``fairgrad_weights``."""
  grams = np.stack([g @ g.T for g in problems()])
  solve = jax.vmap(jax.vmap(ogv.fairgrad_weights, (None, 0)), (0, None))
  with enable_x64(True):
    return np.asarray(jax.jit(solve)(grams, ALPHAS))


@pytest.mark.parametrize("alpha", WELL_POSED)
def test_weights_match_the_alpha_fair_solution_in_float64(alpha):
  """Against scipy on the same penalised equation (checked there to 1e-10). Ours stops
  within 100 rounding units; the weights' condition number here is below 1e4: 1e-9."""
  index = list(ALPHAS).index(alpha)
  for problem in WELL_POSED_PROBLEMS:
    expected = reference.fairgrad(problems()[problem], alpha, max_weight=100.0)
    np.testing.assert_allclose(solutions()[problem, index], expected, rtol=1e-9)


def test_every_equation_holds_to_rounding_at_every_alpha():
  """The terms of w_t (G w)_t = w_t^(1 - 1/alpha) - penalty cancel to within the solver's 100
  rounding units plus numpy's own rounding of the same sums (a few units): 200. Not on the
  problem with opposite tasks at alpha = 50: its weights lie 1e14 apart, the Hessian's
  condition number limits Newton's last steps, and the solver stops at its cap; that case is
  checked for finite weights and cancellation below."""
  for problem, (grads, weights) in enumerate(zip(problems(), solutions(), strict=True)):
    gram = grads @ grads.T
    largest = gram.diagonal().max()
    gram, norms = gram / largest, np.sqrt(gram.diagonal() / largest)
    for alpha, w in zip(ALPHAS, weights, strict=True):
      assert (w > 0).all() and np.isfinite(w).all()
      w = w * largest ** (alpha / (alpha + 1))  # the weights of the normalised Gram matrix
      own = w ** (1 - 1 / alpha)
      penalty = own * (norms * w ** (1 / alpha) / 100) ** 8 / alpha
      residual = w * (gram @ w) - own + penalty
      magnitude = w * (np.abs(gram) @ w) + own + penalty
      if problem != 4 or alpha < 50:
        assert np.max(np.abs(residual) / magnitude) <= 200 * np.finfo(np.float64).eps, alpha


def test_alpha_one_is_nash_mtl():
  index = list(ALPHAS).index(1.0)
  for grads, weights in zip(problems(), solutions()[:, index], strict=True):
    np.testing.assert_allclose(weights, reference.nash_mtl(grads, max_weight=100.0), rtol=1e-9)


def test_small_alpha_tends_to_the_sum_and_large_alpha_to_max_min_fairness():
  """alpha = 0.1: w = (G w)^(-alpha), near 1 when the sum improves every task (improvements
  within 1e3 of each other: 1e3^0.1 = 2). alpha = 50: the tasks of non-negligible weight
  (above 1e-3 of the largest) improve alike, to (1e3)^(1/50) = 1.15; the others more."""
  for grads, weights in zip(
    [problems()[i] for i in WELL_POSED_PROBLEMS], solutions()[WELL_POSED_PROBLEMS], strict=True
  ):
    if np.all(grads @ grads.sum(0) > 0):
      assert np.all((weights[0] > 0.5) & (weights[0] < 2))
    improvements = grads @ (weights[-1] @ grads)
    active = weights[-1] > 1e-3 * weights[-1].max()
    worst = improvements[active].min()
    assert improvements[active].max() <= 1.15 * worst
    assert np.all(improvements >= worst * (1 - 1e-9))
  assert np.all(problems()[-1] @ problems()[-1].sum(0) > 0)  # the sum case is there


def test_opposite_tasks_cancel_and_the_weights_stay_finite():
  """Tasks 0 and 1 are opposite (g, -2 g): no alpha-fair solution. The penalty acts where a
  task's improvement falls below about 1 / M of its (normalised) norm; from alpha = 1 on, that
  cancels the pair to within 1 / M = 1e-2 of its weighted size (smaller alphas trade more of
  the pair's improvement for the others')."""
  grads = problems()[4]
  for alpha, weights in zip(ALPHAS, solutions()[4], strict=True):
    assert np.isfinite(weights).all() and (weights > 0).all()
    pair = weights[0] * grads[0] + weights[1] * grads[1]
    size = weights[0] * np.linalg.norm(grads[0]) + weights[1] * np.linalg.norm(grads[1])
    assert alpha < 1 or np.linalg.norm(pair) < 1e-2 * size


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="alpha must be positive"):
    ogv.fairgrad(2, alpha=0.0)
  with pytest.raises(ValueError, match="max_weight must be positive"):
    ogv.fairgrad(2, max_weight=-1.0)
  with pytest.raises(ValueError, match="max_iterations must be at least 1"):
    ogv.fairgrad(2, max_iterations=0)
