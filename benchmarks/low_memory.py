"""Memory and time of the low-memory path against the stacked one.

A training step of an MLP (`--layers` dense layers of `--width`, tanh, a batch of
16 examples per task) with `gradvac(T, granularity="layer")`, three ways:

- stacked: `ogv.task_value_and_grad` gives every leaf `[T, *param.shape]`, and
  `tx.update(task_grads, ...)` reduces them (one backward pass, `T x P` memory);
- low memory: `tx.update(None, ..., task_grads_fn=fn)` computes the per-task
  gradients twice, once reduced to Gram matrices and once to the update, each
  leaf as soon as it exists (two backward passes, `T x largest leaf` memory);
- plain: the gradient of the summed loss (one backward pass, no per-task
  gradients): the floor.

Memory is XLA's compiled `temp_size_in_bytes` (deterministic, no clock), in units
of P (the parameters' bytes). Time is the median of interleaved repetitions.

  python benchmarks/low_memory.py [--quick] [--repeats N]

`--rss stacked|low|plain` instead runs a few steps of one large case and nothing else,
so that `/usr/bin/time -v` can report the process's peak resident memory:

  /usr/bin/time -v python benchmarks/low_memory.py --rss stacked --tasks 32 --width 768
  /usr/bin/time -v python benchmarks/low_memory.py --rss low --tasks 32 --width 768
"""

import argparse
import functools
from collections.abc import Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradvac as ogv

BATCH = 16


def mlp(layers: int, width: int) -> dict[str, Any]:
  rng = np.random.default_rng(0)
  return {
    f"dense_{layer:02d}": {
      "kernel": jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32),
      "bias": jnp.zeros(width, jnp.float32),
    }
    for layer in range(layers)
  }


