"""The low-memory path on 8 host CPU devices: its values, and its compiled memory.

Run by ``test_sharding_low_memory.py`` in a subprocess, because the device count
must be set before JAX starts. For every layout of ``benchmarks/sharding.py``
(fsdp, tensor, task, data) under Auto and Explicit axes it prints one JSON
object per line:

- ``"check": "values"``: two ``gradvac`` steps of a small sharded MLP, each
  update and state computed three ways from the same parameters and state: the
  low-memory path on the mesh (``tx.update(None, ..., task_grads_fn=fn)``), the
  stacked path on the mesh (``tx.update(fn(params)[1], ...)``) and the stacked
  path on one device. It reports the largest error of the low-memory results
  relative to the largest magnitude of each leaf, against either reference.
- ``"check": "memory"``: the low-memory and the plain steps (with Adam) of
  ``benchmarks/sharding.py``, compiled only: temporary bytes per device, the
  largest result of each collective (elements), the largest parameter and the
  parameter count.
"""

import functools
import json
import os
import pathlib
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharding
from jax.sharding import AxisType, NamedSharding

import optax_gradvac as ogv

NUM_TASKS, NUM_LAYERS, WIDTH, BATCH = 8, 4, 256, 32  # the memory check's steps
VALUE_LAYERS, VALUE_WIDTH, VALUE_BATCH, VALUE_STEPS = 3, 16, 16, 2  # the value check's model


def _problem(seed: int = 0) -> tuple[dict, jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  params = {
    f"dense_{index}": {
      "kernel": rng.normal(size=(VALUE_WIDTH, VALUE_WIDTH)) / np.sqrt(VALUE_WIDTH),
      "bias": rng.normal(size=VALUE_WIDTH) / 4,
    }
    for index in range(VALUE_LAYERS)
  }
  params = jax.tree.map(lambda leaf: jnp.asarray(leaf, jnp.float32), params)
  x = jnp.asarray(rng.normal(size=(NUM_TASKS, VALUE_BATCH, VALUE_WIDTH)), jnp.float32)
  # Different targets per task, so that the task gradients conflict.
  y = jnp.asarray(rng.normal(size=(NUM_TASKS, VALUE_BATCH, VALUE_WIDTH)), jnp.float32)
  return params, x, y


def _steps(loss) -> tuple:
  """The jitted low-memory and stacked ``gradvac`` updates of ``loss``."""
  tx = ogv.gradvac(NUM_TASKS, 0.5, granularity="layer")
  per_task = ogv.task_value_and_grad(loss)

  @jax.jit
  def low(params, state, x, y):
    return tx.update(None, state, params, task_grads_fn=lambda p: per_task(p, x, y))

  @jax.jit
  def stacked(params, state, x, y):
    return tx.update(per_task(params, x, y)[1], state, params)

  return tx, low, stacked


def _relative_error(got, expected) -> float:
  """The largest ``|got - expected|``, over each leaf's largest ``|expected|``."""
  worst = 0.0
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float32).tiny)
    worst = max(worst, float(np.max(np.abs(a - e))) / scale)
  return worst


def _trajectory(step, tx, params, x, y) -> list:
  """``(updates, state)`` of ``VALUE_STEPS`` steps of ``step`` (SGD between them)."""
  state, history = tx.init(params), []
  for _ in range(VALUE_STEPS):
    updates, state = step(params, state, x, y)
    history.append(jax.device_get(optax.tree.unwrap_random_key_data((updates, state))))
    params = jax.tree.map(lambda p, u: p - 0.5 * u, params, updates)
  return history


@functools.cache
def _one_device_trajectory(layout: str) -> list:
  """The stacked path on one device, no mesh: the reference of both axis types."""
  params, x, y = _problem()
  specs = sharding.param_specs(layout, VALUE_LAYERS)
  tx, _, stacked = _steps(sharding.make_loss("data", specs, explicit=False))
  return _trajectory(stacked, tx, params, x, y)


def check_values(layout: str, axis_type: AxisType) -> dict:
  params, x, y = _problem()
  specs = sharding.param_specs(layout, VALUE_LAYERS)
  reference = _one_device_trajectory(layout)

  mesh = jax.make_mesh((8,), (sharding.AXIS,), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    placed = jax.tree.map(
      lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)), params, specs
    )
    batch = NamedSharding(mesh, sharding.batch_spec(layout))
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    loss = sharding.make_loss(layout, specs, axis_type == AxisType.Explicit)
    tx, low, stacked = _steps(loss)
    low_history = _trajectory(low, tx, placed, xs, ys)
    stacked_history = _trajectory(stacked, tx, placed, xs, ys)
  return {
    "against_stacked": _relative_error(low_history, stacked_history),
    "against_one_device": _relative_error(low_history, reference),
    # The case is the one it claims: GradVac corrected some task pair.
    "corrected": int(np.sum(np.asarray(low_history[-1][1].corrected))),
  }


def check_memory(layout: str, axis_type: AxisType) -> dict:
  steps = sharding.compile_both(
    layout,
    axis_type,
    num_tasks=NUM_TASKS,
    num_layers=NUM_LAYERS,
    width=WIDTH,
    batch=BATCH,
    kinds=("low", "plain"),
  )
  return {
    **steps,
    "num_tasks": NUM_TASKS,
    "devices": jax.device_count(),
    "num_params": NUM_LAYERS * (WIDTH * WIDTH + WIDTH),
    "largest_param": WIDTH * WIDTH,
  }


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  checks = sys.argv[1:] or ["values", "memory"]
  for check in checks:
    for layout in sharding.LAYOUTS:
      for axis_type in (AxisType.Auto, AxisType.Explicit):
        run = check_values if check == "values" else check_memory
        report = {"check": check, "layout": layout, "mode": axis_type.name}
        report.update(run(layout, axis_type))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
