"""gradvac with the rest of the optax ecosystem: accumulation, apply_if_finite,
checkpointing, serialization, partitioned parameters and logging."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import optax_gradvac as ogv

NUM_TASKS, BATCH, FEATURES, HIDDEN = 3, 8, 4, 6


def _params() -> dict:
  key_trunk, key_heads = jax.random.split(jax.random.key(0))
  return {
    "trunk": {
      "kernel": jax.random.normal(key_trunk, (FEATURES, HIDDEN)) / 2,
      "bias": jnp.zeros(HIDDEN),
    },
    "heads": {"kernel": jax.random.normal(key_heads, (HIDDEN, NUM_TASKS)) / 2},
  }


def _task_loss(params, x, y, task):
  hidden = jnp.tanh(x @ params["trunk"]["kernel"] + params["trunk"]["bias"])
  return jnp.mean((hidden @ params["heads"]["kernel"][:, task] - y) ** 2)


def _data():
  key_x, key_y = jax.random.split(jax.random.key(1))
  x = jax.random.normal(key_x, (NUM_TASKS, BATCH, FEATURES))
  y = jax.random.normal(key_y, (NUM_TASKS, BATCH))
  return x, y, jnp.arange(NUM_TASKS)


def _random_task_grads(key, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [jax.random.normal(k, (NUM_TASKS, *leaf.shape)) for k, leaf in zip(keys, leaves, strict=True)],
  )


def _tx() -> optax.GradientTransformation:
  return optax.chain(ogv.gradvac(NUM_TASKS, beta=0.2, key=7), optax.adam(1e-2))


def _train_step(tx):
  per_task = ogv.task_value_and_grad(_task_loss)

  @jax.jit
  def step(params, opt_state, x, y, tasks):
    _, task_grads = per_task(params, x, y, tasks)
    updates, opt_state = tx.update(task_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return step


def _assert_equal(actual, expected):
  actual, expected = optax.tree.unwrap_random_key_data((actual, expected))
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_array_equal(a, e)


def _assert_close(actual, expected, tol=1e-6):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


# Gradient accumulation.


def test_multi_steps_equals_one_step_on_averaged_gradients():
  every_k, num_steps = 3, 2
  params = _params()
  micro_grads = [
    _random_task_grads(key, params) for key in jax.random.split(jax.random.key(2), every_k * 2)
  ]

  accumulated = ogv.multi_steps(_tx(), every_k, num_tasks=NUM_TASKS)
  state = jax.jit(accumulated.init)(params)
  update = jax.jit(accumulated.update)
  emitted = []
  for micro_step, grads in enumerate(micro_grads):
    updates, state = update(grads, state, params)
    if micro_step % every_k == every_k - 1:
      emitted.append(updates)
    else:
      assert all(np.all(np.asarray(leaf) == 0) for leaf in jax.tree.leaves(updates))

  tx = _tx()
  expected_state = tx.init(params)
  for step in range(num_steps):
    chunk = micro_grads[step * every_k : (step + 1) * every_k]
    mean_grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *chunk)
    expected_updates, expected_state = jax.jit(tx.update)(mean_grads, expected_state, params)
    _assert_close(emitted[step], expected_updates)
  _assert_close(state.inner_opt_state[0].targets, expected_state[0].targets)
  assert int(state.inner_opt_state[0].count) == num_steps


# apply_if_finite.


def test_apply_if_finite_after_gradvac_skips_a_nan_step():
  params = _params()
  grads_1, grads_2 = (_random_task_grads(k, params) for k in jax.random.split(jax.random.key(3)))
  nan_grads = jax.tree.map(lambda g: g.at[1, 0].set(jnp.nan), grads_1)
  tx = optax.chain(ogv.gradvac(NUM_TASKS, beta=0.2), optax.apply_if_finite(optax.adam(1e-2), 3))
  update = jax.jit(tx.update)

  def apply(params, state, grads):
    updates, state = update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params_1, state_1 = apply(params, tx.init(params), grads_1)
  params_nan, state_nan = apply(params_1, state_1, nan_grads)
  _assert_equal(params_nan, params_1)
  _assert_equal(state_nan[0], state_1[0])  # the GradVac state, targets included
  assert np.all(np.isfinite(np.asarray(state_nan[0].targets)))
  assert int(state_nan[1].notfinite_count) == 1

  # The skipped step leaves no trace: the run continues as if it never happened.
  params_after, _ = apply(params_nan, state_nan, grads_2)
  expected, _ = apply(params_1, state_1, grads_2)
  _assert_equal(params_after, expected)


# Checkpointing and serialization.


def _orbax_round_trip(tree, target, directory):
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(directory / "step_3", tree)
  checkpointer.wait_until_finished()
  restored = checkpointer.restore(directory / "step_3", target)
  checkpointer.close()
  return restored


def _msgpack_round_trip(tree, target, directory):
  (directory / "state.msgpack").write_bytes(ogv.to_bytes(tree))
  return ogv.from_bytes(target, (directory / "state.msgpack").read_bytes())


@pytest.mark.parametrize(
  "round_trip", [_orbax_round_trip, _msgpack_round_trip], ids=["orbax", "msgpack"]
)
def test_checkpoint_resumes_bit_identically(round_trip, tmp_path):
  x, y, tasks = _data()
  tx = _tx()
  step = _train_step(tx)
  params, opt_state = _params(), tx.init(_params())
  trajectory = []
  for _ in range(6):
    params, opt_state = step(params, opt_state, x, y, tasks)
    trajectory.append((params, opt_state))

  # A fresh setup: new transformation and step function, abstract target.
  saved = {"params": trajectory[2][0], "opt_state": trajectory[2][1]}
  fresh_tx = _tx()
  target = jax.eval_shape(lambda: {"params": _params(), "opt_state": fresh_tx.init(_params())})
  restored = round_trip(saved, target, tmp_path)
  _assert_equal(restored, saved)

  fresh_step = _train_step(fresh_tx)
  params, opt_state = restored["params"], restored["opt_state"]
  for expected in trajectory[3:]:
    params, opt_state = fresh_step(params, opt_state, x, y, tasks)
    _assert_equal((params, opt_state), expected)


# Task-specific parameters: optax.partition.


def _head_label(params):
  # Labels from paths, not shapes: partition calls this on the parameters at
  # init and on the stacked per-task gradients at update.
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "heads" if path[0].key == "heads" else "shared", params
  )


def _pcgrad_two_tasks(g_0: np.ndarray, g_1: np.ndarray) -> np.ndarray:
  """PCGrad's sum for two flat gradients, by its definition."""
  dot = g_0 @ g_1
  if dot >= 0:
    return g_0 + g_1
  return (g_0 - dot / (g_1 @ g_1) * g_1) + (g_1 - dot / (g_0 @ g_0) * g_0)


