"""Cost of each method's jitted update against the two passes it cannot avoid.

Whatever it does, a Gram-based method must read the stacked gradients twice: once to build
the Gram matrices (the similarities depend on every entry) and once to form the
weighted sum (the weights depend on the similarities). The baseline is exactly
those two passes, jitted together as one function: a per-leaf Gram einsum
summed into its group, and a per-leaf weighted sum whose weights are computed
from the Gram matrices (so that XLA cannot merge the two reads into one). The
ratio is what all of the method's logic on `[groups, T, T]` arrays costs on top
of that.

The gradients have 4.01M float32 parameters in 50 leaves: 25 layers, each a
400 x 400 kernel and a 400 bias. `granularity="layer"` therefore has 25 groups
(kernel and bias share one), `"tensor"` 50 and `"model"` 1.

  python benchmarks/transform.py [--quick] [--repeats N] [--methods gradvac,imtl_g,...]
                                 [--tasks 2,4,...]
"""

import argparse
import functools
from collections.abc import Callable, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import optax

import optax_gradvac as ogv

_HIGHEST = jax.lax.Precision.HIGHEST
GRANULARITIES = ("model", "layer", "tensor")

# name: (transform factory (num_tasks, granularity), target ratio for T <= 16, for T = 64).
METHODS: dict[str, tuple[Callable[[int, str], Any], float, float]] = {
  "gradvac": (lambda t, g: ogv.gradvac(t, granularity=g), 1.2, 1.4),
}
# The closed-form and Newton-solved weightings.
METHODS.update(
  {
    "imtl_g": (lambda t, g: ogv.imtl_g(t, granularity=g), 1.3, 2.0),
    "aligned_mtl": (lambda t, g: ogv.aligned_mtl(t, granularity=g), 1.3, 2.0),
    "nash_mtl": (lambda t, g: ogv.nash_mtl(t, granularity=g), 1.3, 2.0),
  }
)
# The weightings that solve a small convex program (`optax_gradvac._solvers`).
METHODS.update(
  {
    "mgda": (lambda t, g: ogv.mgda(t, granularity=g), 1.3, 2.0),
    "cagrad": (lambda t, g: ogv.cagrad(t, granularity=g), 1.3, 2.0),
    "upgrad": (lambda t, g: ogv.upgrad(t, granularity=g), 1.3, 2.0),
  }
)


def with_losses(tx: Any, num_tasks: int) -> optax.GradientTransformation:
  """`tx` whose update is given fixed per-task losses (GradNorm needs them)."""
  losses = jnp.linspace(1.0, 2.0, num_tasks)

  def update(updates: Any, state: Any, params: Any = None) -> Any:
    return tx.update(updates, state, params, losses=losses)

  return optax.GradientTransformation(tx.init, update)


# FairGrad (Newton), DualProj (a QP), ConFIG (closed form), RLW and GradNorm.
METHODS.update(
  {
    "fairgrad": (lambda t, g: ogv.fairgrad(t, granularity=g), 1.3, 2.0),
    "dualproj": (lambda t, g: ogv.dualproj(t, granularity=g), 1.3, 2.0),
    "config": (lambda t, g: ogv.config(t, granularity=g), 1.3, 2.0),
    "rlw": (lambda t, g: ogv.rlw(t, granularity=g), 1.3, 2.0),
    "gradnorm": (lambda t, g: with_losses(ogv.gradnorm(t, granularity=g), t), 1.3, 2.0),
  }
)


