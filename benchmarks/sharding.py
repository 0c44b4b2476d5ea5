"""Per-device memory and collectives of a sharded GradVac step, on 8 host devices.

For each layout and axis type (Auto, Explicit) this compiles three training
steps of an MLP of ``L`` dense ``d x d`` layers (with biases), ``T`` tasks:

- the stacked step: per-task gradients by ``ogv.task_value_and_grad``, then
  ``ogv.gradvac(T, granularity="layer")`` and Adam;
- the low-memory step: the same transformation, given the function instead of
  the gradients (``tx.update(None, ..., task_grads_fn=...)``), which computes
  them twice, once reduced to Gram matrices and once to the update;
- the plain step: the gradient of the summed task losses, then Adam;

and prints XLA's per-device scratch (``memory_analysis().temp_size_in_bytes``)
in units of ``T * P / D`` floats (``P`` parameters, ``D = 8`` devices), the
low-memory step's bound ``plain + 1.3 T (largest leaf) / D`` in the same unit,
and the largest result, in elements, of each kind of collective in the compiled
HLO.

Layouts, on a one-axis mesh of 8 devices:

- ``fsdp``: parameters' last axis sharded, every task's batch split over the
  devices; the loss gathers each parameter before use (``reshard`` to
  replicated), so its gradient is reduce-scattered back;
- ``tensor``: Megatron style: even layers column-parallel (kernel ``P(None,
  "m")``, bias ``P("m")``), odd layers row-parallel (kernel ``P("m", None)``,
  bias replicated); batches replicated;
- ``task``: parameters replicated, the task axis of the batches sharded;
- ``data``: parameters replicated, every task's batch split over the devices.

  python benchmarks/sharding.py [--quick]

Nothing runs: every step is only compiled from abstract arguments.
"""

import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import re
from collections.abc import Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_gradvac as ogv

AXIS = "m"
LAYOUTS = ("fsdp", "tensor", "task", "data")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")
_INSTRUCTION = re.compile(
  r"=\s*(?P<shape>.*?)\s+(?P<op>all-gather|all-reduce|reduce-scatter|all-to-all)(?:-start)?\("
)
_ARRAY = re.compile(r"\w+\[([\d,]*)\]")


def param_specs(layout: str, num_layers: int) -> dict[str, dict[str, P]]:
  """The sharding of every parameter in ``layout``."""

  def layer(index: int) -> dict[str, P]:
    if layout == "fsdp":
      return {"kernel": P(None, AXIS), "bias": P(AXIS)}
    if layout == "tensor":
      if index % 2 == 0:
        return {"kernel": P(None, AXIS), "bias": P(AXIS)}
      return {"kernel": P(AXIS, None), "bias": P()}
    return {"kernel": P(), "bias": P()}

  return {f"dense_{index}": layer(index) for index in range(num_layers)}


def batch_spec(layout: str) -> P:
  """The sharding of the ``[T, B, d]`` batches in ``layout``."""
  return {"task": P(AXIS), "fsdp": P(None, AXIS), "data": P(None, AXIS)}.get(layout, P())


def make_loss(layout: str, specs: dict[str, dict[str, P]], explicit: bool) -> Any:
  """One task's loss: an MLP of tanh layers, mean squared error."""

  def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    if layout == "fsdp":  # gather every parameter before use
      params = jax.tree.map(lambda leaf: jax.sharding.reshard(leaf, P()), params)
    hidden = x
    for index, name in enumerate(specs):
      layer = params[name]
      if layout == "tensor" and index % 2 and explicit:
        # Row-parallel under Explicit axes: name the all-reduced output.
        hidden = jnp.matmul(hidden, layer["kernel"], out_sharding=P())
      else:
        hidden = hidden @ layer["kernel"]
      hidden = hidden + layer["bias"]
      if index < len(specs) - 1:
        hidden = jnp.tanh(hidden)
    return jnp.mean((hidden - y) ** 2)

  return loss


