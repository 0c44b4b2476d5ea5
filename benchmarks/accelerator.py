"""The transform, memory and training-step benchmarks at sizes a CPU cannot reach.

Meant for one GPU or TPU chip (it runs anywhere; ``--quick`` is a smoke test).
Three tables, each a ratio against a baseline measured in the same run (medians
of interleaved repetitions after a warm-up call):

1. ``update / two passes`` (as ``transform.py``): stacked gradients of 25 dense
   ``d x d`` layers with biases, the update of each method against the two
   unavoidable reads of the gradients (Gram matrices, then a weighted sum).
2. ``low memory`` (as ``low_memory.py``): an MLP training step, stacked vs
   low-memory vs plain: XLA's compiled temp memory in units of P, and time.
   The largest ``T`` is compiled only (its stacked step needs more memory than
   the chip has to spare for timing all three).
3. ``training step`` (as ``train_step.py``): the example's character-level
   transformer, widened to about 100M parameters, 16 tasks: GradVac (stacked and
   low-memory) against ``sum_tasks`` and against a plain single-gradient step.

  python benchmarks/accelerator.py [--quick] [--repeats N]
"""

import functools
from collections.abc import Sequence

import _harness
import jax
import jax.numpy as jnp
import low_memory
import optax
import train_step
import transform

import optax_gradvac as ogv
from optax_gradvac.examples import model as model_lib


def transform_table(
  task_counts: Sequence[int], methods: Sequence[str], layers: int, width: int, repeats: int
) -> tuple[str, str]:
  """``update / two passes`` for every method, T and granularity (model, layer)."""
  rows = []
  for num_tasks in task_counts:
    grads = jax.block_until_ready(transform.make_gradients(num_tasks, layers, width))
    params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:], leaf.dtype), grads)
    for granularity in ("model", "layer"):
      groups = transform.leaf_groups(grads, granularity)
      base = jax.jit(functools.partial(transform.two_passes, groups=groups))
      for method in methods:
        tx = transform.METHODS[method][0](num_tasks, granularity)
        state = tx.init(params)
        medians = _harness.interleaved_medians(
          {
            "ours": functools.partial(jax.jit(tx.update), grads, state, params),
            "base": functools.partial(base, grads),
          },
          repeats=repeats,
        )
        rows.append(
          (
            method,
            num_tasks,
            granularity,
            1e3 * medians["ours"],
            1e3 * medians["base"],
            medians["ours"] / medians["base"],
          )
        )
        print(f"transform {method} T={num_tasks} {granularity}: {rows[-1][-1]:.3f}", flush=True)
    del grads
  num_params = layers * (width * width + width)
  header = ("method", "T", "granularity", "update ms", "two passes ms", "ratio")
  caption = f"update / two passes, P = {num_params:,} float32 in {2 * layers} leaves"
  return caption, _harness.markdown_table(header, rows)


def low_memory_table(
  timed_tasks: Sequence[int], compiled_tasks: Sequence[int], layers: int, width: int, repeats: int
) -> tuple[str, str]:
  """Temp memory (units of P) and time of the stacked, low-memory and plain MLP steps."""
  params = low_memory.mlp(layers, width)
  size = 4 * sum(leaf.size for leaf in jax.tree.leaves(params))
  rows = []
  for num_tasks in (*timed_tasks, *compiled_tasks):
    step = low_memory.steps(num_tasks)
    args = (params, step["tx"].init(params), *low_memory.data(num_tasks, width))
    names = ("stacked", "low memory", "plain")
    compiled = {name: jax.jit(step[name]).lower(*args).compile() for name in names}
    temp = {name: c.memory_analysis().temp_size_in_bytes / size for name, c in compiled.items()}
    times = ["compiled only"] * 2
    if num_tasks in timed_tasks:
      medians = _harness.interleaved_medians(
        {name: functools.partial(c, *args) for name, c in compiled.items()}, repeats=repeats
      )
      times = [
        medians["low memory"] / medians["stacked"],
        medians["stacked"] / medians["plain"],
      ]
    rows.append([num_tasks, temp["stacked"], temp["low memory"], temp["plain"], *times])
    print(f"low memory T={num_tasks}: {rows[-1]}", flush=True)
    del compiled
  header = (
    "T",
    "stacked temp / P",
    "low-memory temp / P",
    "plain temp / P",
    "time low / stacked",
    "time stacked / plain",
  )
  caption = f"low memory: {layers} dense layers of width {width}, P = {size // 4:,}"
  return caption, _harness.markdown_table(header, rows)