def task_loss(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
  for name in sorted(params):
    x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
  return jnp.mean((x - y) ** 2)


def steps(num_tasks: int) -> dict[str, Any]:
  """The three jitted steps: `(params, state, xs, ys) -> (new params, new state)`."""
  tx = ogv.gradvac(num_tasks, granularity="layer")
  per_task = ogv.task_value_and_grad(task_loss)

  def apply(params, updates):
    return jax.tree.map(lambda p, u: p - 1e-3 * u, params, updates)

  def stacked(params, state, xs, ys):
    _, task_grads = per_task(params, xs, ys)
    updates, state = tx.update(task_grads, state, params)
    return apply(params, updates), state

  def low(params, state, xs, ys):
    updates, state = tx.update(
      None, state, params, task_grads_fn=lambda params: per_task(params, xs, ys)
    )
    return apply(params, updates), state

  def plain(params, state, xs, ys):
    total = lambda params: jax.vmap(task_loss, (None, 0, 0))(params, xs, ys).sum()  # noqa: E731
    return apply(params, jax.grad(total)(params)), state

  return {"tx": tx, "stacked": stacked, "low memory": low, "plain": plain}


def data(num_tasks: int, width: int) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(1)
  xs = jnp.asarray(rng.normal(size=(num_tasks, BATCH, width)), jnp.float32)
  ys = jnp.asarray(rng.normal(size=(num_tasks, BATCH, width)), jnp.float32)
  return xs, ys


def table(task_counts: Sequence[int], layers: int, width: int, repeats: int) -> str:
  params = mlp(layers, width)
  size = sum(leaf.size for leaf in jax.tree.leaves(params)) * 4
  largest = max(leaf.size for leaf in jax.tree.leaves(params)) * 4
  rows = []
  for num_tasks in task_counts:
    step = steps(num_tasks)
    state = step["tx"].init(params)
    args = (params, state, *data(num_tasks, width))
    names = ("stacked", "low memory", "plain")
    compiled = {name: jax.jit(step[name]).lower(*args).compile() for name in names}
    temp = {name: c.memory_analysis().temp_size_in_bytes / size for name, c in compiled.items()}
    medians = _harness.interleaved_medians(
      {name: functools.partial(c, *args) for name, c in compiled.items()}, repeats=repeats
    )
    rows.append(
      [
        num_tasks,
        temp["stacked"],
        temp["low memory"],
        temp["plain"],
        (temp["low memory"] - temp["plain"]) * size / (num_tasks * largest),
        medians["low memory"] / medians["stacked"],
        medians["stacked"] / medians["plain"],
      ]
    )
  header = [
    "T",
    "stacked temp / P",
    "low-memory temp / P",
    "plain temp / P",
    "(low - plain) / (T x largest leaf)",
    "time low / stacked",
    "time stacked / plain",
  ]
  print(
    f"{layers} dense layers of width {width} (P = {size / 4:.3g} parameters, largest leaf "
    f"{largest / 4:.3g}), {BATCH} examples per task, gradvac granularity='layer'"
  )
  return _harness.markdown_table(header, rows)


def mixed_table(task_counts: Sequence[int], layers: int, width: int, repeats: int) -> str:
  """The same steps from one mixed batch (`ogv.segment_value_and_grad`, a task id per example).

  There the per-task gradients cost `T` backward passes (vectorised), in each pass
  of the low-memory step.
  """
  params = mlp(layers, width)
  size = sum(leaf.size for leaf in jax.tree.leaves(params)) * 4

  def example_losses(params, x, y):
    for name in sorted(params):
      x = jnp.tanh(x @ params[name]["kernel"] + params[name]["bias"])
    return jnp.mean((x - y) ** 2, axis=-1)

  rows = []
  for num_tasks in task_counts:
    x, y = (leaf.reshape(-1, width) for leaf in data(num_tasks, width))
    task_ids = jnp.arange(x.shape[0]) % num_tasks
    per_task = ogv.segment_value_and_grad(example_losses, num_tasks)
    tx = ogv.gradvac(num_tasks, granularity="layer")
    state = tx.init(params)
    functions = {
      "stacked": lambda s, p, tx=tx, f=per_task, i=task_ids, x=x, y=y: tx.update(
        f(p, i, x, y)[1], s, p
      ),
      "low memory": lambda s, p, tx=tx, f=per_task, i=task_ids, x=x, y=y: tx.update(
        None, s, p, task_grads_fn=lambda q: f(q, i, x, y)
      ),
      "plain": lambda s, p, x=x, y=y: jax.grad(lambda q: example_losses(q, x, y).sum())(p),
    }
    compiled = {name: jax.jit(f).lower(state, params).compile() for name, f in functions.items()}
    temp = {name: c.memory_analysis().temp_size_in_bytes / size for name, c in compiled.items()}
    medians = _harness.interleaved_medians(
      {name: functools.partial(c, state, params) for name, c in compiled.items()}, repeats=repeats
    )
    rows.append(
      [
        num_tasks,
        temp["stacked"],
        temp["low memory"],
        temp["plain"],
        medians["low memory"] / medians["stacked"],
        medians["stacked"] / medians["plain"],
      ]
    )
  print(f"The same MLP from one mixed batch of {BATCH} x T examples (segment_value_and_grad)")
  header = ["T", "stacked temp / P", "low-memory temp / P", "plain temp / P"]
  header += ["time low / stacked", "time stacked / plain"]
  return _harness.markdown_table(header, rows)


def scanned_table(num_tasks: int, layers: int, width: int) -> str:
  """Scratch memory of the same MLP written with a Python loop and with `lax.scan`.

  Scanned, every layer's kernel is a slice of one `[layers, width, width]` leaf
  (as with `nn.scan`), and the per-task gradients of that leaf come out of the
  scan's backward pass all at once.
  """
  unrolled = mlp(layers, width)
  scanned = {
    "blocks": jax.tree.map(lambda *leaves: jnp.stack(leaves), *unrolled.values()),
  }

  def scanned_loss(params, x, y):
    def block(h, layer):
      return jnp.tanh(h @ layer["kernel"] + layer["bias"]), None

    h, _ = jax.lax.scan(block, x, params["blocks"])
    return jnp.mean((h - y) ** 2)

  size = sum(leaf.size for leaf in jax.tree.leaves(unrolled)) * 4
  xs, ys = data(num_tasks, width)
  rows = []
  for name, params, loss, granularity in [
    ("Python loop", unrolled, task_loss, "layer"),
    ("lax.scan", scanned, scanned_loss, ogv.StackedLayers("blocks")),
  ]:
    tx = ogv.gradvac(num_tasks, granularity=granularity)
    per_task = ogv.task_value_and_grad(loss)
    state = tx.init(params)

    def stacked(params, state, tx=tx, per_task=per_task):
      return tx.update(per_task(params, xs, ys)[1], state, params)

    def low(params, state, tx=tx, per_task=per_task):
      return tx.update(None, state, params, task_grads_fn=lambda p: per_task(p, xs, ys))

    def plain(params, state, loss=loss):
      return jax.grad(lambda p: jax.vmap(loss, (None, 0, 0))(p, xs, ys).sum())(params)

    temp = [
      jax.jit(fn).lower(params, state).compile().memory_analysis().temp_size_in_bytes / size
      for fn in (stacked, low, plain)
    ]
    rows.append([name, num_tasks, *temp])
  print(f"{layers} dense layers of width {width}, unrolled or scanned; scratch memory / P")
  return _harness.markdown_table(["model", "T", "stacked", "low memory", "plain"], rows)


def embedding_table(num_tasks: int, vocab: int, width: int, layers: int) -> str:
  """Scratch memory of a language model whose embedding and readout are its largest leaves.

  Tokens ``[T, 8, 17]``, an embedding ``[vocab, width]``, ``layers`` residual MLP
  blocks (``width x 4 width`` and back), a readout ``[width, vocab]``; compiled
  only. Five steps, each ending in Adam: the plain gradient of the summed loss;
  GradVac on every leaf (stacked, and low-memory); GradVac on the blocks with
  ``sum_tasks`` on the embedding and readout (``optax.partition``: their stacked
  gradients are still formed); and GradVac on the blocks with one gradient of the
  summed loss for the embedding and readout (``optax.identity`` in their
  partition: no per-task gradient of them exists).
  """
  rng = np.random.default_rng(0)

  def normal(*shape: int) -> jax.Array:
    return jnp.asarray(0.02 * rng.normal(size=shape), jnp.float32)

  blocks = {
    f"block_{i}": {"up": normal(width, 4 * width), "down": normal(4 * width, width)}
    for i in range(layers)
  }
  params = {"embed": normal(vocab, width), "readout": normal(width, vocab), **blocks}

  def loss(params, tokens):
    x = params["embed"][tokens[:, :-1]]
    for i in range(layers):
      block = params[f"block_{i}"]
      x = x + jnp.tanh(x @ block["up"]) @ block["down"]
    logits = x @ params["readout"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  def summed(params, tokens):
    return jax.vmap(loss, (None, 0))(params, tokens).sum()

  tokens = jnp.asarray(rng.integers(0, vocab, (num_tasks, 8, 17)), jnp.int32)
  per_task = ogv.task_value_and_grad(loss)
  adam = optax.adam(1e-3)
  gradvac = optax.chain(ogv.gradvac(num_tasks), adam)
  labels = {name: "tasks" if name.startswith("block") else "shared" for name in params}

  def partitioned(shared: optax.GradientTransformation) -> optax.GradientTransformation:
    return optax.chain(
      optax.partition({"tasks": ogv.gradvac(num_tasks), "shared": shared}, labels), adam
    )

  def stacked(params, state, tx):
    return tx.update(per_task(params, tokens)[1], state, params)

  def low(params, state, tx):
    return tx.update(None, state, params, task_grads_fn=lambda p: per_task(p, tokens))

  def plain(params, state, tx):
    return tx.update(jax.grad(summed)(params, tokens), state, params)

  def split(params, state, tx):
    shared = {name: params[name] for name in ("embed", "readout")}
    blocks = {name: leaf for name, leaf in params.items() if name not in shared}
    block_loss = lambda blocks, tokens: loss({**blocks, **shared}, tokens)  # noqa: E731
    task_grads = ogv.task_value_and_grad(block_loss)(blocks, tokens)[1]
    shared_grads = jax.grad(lambda shared: summed({**blocks, **shared}, tokens))(shared)
    return tx.update({**task_grads, **shared_grads}, state, params)

  cases = [
    ("plain gradient of the summed loss", adam, plain),
    ("gradvac, every leaf, stacked", gradvac, stacked),
    ("gradvac, every leaf, low memory", gradvac, low),
    (
      "gradvac on blocks, sum_tasks on embedding and readout",
      partitioned(ogv.sum_tasks(num_tasks)),
      stacked,
    ),
    (
      "gradvac on blocks, one gradient for embedding and readout",
      partitioned(optax.identity()),
      split,
    ),
  ]
  size = sum(leaf.size for leaf in jax.tree.leaves(params))
  largest = vocab * width
  rows = []
  for name, tx, step in cases:
    fn = functools.partial(step, tx=tx)
    compiled = jax.jit(fn).lower(params, tx.init(params)).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / 4
    rows.append([name, temp / size, temp / (num_tasks * largest)])
  print(
    f"A language model, T = {num_tasks}: vocabulary {vocab}, width {width}, {layers} blocks "
    f"(P = {size:,}, embedding and readout {largest:,} each); scratch memory"
  )
  return _harness.markdown_table(["step", "temp / P", "temp / (T x embedding)"], rows)


def rss(mode: str, num_tasks: int, layers: int, width: int) -> None:
  params = mlp(layers, width)
  step = steps(num_tasks)
  state = step["tx"].init(params)
  xs, ys = data(num_tasks, width)
  run = jax.jit(step[{"low": "low memory"}.get(mode, mode)])
  for _ in range(3):
    params, state = jax.block_until_ready(run(params, state, xs, ys))
  size = sum(leaf.size for leaf in jax.tree.leaves(params)) * 4
  gib = num_tasks * size / 2**30
  print(f"{mode}: T = {num_tasks}, P = {size / 2**20:.0f} MiB, T x P = {gib:.2f} GiB")


def main(argv: Sequence[str] | None = None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not data")
  parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
  parser.add_argument("--rss", choices=["stacked", "low", "plain"], default=None)
  parser.add_argument("--tasks", type=int, default=32, help="T of the --rss case")
  parser.add_argument("--layers", type=int, default=24)
  parser.add_argument("--width", type=int, default=256)
  args = parser.parse_args(argv)
  if args.rss:
    rss(args.rss, args.tasks, args.layers, args.width)
    return ""
  print(_harness.machine_line())
  if args.quick:
    text = table([2], layers=3, width=16, repeats=args.repeats or 2)
    text += "\n\n" + mixed_table([2], layers=3, width=16, repeats=args.repeats or 2)
    text += "\n\n" + scanned_table(4, layers=3, width=16)
    text += "\n\n" + embedding_table(2, vocab=64, width=8, layers=1)
  else:
    text = table([8, 32, 64], args.layers, args.width, repeats=args.repeats or 7)
    text += "\n\n" + mixed_table([8, 32], args.layers, args.width, args.repeats or 5)
    text += "\n\n" + scanned_table(32, args.layers, args.width)
    text += "\n\n" + embedding_table(16, vocab=16384, width=256, layers=4)
  print(text)
  return text


if __name__ == "__main__":
  main()
