"""Compile time and peak temporary memory of the jitted `gradvac` update.

The gradients are abstract (`jax.ShapeDtypeStruct`): nothing is allocated, only
compiled. 200 leaves (100 layers of a 200 x 200 kernel and a 200 bias, 4.02M
float32 parameters). Compile time should grow far slower than T^2 (the
sequential part is a `lax.scan` of T - 1 rounds, not an unrolled T^2 loop);
XLA's temporary buffers should stay far below the stacked gradients' size (no
second full copy of them). The two unavoidable passes (Gram einsum, then a
weighted sum, as in `transform.py`) are shown for reference.

  python benchmarks/compile_memory.py [--quick] [--repeats N]
"""

import functools
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import transform

import optax_gradvac as ogv


def abstract_gradients(num_tasks: int, num_layers: int, width: int) -> dict[str, Any]:
  """Shapes of stacked per-task gradients of `num_layers` dense layers."""
  return {
    f"dense_{layer:03d}": {
      "kernel": jax.ShapeDtypeStruct((num_tasks, width, width), jnp.float32),
      "bias": jax.ShapeDtypeStruct((num_tasks, width), jnp.float32),
    }
    for layer in range(num_layers)
  }


Case = Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]


def gradvac_case(
  num_tasks: int, granularity: str, grads: Any, params: Any
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """A fresh `gradvac` update and its abstract arguments."""
  tx = ogv.gradvac(num_tasks, granularity=granularity)
  return tx.update, (grads, jax.eval_shape(tx.init, params), params)


def baseline_case(
  groups: tuple[int, ...], grads: Any
) -> tuple[Callable[..., Any], tuple[Any, ...]]:
  """A fresh two-pass baseline and its abstract arguments."""
  return functools.partial(transform.two_passes, groups=groups), (grads,)


def compile_once(make: Case) -> tuple[Any, float]:
  """Traces, lowers and compiles a freshly made function; returns it and the seconds."""
  function, args = make()
  return _harness.timed(lambda: jax.jit(function).lower(*args).compile())


def measure(make: Case, repeats: int) -> tuple[float, Any]:
  """Median compile seconds over `repeats` fresh compilations, and a memory analysis."""
  results = [compile_once(make) for _ in range(repeats)]
  return statistics.median(seconds for _, seconds in results), results[0][0].memory_analysis()


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the compile-time and memory table; returns it."""
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  if args.quick:
    task_counts, num_layers, width = (2, 4), 5, 8
  else:
    task_counts, num_layers, width = (8, 64), 100, 200
  repeats = args.repeats or (1 if args.quick else 3)
  print(f"# compile time and memory, {2 * num_layers} leaves")
  print(_harness.machine_line())
  rows = []
  compile_times: dict[tuple[str, str, int], float] = {}
  for num_tasks in task_counts:
    grads = abstract_gradients(num_tasks, num_layers, width)
    params = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), grads)
    stacked_bytes = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(grads))
    for granularity in ("model", "layer"):
      groups = transform.leaf_groups(grads, granularity)

      cases = {
        "gradvac": functools.partial(gradvac_case, num_tasks, granularity, grads, params),
        "two passes": functools.partial(baseline_case, groups, grads),
      }
      for name, make in cases.items():
        seconds, memory = measure(make, repeats)
        compile_times[name, granularity, num_tasks] = seconds
        rows.append(
          (
            name,
            granularity,
            max(groups) + 1,
            num_tasks,
            seconds,
            f"{stacked_bytes / 2**20:.1f}",
            f"{memory.temp_size_in_bytes / 2**20:.2f}",
            memory.temp_size_in_bytes / stacked_bytes,
            f"{memory.output_size_in_bytes / 2**20:.2f}",
          )
        )
  table = _harness.markdown_table(
    (
      "function",
      "granularity",
      "groups",
      "T",
      "compile s",
      "stacked grads MiB",
      "temp MiB",
      "temp / stacked",
      "output MiB",
    ),
    rows,
  )
  print(table)
  small, large = task_counts
  for granularity in ("model", "layer"):
    ratio = compile_times["gradvac", granularity, large]
    ratio /= compile_times["gradvac", granularity, small]
    print(
      f"gradvac compile time, {granularity}: T={large} / T={small} = {ratio:.2f} "
      f"(T^2 would be {(large / small) ** 2:.0f})"
    )
  print(f"compile times: medians of {repeats} fresh compilations")
  return table


if __name__ == "__main__":
  main()
