"""One training step that streams the surgery through the backward pass.

A 24-layer MLP of width 256 (a Python loop over its layers: ~1.6M parameters,
``P``), T task-separated batches of 16 examples, then Adam. The jitted steps:

- ``plain``: one gradient of the summed task losses (no per-task gradients);
- ``sum_tasks``: per-task gradients (``ogv.task_value_and_grad``), summed;
- ``<method>``: the same per-task gradients through ``<method>(T, granularity="layer")``,
  whose groups' weights are computed chunk by chunk (each layer a chunk here), so
  that XLA reduces each layer's gradients as soon as they exist;
- ``<method> one chunk``: the same with every group in one chunk, as the update
  was before it streamed (each group's weights wait for every Gram matrix);
- ``<method> two-pass``: the low-memory path (``task_grads_fn``), which computes
  the gradients twice;
- ``<method> tapped``: ``ogv.tapped_value_and_grad``, each layer's parameters
  tapped where the loop uses them, so that its per-task gradients are reduced to
  the update inside the backward pass;
- ``<method> tapped_vmap``: the same with each layer run by ``ogv.tapped_vmap``
  (one copy of its parameters, no ``[T, ...]`` copies kept for the backward pass).

Reported: the step's scratch (``memory_analysis().temp_size_in_bytes``) in units
of ``P`` floats, its compile time, and its time against ``sum_tasks`` (medians of
interleaved repetitions).

  python benchmarks/streaming.py [--quick] [--repeats N] [--tasks 8,32,64] [--methods gradvac,mgda]
      [--batch 16]
"""

import argparse
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradvac as ogv
from optax_gradvac import _pytree

Step = Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]]


def mlp_params(depth: int, width: int) -> dict:
  keys = jax.random.split(jax.random.key(0), depth)
  return {
    f"layer_{i:02d}": {
      "kernel": jax.random.normal(keys[i], (width, width)) / np.sqrt(width),
      "bias": jnp.zeros(width),
    }
    for i in range(depth)
  }


def dense(params: dict, x: jax.Array) -> jax.Array:
  return jnp.tanh(x @ params["kernel"] + params["bias"])


def task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  for layer in params.values():
    x = dense(layer, x)
  return jnp.mean((x - y) ** 2)


tapped_layer = ogv.tapped_vmap(dense)


def tapped_losses(params: dict, carriers: dict, xs: jax.Array, ys: jax.Array) -> jax.Array:
  for name, layer in params.items():
    xs = jax.vmap(dense)(ogv.tap(layer, carriers[name]), xs)
  return jnp.mean((xs - ys) ** 2, axis=(1, 2))


def vmapped_losses(params: dict, carriers: dict, xs: jax.Array, ys: jax.Array) -> jax.Array:
  for name, layer in params.items():
    xs = tapped_layer(layer, carriers[name], xs)
  return jnp.mean((xs - ys) ** 2, axis=(1, 2))


TAPPED = {"tapped": tapped_losses, "tapped_vmap": vmapped_losses}


def make_step(tx: optax.GradientTransformation, kind: str) -> Step:
  adam = optax.adam(1e-3)
  task_grads = ogv.task_value_and_grad(task_loss)

  def step(params: Any, state: Any, xs: jax.Array, ys: jax.Array) -> tuple[Any, Any]:
    tx_state, adam_state = state
    if kind == "plain":
      total = lambda p: jax.vmap(task_loss, (None, 0, 0))(p, xs, ys).sum()  # noqa: E731
      grads, new_tx_state = jax.grad(total)(params), tx_state
    elif kind in TAPPED:
      _, grads, new_tx_state = ogv.tapped_value_and_grad(TAPPED[kind], tx)(params, tx_state, xs, ys)
    elif kind == "two-pass":
      grads, new_tx_state = tx.update(
        None, tx_state, params, task_grads_fn=lambda p: task_grads(p, xs, ys)
      )
    else:
      grads, new_tx_state = tx.update(task_grads(params, xs, ys)[1], tx_state, params)
    updates, adam_state = adam.update(grads, adam_state, params)
    return optax.apply_updates(params, updates), (new_tx_state, adam_state)

  return step


