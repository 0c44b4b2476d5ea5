"""The Gram-based methods with the optax and Flax ecosystem: accumulation, partitions,
logging, checkpoints, linen and nnx (GradVac's are in test_ecosystem.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from flax.training import train_state

import optax_gradvac as ogv

NUM_TASKS, BATCH, FEATURES, HIDDEN = 3, 16, 4, 8
# One method per kind of state (the ecosystem sees the methods through their state
# only; each method's own weights are tested against its reference elsewhere): the
# weights (GramState), a warm start (NashMTLState) and a typed PRNG key (RLWState).
METHODS = {
  "mgda": ogv.mgda,
  "nash_mtl": ogv.nash_mtl,
  "rlw": ogv.rlw,
}
parametrize_methods = pytest.mark.parametrize("make", METHODS.values(), ids=METHODS)


def _params() -> dict:
  key_trunk, key_heads = jax.random.split(jax.random.key(0))
  return {
    "trunk": {
      "kernel": jax.random.normal(key_trunk, (FEATURES, HIDDEN)) / 2,
      "bias": jnp.zeros(HIDDEN),
    },
    "heads": {"kernel": jax.random.normal(key_heads, (HIDDEN, NUM_TASKS)) / 2},
  }


def _random_task_grads(key, params):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(
    treedef,
    [jax.random.normal(k, (NUM_TASKS, *leaf.shape)) for k, leaf in zip(keys, leaves, strict=True)],
  )


def _head_label(params):
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "heads" if "heads" in jax.tree_util.keystr(path) else "shared", params
  )


def _assert_close(actual, expected, tol=1e-5):
  assert jax.tree.structure(actual) == jax.tree.structure(expected)
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
    if jnp.issubdtype(e.dtype, jax.dtypes.prng_key):  # RLW's key: compare its bits
      assert a.dtype == e.dtype
      a, e = jax.random.key_data(a), jax.random.key_data(e)
    np.testing.assert_allclose(a, e, rtol=tol, atol=tol)


@parametrize_methods
def test_multi_steps_equals_one_step_on_averaged_gradients(make):
  every_k = 3
  params = _params()
  micro_grads = [_random_task_grads(k, params) for k in jax.random.split(jax.random.key(2), 6)]
  tx = optax.chain(make(NUM_TASKS), optax.adam(1e-2))
  accumulated = ogv.multi_steps(tx, every_k, num_tasks=NUM_TASKS)
  state, update = accumulated.init(params), jax.jit(accumulated.update)
  emitted = []
  for micro_step, grads in enumerate(micro_grads):
    updates, state = update(grads, state, params)
    if micro_step % every_k == every_k - 1:
      emitted.append(updates)
  expected_state = tx.init(params)
  for step, updates in enumerate(emitted):
    chunk = micro_grads[step * every_k : (step + 1) * every_k]
    mean_grads = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *chunk)
    expected, expected_state = jax.jit(tx.update)(mean_grads, expected_state, params)
    _assert_close(updates, expected)
  _assert_close(state.inner_opt_state[0].weights, expected_state[0].weights)


@parametrize_methods
def test_partition_on_the_trunk_and_the_sum_on_the_heads(make):
  params = _params()
  grads = _random_task_grads(jax.random.key(3), params)
  tx = optax.partition({"shared": make(NUM_TASKS), "heads": ogv.sum_tasks(NUM_TASKS)}, _head_label)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  np.testing.assert_allclose(
    updates["heads"]["kernel"], np.sum(grads["heads"]["kernel"], axis=0), rtol=1e-6
  )
  alone = make(NUM_TASKS)
  trunk = {"trunk": params["trunk"]}
  expected, _ = jax.jit(alone.update)({"trunk": grads["trunk"]}, alone.init(trunk), trunk)
  _assert_close(updates["trunk"], expected["trunk"])
  summary = ogv.similarity_summary(state, trunk, "model")
  assert tuple(summary["weights"]) == ("model",)
  assert summary["weights"]["model"].shape == (NUM_TASKS,)


@parametrize_methods
def test_similarity_summary_logs_each_groups_weights(make):
  params = _params()
  grads = _random_task_grads(jax.random.key(4), params)
  tx = optax.named_chain(("method", make(NUM_TASKS, granularity="layer")), ("sgd", optax.sgd(1.0)))
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  summary = jax.jit(lambda state: ogv.similarity_summary(state, params))(state)
  assert tuple(summary["weights"]) == ("heads", "trunk")  # sorted keys
  trunk = np.concatenate(
    [np.asarray(grads["trunk"][k]).reshape(NUM_TASKS, -1) for k in ("bias", "kernel")], 1
  )
  expected = -np.asarray(summary["weights"]["trunk"]) @ trunk  # sgd(1.0) negates
  actual = np.concatenate([np.asarray(updates["trunk"][k]).ravel() for k in ("bias", "kernel")])
  np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)
  assert "targets" not in summary and int(summary["count"]) == 1


@parametrize_methods
@pytest.mark.parametrize("round_trip", ["orbax", "msgpack"])
def test_checkpoint_round_trip_resumes_identically(make, round_trip, tmp_path):
  params = _params()
  tx = optax.chain(make(NUM_TASKS, granularity="layer"), optax.adam(1e-2))
  update = jax.jit(tx.update)
  state = tx.init(params)
  for key in jax.random.split(jax.random.key(5), 2):
    _, state = update(_random_task_grads(key, params), state, params)
  target = jax.eval_shape(tx.init, params)
  if round_trip == "orbax":
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp_path / "state", state)
      checkpointer.wait_until_finished()
      restored = checkpointer.restore(tmp_path / "state", target)
  else:
    restored = ogv.from_bytes(target, ogv.to_bytes(state))
  _assert_close(restored, state, tol=0)
  grads = _random_task_grads(jax.random.key(6), params)
  _assert_close(update(grads, restored, params), update(grads, state, params), tol=0)


def _task_data():
  """Three regression tasks on shared features; task 2 pulls against task 0."""
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (NUM_TASKS, 32, FEATURES))
  directions = jax.random.normal(key_w, (NUM_TASKS, FEATURES))
  directions = directions.at[2].set(-directions[0] + 0.5 * directions[2])
  return x, jnp.sin(jnp.einsum("tbf,tf->tb", x, directions)), jnp.arange(NUM_TASKS)


class _Linen(nn.Module):
  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(HIDDEN, name="trunk")(x))
    return nn.Dense(NUM_TASKS, name="heads")(hidden)


@parametrize_methods
def test_linen_train_state_every_task_improves(make):
  x, y, tasks = _task_data()
  model = _Linen()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(1), x[0])["params"],
    tx=optax.chain(make(NUM_TASKS, granularity="layer"), optax.adam(1e-2)),
  )

  def task_loss(params, x, y, task):
    return jnp.mean((model.apply({"params": params}, x)[:, task] - y) ** 2)

  per_task = jax.jit(ogv.task_value_and_grad(task_loss))

  @jax.jit
  def step(state):
    _, task_grads = ogv.task_value_and_grad(task_loss)(state.params, x, y, tasks)
    return state.apply_gradients(grads=task_grads)

  initial, _ = per_task(state.params, x, y, tasks)
  for _ in range(40):
    state = step(state)
  final, _ = per_task(state.params, x, y, tasks)
  assert np.all(np.asarray(final) < np.asarray(initial))


class _Nnx(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.trunk = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.heads = nnx.Linear(HIDDEN, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    return self.heads(nnx.tanh(self.trunk(x)))


@parametrize_methods
def test_nnx_optimizer_every_task_improves(make):
  x, y, tasks = _task_data()
  model = _Nnx(nnx.Rngs(0))
  tx = optax.chain(make(NUM_TASKS, granularity="layer"), optax.adam(1e-2))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  def per_task(model, x, y, tasks):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def task_loss(params, x, y, task):
      return jnp.mean((nnx.merge(graphdef, params, rest)(x)[:, task] - y) ** 2)

    return ogv.task_value_and_grad(task_loss)(params, x, y, tasks)

  @nnx.jit
  def step(model, optimizer):
    _, task_grads = per_task(model, x, y, tasks)
    optimizer.update(model, task_grads)

  initial, _ = nnx.jit(per_task)(model, x, y, tasks)
  for _ in range(40):
    step(model, optimizer)
  final, _ = nnx.jit(per_task)(model, x, y, tasks)
  assert np.all(np.asarray(final) < np.asarray(initial))
  summary = ogv.similarity_summary(optimizer.opt_state, nnx.state(model, nnx.Param))
  assert tuple(summary["weights"]) == ("heads", "trunk")