def test_partition_gradvac_on_trunk_sum_on_heads():
  # Two tasks: GradVac's first step (targets 0) is PCGrad per layer, which has
  # a closed form; the heads get the plain sum.
  params = {
    "trunk": {
      "dense_0": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)},
      "dense_1": {"kernel": jnp.zeros(3)},
    },
    "heads": {"kernel": jnp.zeros((3, 2))},
  }
  task_grads = _random_task_grads(jax.random.key(4), params)
  task_grads = jax.tree.map(lambda g: g[:2], task_grads)
  task_grads["trunk"]["dense_1"]["kernel"] = jnp.array([[1.0, 0.5, 0.0], [-1.0, 0.0, 1.0]])
  tx = optax.partition({"shared": ogv.gradvac(2, beta=0.2), "heads": ogv.sum_tasks(2)}, _head_label)
  updates, state = jax.jit(tx.update)(task_grads, jax.jit(tx.init)(params), params)

  np.testing.assert_allclose(
    updates["heads"]["kernel"], np.sum(task_grads["heads"]["kernel"], axis=0), rtol=1e-6
  )
  layer_0 = task_grads["trunk"]["dense_0"]
  flat = np.concatenate(
    [np.asarray(layer_0["bias"]), np.asarray(layer_0["kernel"]).reshape(2, -1)], 1
  )
  expected = _pcgrad_two_tasks(flat[0], flat[1])
  np.testing.assert_allclose(
    updates["trunk"]["dense_0"]["bias"], expected[:2], rtol=1e-5, atol=1e-6
  )
  np.testing.assert_allclose(
    updates["trunk"]["dense_0"]["kernel"].reshape(-1), expected[2:], rtol=1e-5, atol=1e-6
  )
  layer_1 = np.asarray(task_grads["trunk"]["dense_1"]["kernel"])
  np.testing.assert_allclose(
    updates["trunk"]["dense_1"]["kernel"], _pcgrad_two_tasks(*layer_1), rtol=1e-5, atol=1e-6
  )

  # The state holds GradVac's groups for the trunk only.
  summary = ogv.similarity_summary(state, {"trunk": params["trunk"]})
  assert tuple(summary["targets"]) == ("trunk/dense_0", "trunk/dense_1")
  assert float(summary["corrected_fraction"]) >= 0.5  # dense_1's two tasks conflict