@contextlib.contextmanager
def one_chunk() -> Iterator[None]:
  """Every group's weights computed together, as before the update streamed."""
  streamed = _pytree.stream_chunks

  def whole(leaves: Sequence[jax.Array], groups: Sequence[_pytree.Group]) -> list:
    chunks = streamed(leaves, groups)
    return [_pytree.Chunk(0, chunks[-1].stop, list(range(len(leaves))))]

  _pytree.stream_chunks = whole
  try:
    yield
  finally:
    _pytree.stream_chunks = streamed


def cases(num_tasks: int, methods: Sequence[str]) -> dict[str, tuple[Any, str, bool]]:
  """name -> (transformation, kind of step, one chunk)."""
  table = {
    "plain": (ogv.sum_tasks(), "plain", False),
    "sum_tasks": (ogv.sum_tasks(), "stacked", False),
  }
  for method in methods:
    tx = getattr(ogv, method)(num_tasks, granularity="layer")
    table[method] = (tx, "stacked", False)
    table[f"{method} one chunk"] = (tx, "stacked", True)
    table[f"{method} two-pass"] = (tx, "two-pass", False)
    table[f"{method} tapped"] = (tx, "tapped", False)
    table[f"{method} tapped_vmap"] = (tx, "tapped_vmap", False)
  return table


def measure(
  num_tasks: int,
  params: Any,
  batch: int,
  width: int,
  steps: dict[str, tuple[Any, Step, bool]],
  repeats: int,
) -> list[list[object]]:
  """Scratch (units of P), compile time and time against ``sum_tasks`` of every step.

  ``steps``: name -> (transformation, step function, whether its update takes one chunk).
  """
  size = sum(leaf.size for leaf in jax.tree.leaves(params))
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(num_tasks, batch, width)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(num_tasks, batch, width)), jnp.float32)
  compiled, rows = {}, {}
  for name, (tx, step, whole) in steps.items():
    state = (tx.init(params), optax.adam(1e-3).init(params))
    with one_chunk() if whole else contextlib.nullcontext():
      lowered = jax.jit(step).lower(params, state, xs, ys)
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


def run(
  argv: Sequence[str] | None,
  description: str,
  make_params: Callable[[int, int], Any],
  make_steps: Callable[[int, Sequence[str]], dict[str, tuple[Any, Step, bool]]],
  model: str,
) -> str:
  """Parses the command line, measures every T and prints the table."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not data")
  parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
  parser.add_argument("--tasks", default="8,32,64", help="comma-separated numbers of tasks")
  parser.add_argument("--methods", default="gradvac,mgda", help="comma-separated methods")
  parser.add_argument("--batch", type=int, default=16, help="examples per task")
  args = parser.parse_args(argv)
  depth, width, batch = (3, 8, 2) if args.quick else (24, 256, args.batch)
  repeats = args.repeats or (2 if args.quick else 7)
  tasks = [4] if args.quick else [int(value) for value in args.tasks.split(",")]
  methods = ["gradvac"] if args.quick else args.methods.split(",")
  print(_harness.machine_line())
  print(f"{depth} {model} of width {width}, {batch} examples per task, {repeats} repeats")
  params = make_params(depth, width)
  rows = [
    row
    for num_tasks in tasks
    for row in measure(num_tasks, params, batch, width, make_steps(num_tasks, methods), repeats)
  ]
  header = ["T", "step", "scratch (P)", "compile (s)", "time / sum_tasks"]
  table = _harness.markdown_table(header, rows)
  print(table)
  return table


def steps(num_tasks: int, methods: Sequence[str]) -> dict[str, tuple[Any, Step, bool]]:
  return {
    name: (tx, make_step(tx, kind), whole)
    for name, (tx, kind, whole) in cases(num_tasks, methods).items()
  }


def main(argv: Sequence[str] | None = None) -> str:
  return run(argv, __doc__.splitlines()[0], mlp_params, steps, "layers")


if __name__ == "__main__":
  main()
