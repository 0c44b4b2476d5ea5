"""A full multi-task training step: GradVac against summing the task gradients.

The model is the multilingual example's character-level transformer
(`optax_gradvac.examples.model.CharTransformer`: 2 layers, d = 128, 4 heads;
~430K parameters with a 128-symbol vocabulary), trained on 16 tasks with
task-separated batches of 16 words x 32 tokens (`[T, B, L]`, random tokens here:
the step's cost does not depend on which letters they are). Three jitted steps,
each ending in Adam and `optax.apply_updates`:

- `gradvac`: per-task gradients (`ogv.task_value_and_grad`), then `ogv.gradvac`;
- `sum_tasks`: the same per-task gradients, summed by `ogv.sum_tasks`;
- `plain`: one ordinary gradient of the summed task losses (`jax.value_and_grad`).

  python benchmarks/train_step.py [--quick] [--repeats N]
"""

import functools
from collections.abc import Callable, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradvac as ogv
from optax_gradvac.examples import model as model_lib

Step = Callable[[Any, Any, jax.Array], tuple[Any, Any, jax.Array]]


def random_words(num_tasks: int, batch: int, seq_len: int, vocab_size: int) -> jax.Array:
  """int32 `[T, B, L]` words: a tag, 3 to L - 2 letters, end of word, padding."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(2, vocab_size, (num_tasks, batch, seq_len), dtype=np.int32)
  lengths = rng.integers(5, seq_len + 1, (num_tasks, batch, 1))
  tokens[..., 0] = 2 + np.arange(num_tasks)[:, None] % (vocab_size - 2)
  positions = np.arange(seq_len)
  tokens = np.where(positions == lengths - 1, 1, tokens)
  return jnp.asarray(np.where(positions >= lengths, 0, tokens))


def surgery_step(loss: Callable[..., jax.Array], tx: optax.GradientTransformation) -> Step:
  """Per-task gradients, then `tx` (a stacked transform chained with Adam)."""
  task_grads = ogv.task_value_and_grad(loss)

  def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
    losses, grads = task_grads(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses.sum()

  return step


def plain_step(loss: Callable[..., jax.Array], tx: optax.GradientTransformation) -> Step:
  """One ordinary gradient of the summed task losses, then `tx` (Adam)."""

  def total_loss(params: Any, tokens: jax.Array) -> jax.Array:
    return jax.vmap(loss, in_axes=(None, 0))(params, tokens).sum()

  def step(params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
    value, grads = jax.value_and_grad(total_loss)(params, tokens)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  return step


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the step-time table; returns it."""
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  if args.quick:
    config = {"vocab_size": 16, "d_model": 32, "num_layers": 1, "num_heads": 2}
    num_tasks, batch, seq_len = 2, 2, 8
  else:
    config = {"vocab_size": 128, "d_model": 128, "num_layers": 2, "num_heads": 4}
    num_tasks, batch, seq_len = 16, 16, 32
  repeats = args.repeats or (3 if args.quick else 11)
  model = model_lib.CharTransformer(max_length=seq_len - 1, **config)
  params = model_lib.init_params(model, seq_len, seed=0)
  loss = model_lib.make_loss(model)
  tokens = random_words(num_tasks, batch, seq_len, config["vocab_size"])
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  adam = optax.adam(1e-3)
  # Each step compiles in seconds even at toy sizes: the smoke test skips one.
  granularities = ("layer",) if args.quick else ("layer", "model")
  transforms = {
    f"gradvac, {granularity}": optax.chain(ogv.gradvac(num_tasks, granularity=granularity), adam)
    for granularity in granularities
  }
  transforms["sum_tasks"] = optax.chain(ogv.sum_tasks(num_tasks), adam)
  steps = {name: jax.jit(surgery_step(loss, tx)) for name, tx in transforms.items()}
  steps["plain"] = jax.jit(plain_step(loss, adam))
  states = {name: tx.init(params) for name, tx in transforms.items()}
  states["plain"] = adam.init(params)

  print(f"# training step, T = {num_tasks}, batch [{num_tasks}, {batch}, {seq_len}]")
  print(f"{num_params:,} parameters, {len(ogv.group_names(params, 'layer'))} layer groups")
  print(_harness.machine_line())
  medians = _harness.interleaved_medians(
    {name: functools.partial(step, params, states[name], tokens) for name, step in steps.items()},
    repeats=repeats,
  )
  rows = [
    (
      name,
      1e3 * medians[name],
      medians[name] / medians["sum_tasks"],
      medians[name] / medians["plain"],
    )
    for name in steps
  ]
  table = _harness.markdown_table(
    ("step", "ms", "/ sum_tasks step (target gradvac <= 1.15)", "/ plain step (target <= 1.3)"),
    rows,
  )
  print(table)
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return table


if __name__ == "__main__":
  main()
