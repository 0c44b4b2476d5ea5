"""Training multi-task Flax models (linen and nnx) with gradvac in the optimizer chain."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state

import optax_gradvac as ogv

NUM_TASKS, BATCH, FEATURES, HIDDEN, STEPS = 3, 32, 4, 16, 60


def _task_data():
  """Three regression tasks on shared features; task 2 pulls against task 0."""
  key_x, key_w = jax.random.split(jax.random.key(0))
  x = jax.random.normal(key_x, (NUM_TASKS, BATCH, FEATURES))
  directions = jax.random.normal(key_w, (NUM_TASKS, FEATURES))
  directions = directions.at[2].set(-directions[0] + 0.5 * directions[2])
  y = jnp.sin(jnp.einsum("tbf,tf->tb", x, directions))
  return x, y, jnp.arange(NUM_TASKS)


def _head_label(params):
  # Labels from paths, not shapes: optax.partition calls this on the
  # parameters at init and on the stacked per-task gradients at update.
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "heads" if "heads" in jax.tree_util.keystr(path) else "shared", params
  )


def _optimizer(kind: str) -> optax.GradientTransformation:
  if kind == "gradvac":
    surgery = ogv.gradvac(NUM_TASKS, beta=0.1)
  else:  # GradVac on the shared trunk, a plain sum on the task-specific heads.
    surgery = optax.partition(
      {"shared": ogv.gradvac(NUM_TASKS, beta=0.1), "heads": ogv.sum_tasks(NUM_TASKS)}, _head_label
    )
  return optax.chain(surgery, optax.adam(1e-2))


class LinenMultiTask(nn.Module):
  """A shared trunk and one output (head) per task."""

  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(HIDDEN, name="trunk_0")(x))
    hidden = nn.tanh(nn.Dense(HIDDEN, name="trunk_1")(hidden))
    return nn.Dense(NUM_TASKS, name="heads")(hidden)


@pytest.mark.parametrize("kind", ["gradvac", "partition"])
def test_linen_train_state_every_task_improves(kind):
  x, y, tasks = _task_data()
  model = LinenMultiTask()
  state = train_state.TrainState.create(
    apply_fn=model.apply,
    params=model.init(jax.random.key(1), x[0])["params"],
    tx=_optimizer(kind),
  )

  def task_loss(params, x, y, task):
    return jnp.mean((model.apply({"params": params}, x)[:, task] - y) ** 2)

  per_task = jax.jit(ogv.task_value_and_grad(task_loss))

  @jax.jit
  def train_step(state, x, y, tasks):
    losses, task_grads = per_task(state.params, x, y, tasks)
    return state.apply_gradients(grads=task_grads), losses

  initial_losses, _ = per_task(state.params, x, y, tasks)
  for _ in range(STEPS):
    state, _ = train_step(state, x, y, tasks)
  final_losses, _ = per_task(state.params, x, y, tasks)
  assert np.all(np.asarray(final_losses) < 0.5 * np.asarray(initial_losses))

  # Under optax.partition, gradvac saw only the shared parameters.
  seen = ("trunk_0", "trunk_1", "heads") if kind == "gradvac" else ("trunk_0", "trunk_1")
  summary = ogv.similarity_summary(state.opt_state, {name: state.params[name] for name in seen})
  assert int(summary["count"]) == STEPS
  assert float(jnp.abs(summary["targets"]["trunk_0"]).max()) > 0


class NnxMultiTask(nnx.Module):
  """A shared trunk and one output (head) per task."""

  def __init__(self, rngs: nnx.Rngs):
    self.trunk_0 = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.trunk_1 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
    self.heads = nnx.Linear(HIDDEN, NUM_TASKS, rngs=rngs)

  def __call__(self, x):
    hidden = jnp.tanh(self.trunk_1(jnp.tanh(self.trunk_0(x))))
    return self.heads(hidden)


def _nnx_task_loss(model, x, y, task):
  return jnp.mean((model(x)[:, task] - y) ** 2)


# Per-task gradients in nnx: the model is shared (in_axes None), the batches
# and task ids carry the task axis.
_nnx_per_task = nnx.vmap(nnx.value_and_grad(_nnx_task_loss), in_axes=(None, 0, 0, 0))


def test_nnx_per_task_gradients_equal_a_loop_of_grads():
  x, y, tasks = _task_data()
  model = NnxMultiTask(nnx.Rngs(0))
  losses, grads = nnx.jit(_nnx_per_task)(model, x, y, tasks)
  for task in range(NUM_TASKS):
    loss, grad = nnx.value_and_grad(_nnx_task_loss)(model, x[task], y[task], task)
    np.testing.assert_allclose(losses[task], loss, rtol=1e-6)
    for stacked, single in zip(jax.tree.leaves(grads), jax.tree.leaves(grad), strict=True):
      np.testing.assert_allclose(stacked[task], single, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gradvac", "partition"])
def test_nnx_optimizer_every_task_improves(kind):
  x, y, tasks = _task_data()
  model = NnxMultiTask(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, _optimizer(kind), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, y, tasks):
    losses, task_grads = _nnx_per_task(model, x, y, tasks)
    optimizer.update(model, task_grads)
    return losses

  initial_losses, task_grads = nnx.jit(_nnx_per_task)(model, x, y, tasks)
  for _ in range(STEPS):
    train_step(model, optimizer, x, y, tasks)
  final_losses, _ = nnx.jit(_nnx_per_task)(model, x, y, tasks)
  assert np.all(np.asarray(final_losses) < 0.5 * np.asarray(initial_losses))

  if kind == "gradvac":
    # init sees nnx.Param leaves, update their gradients: the same layer groups.
    expected = ("heads", "trunk_0", "trunk_1")
    assert ogv.group_names(nnx.state(model, nnx.Param)) == expected
    assert ogv.group_names(task_grads) == expected
    summary = ogv.similarity_summary(optimizer.opt_state, nnx.state(model, nnx.Param))
    assert tuple(summary["targets"]) == expected
    assert summary["targets"]["trunk_0"].shape == (NUM_TASKS, NUM_TASKS)
    assert int(summary["count"]) == STEPS
