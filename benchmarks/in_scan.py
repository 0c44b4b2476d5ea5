"""The surgery inside a scanned stack's backward pass, against the stacked step.

A 24-layer MLP of width 256 whose layers are stacked and run with ``lax.scan``
(one ``[24, 256, 256]`` kernel: ~1.6M parameters, ``P``), T task-separated batches
of 16 examples, then Adam. The scan body is rematerialised (``jax.checkpoint``),
as large models are, unless a case says otherwise. The jitted steps:

- ``plain``: one gradient of the summed task losses (no per-task gradients);
- ``sum_tasks``: per-task gradients (``ogv.task_value_and_grad``), summed;
- ``<method> stacked``: the same per-task gradients through
  ``<method>(T, granularity=ogv.StackedLayers("layers"))``;
- ``<method> in-scan``: ``ogv.tapped_value_and_grad``: each layer's parameters
  tapped in the scan body, so its per-task gradients are reduced to the update
  inside the scan's backward pass;
- ``<method> in-scan, no remat``: the same without ``jax.checkpoint``.

Reported: the step's scratch (``memory_analysis().temp_size_in_bytes``) in units
of ``P`` floats, its compile time, and its time against ``sum_tasks`` (medians of
interleaved repetitions).

  python benchmarks/in_scan.py [--quick] [--repeats N] [--tasks 8,32,64] [--methods gradvac,mgda]
"""

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradvac as ogv

Step = Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]]


def stacked_params(depth: int, width: int) -> dict:
  keys = jax.random.split(jax.random.key(0), 2)
  return {
    "layers": {
      "kernel": jax.random.normal(keys[0], (depth, width, width)) / np.sqrt(width),
      "bias": jnp.zeros((depth, width)),
    }
  }


def layer(params: dict, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ params["kernel"] + params["bias"])


def body(remat: bool) -> Callable[..., Any]:
  return jax.checkpoint(layer) if remat else layer


def task_loss(params: dict, x: jax.Array, y: jax.Array, remat: bool = True) -> jax.Array:
  x, _ = jax.lax.scan(lambda h, p: (body(remat)(p, h), None), x, params["layers"])
  return jnp.mean((x - y) ** 2)


def tapped_losses(
  params: dict, carriers: dict, xs: jax.Array, ys: jax.Array, remat: bool
) -> jax.Array:
  def step(h: jax.Array, slices: Any) -> tuple[jax.Array, None]:
    per_task = ogv.tap(*slices)
    return jax.vmap(layer)(per_task, h), None

  step = jax.checkpoint(step) if remat else step
  h, _ = jax.lax.scan(step, xs, (params["layers"], carriers["layers"]))
  return jnp.mean((h - ys) ** 2, axis=(1, 2))


def make_step(tx: optax.GradientTransformation, kind: str) -> Step:
  adam = optax.adam(1e-3)
  task_grads = ogv.task_value_and_grad(task_loss)

  def step(params: Any, state: Any, xs: jax.Array, ys: jax.Array) -> tuple[Any, Any]:
    tx_state, adam_state = state
    if kind == "plain":
      total = lambda p: jax.vmap(task_loss, (None, 0, 0))(p, xs, ys).sum()  # noqa: E731
      grads, new_tx_state = jax.grad(total)(params), tx_state
    elif kind.startswith("in-scan"):
      losses = lambda p, c, x, y: tapped_losses(p, c, x, y, remat=kind == "in-scan")  # noqa: E731
      _, grads, new_tx_state = ogv.tapped_value_and_grad(losses, tx)(params, tx_state, xs, ys)
    else:
      grads, new_tx_state = tx.update(task_grads(params, xs, ys)[1], tx_state, params)
    updates, adam_state = adam.update(grads, adam_state, params)
    return optax.apply_updates(params, updates), (new_tx_state, adam_state)

  return step


def cases(num_tasks: int, methods: Sequence[str]) -> dict[str, tuple[Any, str]]:
  """name -> (transformation, kind of step)."""
  table = {"plain": (ogv.sum_tasks(), "plain"), "sum_tasks": (ogv.sum_tasks(), "stacked")}
  for method in methods:
    tx = getattr(ogv, method)(num_tasks, granularity=ogv.StackedLayers("layers"))
    table[f"{method} stacked"] = (tx, "stacked")
    table[f"{method} in-scan"] = (tx, "in-scan")
    table[f"{method} in-scan, no remat"] = (tx, "in-scan, no remat")
  return table


def measure(
  num_tasks: int, depth: int, width: int, batch: int, methods: Sequence[str], repeats: int
) -> list[list[object]]:
  params = stacked_params(depth, width)
  size = sum(leaf.size for leaf in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(num_tasks, batch, width)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(num_tasks, batch, width)), jnp.float32)
  compiled, rows = {}, {}
  for name, (tx, kind) in cases(num_tasks, methods).items():
    state = (tx.init(params), optax.adam(1e-3).init(params))
    lowered = jax.jit(make_step(tx, kind)).lower(params, state, xs, ys)
    executable, seconds = _harness.timed(lowered.compile)
    temp = executable.memory_analysis().temp_size_in_bytes / (4 * size)
    compiled[name] = (executable, state)
    rows[name] = [num_tasks, name, temp, seconds]
  times = _harness.interleaved_medians(
    {
      name: lambda executable=executable, state=state: executable(params, state, xs, ys)
      for name, (executable, state) in compiled.items()
    },
    repeats=repeats,
  )
  return [[*rows[name], times[name] / times["sum_tasks"]] for name in rows]


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not data")
  parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
  parser.add_argument("--tasks", default="8,32,64", help="comma-separated numbers of tasks")
  parser.add_argument("--methods", default="gradvac,mgda", help="comma-separated methods")
  args = parser.parse_args(argv)
  depth, width, batch = (3, 8, 2) if args.quick else (24, 256, 16)
  repeats = args.repeats or (2 if args.quick else 7)
  tasks = [4] if args.quick else [int(value) for value in args.tasks.split(",")]
  methods = ["gradvac"] if args.quick else args.methods.split(",")
  print(_harness.machine_line())
  print(f"{depth} scanned layers of width {width}, {batch} examples per task, {repeats} repeats")
  rows = [
    row for num_tasks in tasks for row in measure(num_tasks, depth, width, batch, methods, repeats)
  ]
  header = ["T", "step", "scratch (P)", "compile (s)", "time / sum_tasks"]
  table = _harness.markdown_table(header, rows)
  print(table)
  return table


if __name__ == "__main__":
  main()
