"""Per-task gradients reduce-scattered over the batch axis, on 8 host CPU devices.

Run by ``test_sharded_task_gradients.py`` in a subprocess, because the device
count must be set before JAX starts. For the ``data`` (parameters replicated)
and ``fsdp`` (parameters' last axis sharded) layouts of
``benchmarks/sharding.py``, both with every task's batch split over the mesh
axis, under Auto and Explicit axes, it prints one JSON object per line:

- ``"check": "values"``: ``ogv.task_value_and_grad(loss, batch_axis=AXIS)`` on
  the mesh against the plain ``jax.vmap(jax.value_and_grad(loss))`` on one
  device (losses, gradients, and with ``has_aux`` the shards' aux averaged),
  and two ``gradvac`` steps with ``optax.apply_updates`` between them, on the
  stacked and on the low-memory path, against the stacked path on one device:
  the largest error relative to each leaf's largest magnitude, and whether the
  updated parameters kept their sharding. The ``data`` reports add a mesh of two
  axes (batches split over ``data``, tensor-parallel parameters over ``model``),
  and an unjitted call on arrays placed off the mesh, the batch split over both.
- ``"check": "memory"``: the stacked, low-memory and plain steps (with Adam)
  of ``benchmarks/sharding.py``, the first two with ``batch_axis``, compiled
  only: temporary bytes per device, the number of reduce-scatters and the
  largest result of each collective (elements).

``python tests/sharded_task_gradients_check.py [values|memory|table]``; ``table``
prints the README's table (6 layers of 256 x 256, 64 examples per task).
"""

import json
import os
import pathlib
import re
import sys

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
import sharding
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradvac as ogv

NUM_TASKS, NUM_LAYERS, WIDTH, BATCH = 8, 4, 256, 32  # the memory check's steps
VALUE_LAYERS, VALUE_WIDTH, VALUE_BATCH, VALUE_STEPS = 3, 16, 16, 2  # the value check's model
LAYOUTS = ("data", "fsdp")
KINDS = ("stacked", "low", "plain")


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


def _relative_error(got, expected) -> float:
  """The largest ``|got - expected|``, over each leaf's largest ``|expected|``."""
  worst = 0.0
  for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
    assert a.shape == e.shape, (a.shape, e.shape)
    scale = max(float(np.max(np.abs(e))), np.finfo(np.float32).tiny)
    worst = max(worst, float(np.max(np.abs(a - e))) / scale)
  return worst


def _steps(loss, batch_axis) -> tuple:
  """The jitted stacked and low-memory ``gradvac`` steps, parameters updated by SGD."""
  tx = ogv.gradvac(NUM_TASKS, 0.5, granularity="layer")
  per_task = ogv.task_value_and_grad(loss, batch_axis=batch_axis)

  def finish(params, updates, state):
    new_params = optax.apply_updates(params, jax.tree.map(lambda u: -0.5 * u, updates))
    return new_params, updates, state

  @jax.jit
  def stacked(params, state, x, y):
    return finish(params, *tx.update(per_task(params, x, y)[1], state, params))

  @jax.jit
  def low(params, state, x, y):
    grads_fn = lambda p: per_task(p, x, y)  # noqa: E731
    return finish(params, *tx.update(None, state, params, task_grads_fn=grads_fn))

  return tx, stacked, low


def _spec(leaf) -> tuple:
  """The spec of ``leaf``'s sharding, padded to its rank (its type's under Explicit axes)."""
  spec = tuple(getattr(leaf.sharding, "spec", ()))
  return spec + (None,) * (leaf.ndim - len(spec))


def _trajectory(step, tx, params, x, y) -> tuple[list, bool]:
  """``(updates, state)`` of ``VALUE_STEPS`` steps, and whether params kept their sharding."""
  state, history, kept = tx.init(params), [], True
  for _ in range(VALUE_STEPS):
    new_params, updates, state = step(params, state, x, y)
    history.append(jax.device_get(optax.tree.unwrap_random_key_data((updates, state))))
    kept &= all(
      _spec(new) == _spec(old)
      for new, old in zip(jax.tree.leaves(new_params), jax.tree.leaves(params), strict=True)
    )
    params = new_params
  return history, kept


