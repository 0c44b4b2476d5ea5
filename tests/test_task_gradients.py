"""Per-task losses and gradients: task-separated and mixed batches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gradvac as ogv

NUM_TASKS, BATCH, FEATURES, HIDDEN = 3, 6, 5, 7


def _params() -> dict:
  key_1, key_2 = jax.random.split(jax.random.key(0))
  return {
    "hidden": {"kernel": jax.random.normal(key_1, (FEATURES, HIDDEN)), "bias": jnp.zeros(HIDDEN)},
    "out": {"kernel": jax.random.normal(key_2, (HIDDEN,))},
  }


def _predict(params: dict, x: jax.Array) -> jax.Array:
  hidden = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return hidden @ params["out"]["kernel"]


def _example_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return (_predict(params, x) - y) ** 2


def _mean_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(_example_losses(params, x, y))


# float32 rounding of a vmapped and compiled computation against a per-task eager one: the
# sums over a batch of a few examples through two small layers reassociate, each entry off
# by a few dozen rounding units of the leaf's largest magnitude at most.
FLOAT32_TOL = 64 * float(np.finfo(np.float32).eps)  # 7.6e-6


def _assert_close(actual, expected, tol=FLOAT32_TOL):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    scale = float(np.abs(np.asarray(e, np.float64)).max(initial=0.0))
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol * max(scale, 1.0))


def _stack(trees):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


# Task-separated batches.


def test_task_value_and_grad_equals_a_loop_of_grads():
  params = _params()
  xs = jax.random.normal(jax.random.key(1), (NUM_TASKS, BATCH, FEATURES))
  ys = jax.random.normal(jax.random.key(2), (NUM_TASKS, BATCH))
  losses, grads = jax.jit(ogv.task_value_and_grad(_mean_loss))(params, xs, ys)

  expected_losses = [_mean_loss(params, xs[t], ys[t]) for t in range(NUM_TASKS)]
  expected_grads = _stack([jax.grad(_mean_loss)(params, xs[t], ys[t]) for t in range(NUM_TASKS)])
  _assert_close(losses, jnp.stack(expected_losses))
  _assert_close(grads, expected_grads)
  assert jax.tree.map(jnp.shape, grads) == jax.tree.map(lambda p: (NUM_TASKS, *p.shape), params)


def test_task_value_and_grad_with_aux():
  def loss_with_aux(params, x, y):
    predictions = _predict(params, x)
    return jnp.mean((predictions - y) ** 2), {"prediction_mean": predictions.mean()}

  params = _params()
  xs = jax.random.normal(jax.random.key(1), (NUM_TASKS, BATCH, FEATURES))
  ys = jax.random.normal(jax.random.key(2), (NUM_TASKS, BATCH))
  (losses, aux), grads = jax.jit(ogv.task_value_and_grad(loss_with_aux, has_aux=True))(
    params, xs, ys
  )
  expected_means = [_predict(params, xs[t]).mean() for t in range(NUM_TASKS)]
  _assert_close(aux["prediction_mean"], jnp.stack(expected_means))
  _assert_close(losses, jnp.stack([_mean_loss(params, xs[t], ys[t]) for t in range(NUM_TASKS)]))
  _assert_close(
    grads["out"]["kernel"][1], jax.grad(_mean_loss)(params, xs[1], ys[1])["out"]["kernel"]
  )


def _flops(fn, *args) -> float:
  analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(analysis, list):
    analysis = analysis[0]
  return analysis["flops"]


def test_task_value_and_grad_costs_one_backward_pass_over_all_examples():
  num_tasks, batch, features, hidden = 8, 32, 64, 128
  params = {"w1": jnp.ones((features, hidden)), "w2": jnp.ones((hidden, 4))}

  def loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)

  xs, ys = jnp.ones((num_tasks, batch, features)), jnp.ones((num_tasks, batch, 4))
  per_task = _flops(ogv.task_value_and_grad(loss), params, xs, ys)
  one_pass = _flops(
    jax.value_and_grad(loss),
    params,
    xs.reshape(num_tasks * batch, features),
    ys.reshape(num_tasks * batch, 4),
  )
  assert per_task < 1.1 * one_pass


# Mixed batches.


def _mixed_batch(task_ids):
  x = jax.random.normal(jax.random.key(3), (len(task_ids), FEATURES))
  y = jax.random.normal(jax.random.key(4), (len(task_ids),))
  return jnp.asarray(task_ids), x, y


def _loop_reference(params, task_ids, x, y):
  """Per-task mean loss and its gradient, one task at a time on its own examples."""
  losses, grads = [], []
  for task in range(NUM_TASKS):
    mask = np.asarray(task_ids) == task
    if mask.any():
      loss, grad = jax.value_and_grad(_mean_loss)(params, x[mask], y[mask])
    else:
      loss, grad = jnp.zeros(()), jax.tree.map(jnp.zeros_like, params)
    losses.append(loss)
    grads.append(grad)
  return jnp.stack(losses), _stack(grads)


@pytest.mark.parametrize(
  "task_ids",
  [[0, 1, 2, 0, 1, 2, 2, 0], [2, 2, 0, 2, 0, 0, 0, 2], [1, -1, 1, 1, 0, 3, 0, 0]],
  ids=["all-present", "task-1-absent", "out-of-range-ids-ignored"],
)
def test_segment_value_and_grad_equals_a_loop_of_grads(task_ids):
  params = _params()
  ids, x, y = _mixed_batch(task_ids)
  losses, grads = jax.jit(ogv.segment_value_and_grad(_example_losses, NUM_TASKS))(params, ids, x, y)
  expected_losses, expected_grads = _loop_reference(params, ids, x, y)
  _assert_close(losses, expected_losses, tol=1e-5)
  _assert_close(grads, expected_grads, tol=1e-5)


def test_segment_value_and_grad_absent_task_is_exactly_zero():
  params = _params()
  ids, x, y = _mixed_batch([2, 2, 0, 2, 0, 0, 0, 2])
  losses, grads = jax.jit(ogv.segment_value_and_grad(_example_losses, NUM_TASKS))(params, ids, x, y)
  assert losses[1] == 0
  for leaf in jax.tree.leaves(grads):
    assert np.all(np.asarray(leaf[1]) == 0)
    assert np.all(np.any(np.asarray(leaf)[[0, 2]] != 0, axis=tuple(range(1, leaf.ndim))))


def test_segment_value_and_grad_with_aux():
  def loss_with_aux(params, x, y):
    predictions = _predict(params, x)
    return (predictions - y) ** 2, predictions

  params = _params()
  ids, x, y = _mixed_batch([0, 1, 2, 0, 1, 2, 2, 0])
  (losses, predictions), grads = jax.jit(
    ogv.segment_value_and_grad(loss_with_aux, NUM_TASKS, has_aux=True)
  )(params, ids, x, y)
  expected_losses, expected_grads = _loop_reference(params, ids, x, y)
  _assert_close(predictions, _predict(params, x))
  _assert_close(losses, expected_losses, tol=1e-5)
  _assert_close(grads, expected_grads, tol=1e-5)


def test_gradvac_treats_a_task_absent_from_the_batch_as_absent():
  # Step 1 sees all three tasks, so every pair gets a non-zero target. In step
  # 2 task 1 is absent: with a fixed visiting order, tasks 0 and 2 must be
  # updated as if they were alone, and task 1's targets must stay as they were.
  params = _params()
  value_and_grad = jax.jit(ogv.segment_value_and_grad(_example_losses, NUM_TASKS))
  tx = ogv.gradvac(NUM_TASKS, beta=0.5, shuffle=False)
  update = jax.jit(tx.update)
  _, grads = value_and_grad(params, *_mixed_batch([0, 1, 2, 0, 1, 2, 2, 1]))
  _, state = update(grads, tx.init(params), params)
  _, grads = value_and_grad(params, *_mixed_batch([2, 2, 0, 2, 0, 0, 0, 2]))
  updates, new_state = update(grads, state, params)

  present = jnp.array([0, 2])
  pair_tx = ogv.gradvac(2, beta=0.5, shuffle=False)
  pair_state = pair_tx.init(params)._replace(targets=state.targets[:, present][:, :, present])
  expected_updates, expected_state = jax.jit(pair_tx.update)(
    jax.tree.map(lambda leaf: leaf[present], grads), pair_state, params
  )
  assert np.all(np.asarray(state.targets[:, 0, 1]) != 0)
  _assert_close(updates, expected_updates, tol=1e-5)
  _assert_close(new_state.targets[:, present][:, :, present], expected_state.targets)
  np.testing.assert_array_equal(new_state.targets[:, 1], state.targets[:, 1])
  np.testing.assert_array_equal(new_state.targets[:, :, 1], state.targets[:, :, 1])
