"""gradnorm: the losses argument, and the weights' step on its special inputs against the
float64 reference; the reference over several steps is in test_gram_methods.py."""

import functools

import closed_form_reference as reference
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv
from optax_gradvac._methods import gradnorm

T = 3
PARAMS = {"w": jnp.zeros(2)}
GRADS = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]])}


def test_update_without_losses_says_how_to_pass_them():
  tx = ogv.gradnorm(T)
  with pytest.raises(ValueError, match=r"gradnorm: update needs the per-task losses.*losses="):
    jax.eval_shape(tx.update, GRADS, tx.init(PARAMS), PARAMS)
  with pytest.raises(ValueError, match=r"losses has shape \(2,\) but num_tasks=3"):
    jax.eval_shape(lambda: tx.update(GRADS, tx.init(PARAMS), PARAMS, losses=jnp.ones(2)))
  with pytest.raises(TypeError, match="must be a float array"):
    jax.eval_shape(lambda: tx.update(GRADS, tx.init(PARAMS), PARAMS, losses=jnp.ones(3, int)))


@pytest.mark.parametrize(
  "wrap",
  [
    lambda tx: optax.chain(tx, optax.adam(1e-3)),
    lambda tx: ogv.multi_steps(optax.chain(tx, optax.sgd(1.0)), 2, num_tasks=T),
  ],
  ids=["chain", "multi_steps"],
)
def test_chains_pass_the_losses_on(wrap):
  """Traced only (no compile): the losses reach gradnorm through the wrapper."""
  tx = wrap(ogv.gradnorm(T))
  updates, _ = jax.eval_shape(lambda: tx.update(GRADS, tx.init(PARAMS), PARAMS, losses=jnp.ones(T)))
  assert updates["w"].shape == (2,)
  with pytest.raises(ValueError, match="gradnorm: update needs the per-task losses"):
    jax.eval_shape(lambda: tx.update(GRADS, tx.init(PARAMS), PARAMS))


# The weights' step, one case per row: (weights, initial losses, norms, losses).
NAN = np.nan
CASES = {
  "first step": ([1, 1, 1], [0, 0, 0], [3, 1, 0.5], [2, 1, 0.5]),
  "later step": ([0.7, 1.3, 1.0], [2, 1, 0.5], [3, 1, 0.5], [1, 0.9, 0.1]),
  "absent task, NaN loss": ([0.7, 1.3, 1.0], [2, 1, 0.5], [3, 0, 0.5], [1, NAN, 0.1]),
  "weight clipped at 0": ([0.1, 1.9, 1.0], [2, 1, 0.5], [30, 1, 0.5], [2, 0.5, 0.5]),
  "loss 0 not recorded": ([1, 1, 1], [0, 0, 0], [3, 1, 0.5], [2, 0, 0.5]),
  "NaN loss": ([0.7, 1.3, 1.0], [2, 1, 0.5], [3, 1, 0.5], [1, NAN, 0.1]),
  "negative loss": ([0.7, 1.3, 1.0], [2, 1, 0.5], [3, 1, 0.5], [1, -0.2, 0.1]),
}
SKIPPED = ["NaN loss", "negative loss"]
ALPHA, LEARNING_RATE = 1.5, 0.025


@functools.cache
def stepped() -> tuple[np.ndarray, np.ndarray]:
  weights, initial, norms, losses = (
    np.array(column, np.float64) for column in zip(*CASES.values(), strict=True)
  )
  step = jax.vmap(gradnorm._weights_step, (0, 0, 0, 0, None, None))
  with enable_x64(True):
    new_weights, new_initial = jax.jit(step)(weights, initial, norms, losses, ALPHA, LEARNING_RATE)
  return np.asarray(new_weights), np.asarray(new_initial)


@pytest.mark.parametrize("case", [name for name in CASES if name not in SKIPPED])
def test_the_step_matches_the_reference(case):
  weights, initial, norms, losses = (np.array(column, np.float64) for column in CASES[case])
  expected = reference.GradNorm(T, ALPHA, LEARNING_RATE)
  expected.weights, expected.initial = weights.copy(), initial.copy()
  expected.step(np.diag(norms), losses)  # gradients whose norms are `norms`
  index = list(CASES).index(case)
  np.testing.assert_allclose(stepped()[0][index], expected.weights, rtol=1e-14)
  np.testing.assert_allclose(stepped()[1][index], expected.initial, rtol=1e-14)
  np.testing.assert_allclose(stepped()[0][index].sum(), T, rtol=1e-14)


def test_special_losses():
  new_weights, new_initial = stepped()
  names = list(CASES)
  for case in SKIPPED:  # the step is skipped: nothing changes
    np.testing.assert_array_equal(new_weights[names.index(case)], CASES[case][0])
    np.testing.assert_array_equal(new_initial[names.index(case)], CASES[case][1])
  np.testing.assert_array_equal(new_initial[names.index("first step")], [2, 1, 0.5])
  np.testing.assert_array_equal(new_initial[names.index("loss 0 not recorded")], [2, 0, 0.5])
  assert new_weights[names.index("weight clipped at 0")][0] == 0


def test_bad_hyperparameters_are_rejected():
  with pytest.raises(ValueError, match="alpha must be non-negative"):
    ogv.gradnorm(T, alpha=-1.0)
  with pytest.raises(ValueError, match="learning_rate must be positive"):
    ogv.gradnorm(T, learning_rate=0.0)