def check_values(layout: str, axis_type: AxisType) -> dict:
  params, x, y = _problem()
  specs = sharding.param_specs(layout, VALUE_LAYERS)
  # One device, no mesh: the plain vmap of value_and_grad, and the stacked path.
  plain_loss = sharding.make_loss("data", specs, explicit=False)
  reference = jax.jit(jax.vmap(jax.value_and_grad(plain_loss), in_axes=(None, 0, 0)))(params, x, y)
  tx, stacked, _ = _steps(plain_loss, None)
  steps_reference, _ = _trajectory(stacked, tx, params, x, y)

  mesh = jax.make_mesh((8,), (sharding.AXIS,), axis_types=(axis_type,))
  with jax.set_mesh(mesh):
    placed = jax.tree.map(
      lambda leaf, spec: jax.device_put(leaf, NamedSharding(mesh, spec)), params, specs
    )
    batch = NamedSharding(mesh, sharding.batch_spec(layout))
    xs, ys = jax.device_put(x, batch), jax.device_put(y, batch)
    loss = sharding.make_loss(layout, specs, axis_type == AxisType.Explicit)
    got = jax.jit(ogv.task_value_and_grad(loss, batch_axis=sharding.AXIS))(placed, xs, ys)
    with_aux = jax.jit(
      ogv.task_value_and_grad(
        lambda *args: (loss(*args), loss(*args)), has_aux=True, batch_axis=sharding.AXIS
      )
    )(placed, xs, ys)
    tx, stacked, low = _steps(loss, sharding.AXIS)
    stacked_history, stacked_kept = _trajectory(stacked, tx, placed, xs, ys)
    low_history, low_kept = _trajectory(low, tx, placed, xs, ys)
  (_, aux), _ = with_aux
  return {
    "losses": _relative_error(got[0], reference[0]),
    "grads": _relative_error(got[1], reference[1]),
    # With has_aux, the mean of the shards' aux (here each shard's loss) is the loss.
    "aux_shape": list(aux.shape),
    "aux_mean": _relative_error(jnp.mean(aux, axis=1), reference[0]),
    "grad_specs": sorted({str(_spec(leaf)) for leaf in jax.tree.leaves(got[1])}),
    "stacked": _relative_error(stacked_history, steps_reference),
    "low": _relative_error(low_history, steps_reference),
    "stacked_kept_sharding": stacked_kept,
    "low_kept_sharding": low_kept,
    # The case is the one it claims: GradVac corrected some task pair.
    "corrected": int(np.sum(np.asarray(low_history[-1][1].corrected))),
  }


def _tensor_parallel_loss(params, x, y) -> jax.Array:
  """Column-parallel then row-parallel layer (its output named replicated on a mesh)."""
  hidden = jnp.tanh(x @ params["up"])
  if jax.sharding.get_abstract_mesh().empty:
    return jnp.mean((hidden @ params["down"] - y) ** 2)
  return jnp.mean((jnp.matmul(hidden, params["down"], out_sharding=P()) - y) ** 2)


def check_other_meshes(axis_type: AxisType) -> dict:
  """Two mesh axes (data x model, tensor-parallel parameters), and arrays placed off the mesh."""
  params, x, y = _problem()
  params = {"up": params["dense_0"]["kernel"], "down": params["dense_1"]["kernel"]}
  reference = jax.vmap(jax.value_and_grad(_tensor_parallel_loss), in_axes=(None, 0, 0))(
    params, x, y
  )
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(axis_type,) * 2)
  with jax.set_mesh(mesh):
    placed = {
      "up": jax.device_put(params["up"], NamedSharding(mesh, P(None, "model"))),
      "down": jax.device_put(params["down"], NamedSharding(mesh, P("model", None))),
    }
    batch = NamedSharding(mesh, P(None, "data"))
    per_task = ogv.task_value_and_grad(_tensor_parallel_loss, batch_axis="data")
    two_axes = jax.jit(per_task)(placed, jax.device_put(x, batch), jax.device_put(y, batch))
    # Not jitted, arrays on one device, both mesh axes splitting the batch.
    both = ogv.task_value_and_grad(_tensor_parallel_loss, batch_axis=("data", "model"))
    off_mesh = both(params, x, y)
  return {
    "two_axes": _relative_error(two_axes, reference),
    "two_axes_specs": [str(_spec(leaf)) for leaf in jax.tree.leaves(two_axes[1])],
    "off_mesh": _relative_error(off_mesh, reference),
  }


_INSTRUCTION = re.compile(r"\s(?P<op>reduce-scatter)(?:-start)?\(")