# Logging.


_LOGGING_PARAMS = {"a": {"w": jnp.zeros(4)}, "b": {"w": jnp.zeros(3)}}
# Group "a": all three tasks agree (positive cosines, nothing to correct).
# Group "b": tasks 0 and 1 conflict; task 2 is absent (zero gradient).
_LOGGING_GRADS = {
  "a": {"w": jnp.array([[1.0, 0.2, 0.0, 0.0], [0.8, 0.0, 0.5, 0.0], [0.5, 0.5, 0.5, 0.5]])},
  "b": {"w": jnp.array([[1.0, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])},
}


def _cosines(g: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(g, axis=1)
  safe = np.where(norms > 0, norms, 1)
  return np.where(np.outer(norms, norms) > 0, (g @ g.T) / np.outer(safe, safe), 0)


def _gradvac(**kwargs):
  return ogv.gradvac(NUM_TASKS, beta=0.5, **kwargs)


_WRAPPINGS = {
  "chain": lambda: optax.chain(_gradvac(), optax.adam(1e-3)),
  "named_chain": lambda: optax.named_chain(("gradvac", _gradvac()), ("adam", optax.adam(1e-3))),
  "inject_hyperparams": lambda: optax.chain(
    optax.inject_hyperparams(ogv.gradvac, static_args=("num_tasks",))(NUM_TASKS, beta=0.5),
    optax.sgd(1e-3),
  ),
  "multi_steps": lambda: ogv.multi_steps(
    optax.chain(_gradvac(), optax.sgd(1e-3)), 1, num_tasks=NUM_TASKS
  ),
}


@pytest.mark.parametrize("wrapping", list(_WRAPPINGS))
def test_similarity_summary_values(wrapping):
  tx = _WRAPPINGS[wrapping]()
  params = _LOGGING_PARAMS
  _, state = jax.jit(tx.update)(_LOGGING_GRADS, tx.init(params), params)
  summary = jax.jit(
    lambda state: ogv.similarity_summary(state, params, task_names=["en", "fr", "de"])
  )(state)

  cosine_a = _cosines(np.asarray(_LOGGING_GRADS["a"]["w"]))
  cosine_b = _cosines(np.asarray(_LOGGING_GRADS["b"]["w"]))
  _assert_close(summary["cosine"], {"a": cosine_a, "b": cosine_b})
  # First step: the targets are beta times the cosines of the present pairs.
  off_diagonal = ~np.eye(NUM_TASKS, dtype=bool)
  expected_targets = {"a": 0.5 * cosine_a * off_diagonal, "b": 0.5 * cosine_b * off_diagonal}
  _assert_close(summary["targets"], expected_targets)
  _assert_close(
    summary["mean_target"], np.mean([t[off_diagonal] for t in expected_targets.values()])
  )
  # Present pairs: the 6 of group "a" and (0, 1), (1, 0) of group "b".
  present_cosines = [*cosine_a[off_diagonal], cosine_b[0, 1], cosine_b[1, 0]]
  _assert_close(summary["mean_cosine"], np.mean(present_cosines))
  _assert_close(summary["corrected_fraction"], 2 / 8)
  _assert_close(
    summary["group_mean_cosine"],
    {"a": np.mean(cosine_a[off_diagonal]), "b": cosine_b[0, 1]},
  )
  _assert_close(summary["group_corrected_fraction"], {"a": 0.0, "b": 1.0})
  _assert_close(
    summary["task_cosine"],
    {
      "en": np.mean([cosine_a[0, 1], cosine_a[0, 2], cosine_b[0, 1]]),
      "fr": np.mean([cosine_a[1, 0], cosine_a[1, 2], cosine_b[1, 0]]),
      "de": np.mean([cosine_a[2, 0], cosine_a[2, 1]]),
    },
  )
  assert int(summary["count"]) == 1


def test_similarity_summary_errors():
  params = _LOGGING_PARAMS
  with pytest.raises(ValueError, match="no GradVacState"):
    ogv.similarity_summary(optax.adam(1e-3).init(params), params)
  state = ogv.pcgrad(NUM_TASKS).init(params)  # granularity "model": one group
  with pytest.raises(ValueError, match="2 groups"):
    ogv.similarity_summary(state, params)
  assert tuple(ogv.similarity_summary(state, params, "model")["cosine"]) == ("model",)
