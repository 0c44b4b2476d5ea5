"""Sharded training steps against a single-device run, on 8 host CPU devices.

Run by ``test_sharding.py`` in a subprocess, because the device count must be
set before JAX starts. Prints one JSON object per configuration: the largest
difference from the unsharded result over parameters and optimizer state,
whether every correction decision matched, and the sharding of the per-task
gradients (data and task layouts) or of the updates (model layout).
"""

import json
import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradvac as ogv

NUM_TASKS, BATCH, FEATURES, HIDDEN, STEPS = 8, 16, 6, 16, 3


def _params() -> dict:
  key_trunk, key_heads = jax.random.split(jax.random.key(0))
  return {
    "trunk": {
      "kernel": jax.random.normal(key_trunk, (FEATURES, HIDDEN)) / 3,
      "bias": jnp.zeros(HIDDEN),
    },
    "heads": {
      "kernel": jax.random.normal(key_heads, (HIDDEN, NUM_TASKS)) / 4,
      "bias": jnp.zeros(NUM_TASKS),
    },
  }


def _task_loss(params, x, y, task):
  hidden = jnp.tanh(x @ params["trunk"]["kernel"] + params["trunk"]["bias"])
  outputs = hidden @ params["heads"]["kernel"] + params["heads"]["bias"]
  return jnp.mean((outputs[:, task] - y) ** 2)


def _tx() -> optax.GradientTransformation:
  return optax.chain(ogv.gradvac(NUM_TASKS, beta=0.1), optax.adam(1e-2))


gradient_specs = []  # filled at trace time: the sharding of the per-task gradients


@jax.jit
def train(params, x, y, tasks):
  """``STEPS`` GradVac + Adam steps from a fresh optimizer state."""
  tx = _tx()
  per_task = ogv.task_value_and_grad(_task_loss)

  def step(_, carry):
    params, opt_state = carry
    _, task_grads = per_task(params, x, y, tasks)
    # jax 0.7 prints PartitionSpec(...), newer releases P(...): the same spec.
    spec = str(jax.typeof(task_grads["trunk"]["kernel"]).sharding.spec)
    gradient_specs.append(spec.replace("PartitionSpec(", "P("))
    updates, opt_state = tx.update(task_grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return jax.lax.fori_loop(0, STEPS, step, (params, tx.init(params)))


@jax.jit
def update_only(task_grads, params):
  """One GradVac + Adam update of given per-task gradients."""
  tx = _tx()
  return tx.update(task_grads, tx.init(params), params)


def _host(tree):
  return jax.device_get(optax.tree.unwrap_random_key_data(tree))


def _compare(actual, expected) -> dict:
  max_error, same_decisions = 0.0, True
  for a, e in zip(jax.tree.leaves(_host(actual)), jax.tree.leaves(_host(expected)), strict=True):
    a, e = np.asarray(a), np.asarray(e)
    if a.dtype == bool:
      same_decisions &= bool(np.array_equal(a, e))
    else:
      max_error = max(max_error, float(np.max(np.abs(a.astype(np.float64) - e))))
  return {"max_error": max_error, "same_decisions": same_decisions}


def _place(tree, mesh, spec):
  return jax.device_put(tree, NamedSharding(mesh, spec))


def _model_parallel(tree, mesh, *leading):
  """Places every leaf with its last axis on "model" and its first on ``leading``."""

  def spec(leaf):
    return P(*leading, *([None] * (leaf.ndim - len(leading) - 1)), "model")

  return jax.tree.map(lambda leaf: _place(leaf, mesh, spec(leaf)), tree)


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  key_x, key_y, key_g = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(key_x, (NUM_TASKS, BATCH, FEATURES))
  y = jax.random.normal(key_y, (NUM_TASKS, BATCH))
  tasks = jnp.arange(NUM_TASKS)
  params = _params()
  expected_training = train(params, x, y, tasks)
  task_grads = jax.tree.map(lambda p: jax.random.normal(key_g, (NUM_TASKS, *p.shape)), params)
  expected_update = update_only(task_grads, params)

  for axis_type in (AxisType.Auto, AxisType.Explicit):
    # Data parallel: every task's batch split over 8 devices.
    # Task parallel: one task per device.
    for layout, axis, batch_spec in (
      ("data", "data", P(None, "data")),
      ("task", "task", P("task")),
    ):
      mesh = jax.make_mesh((8,), (axis,), axis_types=(axis_type,))
      with jax.set_mesh(mesh):
        gradient_specs.clear()
        result = train(
          _place(params, mesh, P()),
          _place(x, mesh, batch_spec),
          _place(y, mesh, batch_spec),
          _place(tasks, mesh, P(batch_spec[0])),
        )
      report = _compare(result, expected_training)
      report.update(mode=axis_type.name, layout=layout, spec=gradient_specs[-1])
      print(json.dumps(report), flush=True)

    # Model parallel: parameters and their per-task gradients split over a
    # "model" axis (and the tasks over a "task" axis), given to the update.
    mesh = jax.make_mesh((2, 4), ("task", "model"), axis_types=(axis_type,) * 2)
    with jax.set_mesh(mesh):
      result = update_only(_model_parallel(task_grads, mesh, "task"), _model_parallel(params, mesh))
      update_specs = [str(jax.typeof(u).sharding.spec) for u in jax.tree.leaves(result[0])]
    report = _compare(result, expected_update)
    report.update(mode=axis_type.name, layout="model", spec=update_specs)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