def training_step_table(
  config: dict, num_tasks: int, batch: int, seq_len: int, repeats: int
) -> tuple[str, str]:
  """Step time of GradVac (stacked, low memory), ``sum_tasks`` and a plain step."""
  model = model_lib.CharTransformer(max_length=seq_len - 1, **config)
  params = model_lib.init_params(model, seq_len, seed=0)
  loss = model_lib.make_loss(model)
  tokens = train_step.random_words(num_tasks, batch, seq_len, config["vocab_size"])
  adam = optax.adam(1e-4)
  transforms = {
    "gradvac, layer": optax.chain(ogv.gradvac(num_tasks, granularity="layer"), adam),
    "gradvac, model": optax.chain(ogv.gradvac(num_tasks, granularity="model"), adam),
    "sum_tasks": optax.chain(ogv.sum_tasks(num_tasks), adam),
  }
  steps = {name: jax.jit(train_step.surgery_step(loss, tx)) for name, tx in transforms.items()}
  states = {name: tx.init(params) for name, tx in transforms.items()}
  per_task = ogv.task_value_and_grad(loss)
  low_tx = transforms["gradvac, layer"]

  def low_step(params, opt_state, tokens):
    fn = lambda params: per_task(params, tokens)  # noqa: E731
    updates, opt_state = low_tx.update(None, opt_state, params, task_grads_fn=fn)
    return optax.apply_updates(params, updates), opt_state, jnp.zeros([])

  steps["gradvac, layer, low memory"] = jax.jit(low_step)
  states["gradvac, layer, low memory"] = low_tx.init(params)
  steps["plain"] = jax.jit(train_step.plain_step(loss, adam))
  states["plain"] = adam.init(params)
  medians = _harness.interleaved_medians(
    {name: functools.partial(step, params, states[name], tokens) for name, step in steps.items()},
    repeats=repeats,
  )
  num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
  caption = (
    f"training step: {num_params:,} parameters, T = {num_tasks}, "
    f"batch [{num_tasks}, {batch}, {seq_len}]"
  )
  rows = [
    (name, 1e3 * time, time / medians["sum_tasks"], time / medians["plain"])
    for name, time in medians.items()
  ]
  header = ("step", "ms", "/ sum_tasks step", "/ plain step")
  return caption, _harness.markdown_table(header, rows)


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the three tables; returns them."""
  methods, tasks, argv = transform.split_options(argv)
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  print(_harness.machine_line(), jax.devices()[0].device_kind, flush=True)
  if args.quick:
    repeats = args.repeats or 2
    tables = [
      transform_table(tasks or (2,), methods[:1], layers=2, width=16, repeats=repeats),
      low_memory_table((2,), (4,), layers=3, width=16, repeats=repeats),
      training_step_table(
        {"vocab_size": 16, "d_model": 32, "num_layers": 1, "num_heads": 2}, 2, 2, 8, repeats
      ),
    ]
  else:
    repeats = args.repeats or 15
    tables = [
      transform_table(tasks or (8, 32), methods, layers=25, width=2048, repeats=repeats),
      low_memory_table((8, 32), (64,), layers=24, width=2048, repeats=repeats),
      training_step_table(
        {"vocab_size": 128, "d_model": 1024, "num_layers": 8, "num_heads": 16}, 16, 16, 64, repeats
      ),
    ]
  for caption, table in tables:
    print(f"\n{caption}\n\n{table}")
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return "\n\n".join(table for _, table in tables)


if __name__ == "__main__":
  main()