def compile_step(kind: str, layout: str, axis_type: AxisType, **sizes: int):
  """The compiled step ``kind`` of ``layout``; the per-task steps use ``batch_axis``."""
  num_tasks, num_layers, width, batch = (
    sizes[key] for key in ("num_tasks", "num_layers", "width", "batch")
  )
  mesh = jax.make_mesh((8,), (sharding.AXIS,), axis_types=(axis_type,))
  specs = sharding.param_specs(layout, num_layers)
  shapes = {name: {"kernel": (width, width), "bias": (width,)} for name in specs}
  with jax.set_mesh(mesh):
    params = jax.tree.map(
      lambda shape, spec: jax.ShapeDtypeStruct(
        shape, jnp.float32, sharding=NamedSharding(mesh, spec)
      ),
      shapes,
      specs,
      is_leaf=lambda node: isinstance(node, tuple),
    )
    data = jax.ShapeDtypeStruct(
      (num_tasks, batch, width),
      jnp.float32,
      sharding=NamedSharding(mesh, sharding.batch_spec(layout)),
    )
    loss = sharding.make_loss(layout, specs, axis_type == AxisType.Explicit)
    tx = optax.chain(ogv.gradvac(num_tasks, granularity="layer"), optax.adam(1e-3))
    per_task = ogv.task_value_and_grad(loss, batch_axis=sharding.AXIS)

    def step(params, opt_state, x, y):
      if kind == "stacked":
        updates, opt_state = tx.update(per_task(params, x, y)[1], opt_state, params)
      else:
        grads_fn = lambda p: per_task(p, x, y)  # noqa: E731
        updates, opt_state = tx.update(None, opt_state, params, task_grads_fn=grads_fn)
      return optax.apply_updates(params, updates), opt_state

    if kind == "plain":
      tx, step = sharding.plain_step(loss)
    opt_state = jax.eval_shape(tx.init, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, data, data).compile()


def measure(layout: str, axis_type: AxisType, **sizes: int) -> dict:
  """Temp bytes, reduce-scatter count and largest collectives of the three steps."""
  result = {}
  for kind in KINDS:
    compiled = compile_step(kind, layout, axis_type, **sizes)
    hlo = compiled.as_text()
    result[kind] = {
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      "reduce-scatters": len(_INSTRUCTION.findall(hlo)),
      **sharding.largest_collectives(hlo),
    }
  return result


def check_memory(layout: str, axis_type: AxisType) -> dict:
  sizes = dict(num_tasks=NUM_TASKS, num_layers=NUM_LAYERS, width=WIDTH, batch=BATCH)
  return {
    **measure(layout, axis_type, **sizes),
    "num_tasks": NUM_TASKS,
    "devices": jax.device_count(),
    "num_params": NUM_LAYERS * (WIDTH * WIDTH + WIDTH),
    "largest_param": WIDTH * WIDTH,
  }


def table() -> str:
  """The README table: section 8's sizes, temp in units of T P / D floats."""
  num_tasks, num_layers, width, batch = 8, 6, 256, 64
  sizes = dict(num_tasks=num_tasks, num_layers=num_layers, width=width, batch=batch)
  num_params = num_layers * (width * width + width)
  unit = num_tasks * num_params * 4 / 8
  print(_harness.machine_line())
  header = ["layout", "axes", "temp stacked", "temp low", "temp plain"]
  header += ["stacked bound", "low bound", "reduce-scatters stacked / low"]
  header += [f"{op} stacked / low / plain" for op in sharding.COLLECTIVES]
  rows = []
  for layout in LAYOUTS:
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      result = measure(layout, axis_type, **sizes)
      temps = [result[kind]["temp_bytes"] / unit for kind in KINDS]
      plain = temps[-1]
      stacked_bound = plain + 1.3 * num_tasks * (num_params / 8 + width * width) * 4 / unit
      low_bound = plain + 1.3 * num_tasks * width * width * 4 / unit
      row = [layout, axis_type.name, *temps, stacked_bound, low_bound]
      row.append(" / ".join(str(result[kind]["reduce-scatters"]) for kind in ("stacked", "low")))
      row += [" / ".join(f"{result[kind][op]:,}" for kind in KINDS) for op in sharding.COLLECTIVES]
      rows.append(row)
  text = _harness.markdown_table(header, rows)
  print(text, flush=True)
  return text


def main() -> None:
  assert jax.device_count() == 8, jax.devices()
  checks = sys.argv[1:] or ["values", "memory"]
  if checks == ["table"]:
    table()
    return
  for check in checks:
    for layout in LAYOUTS:
      for axis_type in (AxisType.Auto, AxisType.Explicit):
        run = check_values if check == "values" else check_memory
        report = {"check": check, "layout": layout, "mode": axis_type.name}
        report.update(run(layout, axis_type))
        if check == "values" and layout == "data":
          report.update(check_other_meshes(axis_type))
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
