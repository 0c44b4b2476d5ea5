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
- ``<method> in-scan, no remat``: the same without ``jax.checkpoint``;
- ``<method> tapped_vmap, no remat``: each layer run by ``ogv.tapped_vmap`` (one copy
  of its parameters, its per-task gradients recomputed in the backward pass), without
  ``jax.checkpoint``.

Reported: the step's scratch (``memory_analysis().temp_size_in_bytes``) in units
of ``P`` floats, its compile time, and its time against ``sum_tasks`` (medians of
interleaved repetitions).

  python benchmarks/in_scan.py [--quick] [--repeats N] [--tasks 8,32,64] [--methods gradvac,mgda]
      [--batch 16]
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import streaming

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


tapped_layer = ogv.tapped_vmap(layer)


def tapped_losses(
  params: dict, carriers: dict, xs: jax.Array, ys: jax.Array, remat: bool, fused: bool = False
) -> jax.Array:
  def step(h: jax.Array, slices: Any) -> tuple[jax.Array, None]:
    if fused:
      return tapped_layer(*slices, h), None
    return jax.vmap(layer)(ogv.tap(*slices), h), None

  step = jax.checkpoint(step) if remat else step
  h, _ = jax.lax.scan(step, xs, (params["layers"], carriers["layers"]))
  return jnp.mean((h - ys) ** 2, axis=(1, 2))


# kind of tapped step -> (scan body under jax.checkpoint, layers run by tapped_vmap)
TAPPED = {
  "in-scan": (True, False),
  "in-scan, no remat": (False, False),
  "tapped_vmap, no remat": (False, True),
}


def make_step(tx: optax.GradientTransformation, kind: str) -> Step:
  adam = optax.adam(1e-3)
  task_grads = ogv.task_value_and_grad(task_loss)

  def step(params: Any, state: Any, xs: jax.Array, ys: jax.Array) -> tuple[Any, Any]:
    tx_state, adam_state = state
    if kind == "plain":
      total = lambda p: jax.vmap(task_loss, (None, 0, 0))(p, xs, ys).sum()  # noqa: E731
      grads, new_tx_state = jax.grad(total)(params), tx_state
    elif kind in TAPPED:
      remat, fused = TAPPED[kind]

      def losses(p: Any, c: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return tapped_losses(p, c, x, y, remat=remat, fused=fused)

      _, grads, new_tx_state = ogv.tapped_value_and_grad(losses, tx)(params, tx_state, xs, ys)
    else:
      grads, new_tx_state = tx.update(task_grads(params, xs, ys)[1], tx_state, params)
    updates, adam_state = adam.update(grads, adam_state, params)
    return optax.apply_updates(params, updates), (new_tx_state, adam_state)

  return step


def steps(num_tasks: int, methods: Sequence[str]) -> dict[str, tuple[Any, Step, bool]]:
  """name -> (transformation, step, one chunk: never here)."""
  table = {"plain": (ogv.sum_tasks(), "plain"), "sum_tasks": (ogv.sum_tasks(), "stacked")}
  for method in methods:
    tx = getattr(ogv, method)(num_tasks, granularity=ogv.StackedLayers("layers"))
    table[f"{method} stacked"] = (tx, "stacked")
    table[f"{method} in-scan"] = (tx, "in-scan")
    table[f"{method} in-scan, no remat"] = (tx, "in-scan, no remat")
    table[f"{method} tapped_vmap, no remat"] = (tx, "tapped_vmap, no remat")
  return {name: (tx, make_step(tx, kind), False) for name, (tx, kind) in table.items()}


def main(argv: Sequence[str] | None = None) -> str:
  return streaming.run(argv, __doc__.splitlines()[0], stacked_params, steps, "scanned layers")


if __name__ == "__main__":
  main()