def split_options(argv: Sequence[str] | None) -> tuple[list[str], list[int] | None, list[str]]:
  """Takes `--methods a,b` (default: all of METHODS) and `--tasks 2,4` out of argv."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--tasks", default=None)
  known, rest = parser.parse_known_args(argv)
  methods = known.methods.split(",")
  unknown = [name for name in methods if name not in METHODS]
  if unknown:
    raise SystemExit(f"unknown methods {unknown}; choose from {list(METHODS)}")
  tasks = None if known.tasks is None else [int(t) for t in known.tasks.split(",")]
  return methods, tasks, rest


def make_gradients(num_tasks: int, num_layers: int, width: int, seed: int = 0) -> dict[str, Any]:
  """Stacked per-task gradients of `num_layers` dense layers (kernel and bias)."""
  keys = jax.random.split(jax.random.key(seed), 2 * num_layers)
  return {
    f"dense_{layer:02d}": {
      "kernel": jax.random.normal(keys[2 * layer], (num_tasks, width, width)),
      "bias": jax.random.normal(keys[2 * layer + 1], (num_tasks, width)),
    }
    for layer in range(num_layers)
  }


def leaf_groups(tree: Any, granularity: str) -> tuple[int, ...]:
  """Group index of every leaf, grouped as `ogv.gradvac(granularity=...)` does."""
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  prefix = {"model": 0, "layer": -1, "tensor": None}[granularity]
  labels = [jax.tree_util.keystr(path[:prefix]) for path in paths]
  index = {label: group for group, label in enumerate(dict.fromkeys(labels))}
  return tuple(index[label] for label in labels)


def two_passes(grads: Any, groups: tuple[int, ...]) -> Any:
  """The two unavoidable reads: group Gram matrices, then a Gram-weighted sum."""
  leaves, treedef = jax.tree.flatten(grads)
  num_tasks = leaves[0].shape[0]
  grams = [jnp.zeros((num_tasks, num_tasks)) for _ in range(max(groups) + 1)]
  for leaf, group in zip(leaves, groups, strict=True):
    flat = leaf.reshape(num_tasks, -1)
    grams[group] = grams[group] + jnp.einsum("tp,sp->ts", flat, flat, precision=_HIGHEST)
  # Any weights computed from the Gram matrices force the second read to wait
  # for the first, as in GradVac; unit-norm task weights are a cheap choice.
  weights = [jax.lax.rsqrt(jnp.diagonal(gram) + 1e-12) for gram in grams]
  summed = [
    jnp.einsum("t,t...->...", weights[group], leaf, precision=_HIGHEST)
    for leaf, group in zip(leaves, groups, strict=True)
  ]
  return jax.tree.unflatten(treedef, summed)


def compile_seconds(function: Any, *args: Any) -> float:
  """Wall time to lower and compile a fresh `jax.jit` of `function`."""
  return _harness.timed(lambda: jax.jit(function).lower(*args).compile())[1]


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the ratio table; returns it."""
  methods, tasks, argv = split_options(argv)
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  if args.quick:  # one case per method: a smoke test
    task_counts, granularities, num_layers, width = (3,), ("layer",), 3, 16
  else:
    task_counts, granularities, num_layers, width = (2, 4, 8, 16, 64), GRANULARITIES, 25, 400
  task_counts = tasks or task_counts
  repeats = args.repeats or (3 if args.quick else 9)
  num_params = num_layers * (width * width + width)
  print(f"# update / two passes, P = {num_params:,} float32 in {2 * num_layers} leaves")
  print(_harness.machine_line())
  rows = []
  for num_tasks in task_counts:
    grads = jax.block_until_ready(make_gradients(num_tasks, num_layers, width))
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), grads)
    for granularity in granularities:
      groups = leaf_groups(grads, granularity)
      assert max(groups) + 1 == len(ogv.group_names(params, granularity))
      baseline = functools.partial(two_passes, groups=groups)
      compile_base = compile_seconds(baseline, grads)
      for method in methods:
        make, target_small, target_large = METHODS[method]
        tx = make(num_tasks, granularity)
        state = tx.init(params)
        compile_ours = compile_seconds(tx.update, grads, state, params)
        medians = _harness.interleaved_medians(
          {
            "ours": functools.partial(jax.jit(tx.update), grads, state, params),
            "base": functools.partial(jax.jit(baseline), grads),
          },
          repeats=repeats,
        )
        target = target_large if num_tasks > 16 else target_small
        ratio = medians["ours"] / medians["base"]
        rows.append(
          (
            method,
            num_tasks,
            granularity,
            max(groups) + 1,
            1e3 * medians["ours"],
            1e3 * medians["base"],
            ratio,
            f"<= {target}",
            compile_ours,
            compile_base,
          )
        )
        print(f"{method} T={num_tasks} {granularity}: ratio {ratio:.3f}", flush=True)
    del grads
  table = _harness.markdown_table(
    (
      "method",
      "T",
      "granularity",
      "groups",
      "update ms",
      "two passes ms",
      "ratio",
      "target",
      "compile update s",
      "compile two passes s",
    ),
    rows,
  )
  print(table)
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return table


if __name__ == "__main__":
  main()