def stacked_step(loss: Any, num_tasks: int) -> Any:
  tx = optax.chain(ogv.gradvac(num_tasks, granularity="layer"), optax.adam(1e-3))
  per_task = ogv.task_value_and_grad(loss)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    _, grads = per_task(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def low_memory_step(loss: Any, num_tasks: int) -> Any:
  """The stacked step's transformation on the low-memory path: it computes the gradients."""
  tx = optax.chain(ogv.gradvac(num_tasks, granularity="layer"), optax.adam(1e-3))
  per_task = ogv.task_value_and_grad(loss)

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    grads_fn = lambda params: per_task(params, x, y)  # noqa: E731
    updates, opt_state = tx.update(None, opt_state, params, task_grads_fn=grads_fn)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def plain_step(loss: Any) -> Any:
  tx = optax.adam(1e-3)

  def total(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.sum(jax.vmap(loss, in_axes=(None, 0, 0))(params, x, y))

  def step(params: Any, opt_state: Any, x: jax.Array, y: jax.Array) -> Any:
    grads = jax.grad(total)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return tx, step


def largest_collectives(hlo: str) -> dict[str, int]:
  """The largest result (in elements) of each kind of collective in HLO text."""
  largest = dict.fromkeys(COLLECTIVES, 0)
  for match in _INSTRUCTION.finditer(hlo):
    for dims in _ARRAY.findall(match["shape"]):
      size = 1
      for dim in filter(None, dims.split(",")):
        size *= int(dim)
      largest[match["op"]] = max(largest[match["op"]], size)
  return largest


def compile_step(
  kind: str,
  layout: str,
  axis_type: AxisType,
  *,
  num_tasks: int,
  num_layers: int,
  width: int,
  batch: int,
) -> Any:
  """The compiled ``kind`` ("stacked", "low" or "plain") step of ``layout`` on a fresh mesh."""
  mesh = jax.make_mesh((8,), (AXIS,), axis_types=(axis_type,))
  specs = param_specs(layout, num_layers)
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
      (num_tasks, batch, width), jnp.float32, sharding=NamedSharding(mesh, batch_spec(layout))
    )
    loss = make_loss(layout, specs, axis_type == AxisType.Explicit)
    if kind == "stacked":
      tx, step = stacked_step(loss, num_tasks)
    elif kind == "low":
      tx, step = low_memory_step(loss, num_tasks)
    else:
      tx, step = plain_step(loss)
    opt_state = jax.eval_shape(tx.init, params)
    return jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, data, data).compile()


def compile_both(
  layout: str,
  axis_type: AxisType,
  *,
  num_tasks: int,
  num_layers: int,
  width: int,
  batch: int,
  kinds: Sequence[str] = ("stacked", "plain"),
) -> dict[str, dict[str, Any]]:
  """Per-device temp bytes and largest collectives of each step in ``kinds``."""
  result = {}
  for kind in kinds:
    compiled = compile_step(
      kind,
      layout,
      axis_type,
      num_tasks=num_tasks,
      num_layers=num_layers,
      width=width,
      batch=batch,
    )
    result[kind] = {
      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
      **largest_collectives(compiled.as_text()),
    }
  return result


KINDS = ("stacked", "low", "plain")


def measure(
  layout: str, axis_type: AxisType, *, num_tasks: int, num_layers: int, width: int, batch: int
) -> dict[str, Any]:
  """Temp (units of T P / D) and largest collectives of the three steps."""
  num_params = num_layers * (width * width + width)
  unit = num_tasks * num_params * 4 / 8
  steps = compile_both(
    layout,
    axis_type,
    num_tasks=num_tasks,
    num_layers=num_layers,
    width=width,
    batch=batch,
    kinds=KINDS,
  )
  return {kind: {"temp": step.pop("temp_bytes") / unit, **step} for kind, step in steps.items()}


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the table; returns it."""
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  num_tasks, num_layers, width, batch = (8, 2, 16, 16) if args.quick else (8, 6, 256, 64)
  print(
    f"# sharded steps, {jax.device_count()} devices, T = {num_tasks}, {num_layers} dense "
    f"{width}x{width} layers, batch {batch} per task; temp in T P / D, collectives in elements"
  )
  print(_harness.machine_line())
  # The low-memory step's bound, plain + 1.3 T (largest leaf) / D, above the plain
  # step's temp in units of T P / D: 1.3 (largest leaf) / (P / D) * D / D.
  margin = 1.3 * width * width / (num_layers * (width * width + width))
  header = ["layout", "axes", "temp stacked", "temp low", "temp plain", "low bound"]
  header += [f"{op} stacked / low / plain" for op in COLLECTIVES]
  rows = []
  for layout in LAYOUTS:
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      result = measure(
        layout, axis_type, num_tasks=num_tasks, num_layers=num_layers, width=width, batch=batch
      )
      row = [layout, axis_type.name, *(result[kind]["temp"] for kind in KINDS)]
      row.append(result["plain"]["temp"] + margin)
      row += [" / ".join(f"{result[kind][op]:,}" for kind in KINDS) for op in COLLECTIVES]
      rows.append(row)
  table = _harness.markdown_table(header, rows)
  print(table, flush=True)
  return table


if __name__ == "__main__":
  main()
