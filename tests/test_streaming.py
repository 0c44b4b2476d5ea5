"""The stacked update streams: each chunk of groups is weighted from its own gradients.

A group's weights, its non-finite fallback and its overflow rescue read that
group's Gram matrices only, so within a jitted step XLA may reduce a layer's
per-task gradients as soon as the backward pass has made them. Checked here on
the program itself (no update depends on another chunk's gradients) and on the
numbers (the same updates and states as with every group in one chunk).
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gram_methods import METHODS
from jax_compat import enable_x64

import optax_gradvac as ogv
from optax_gradvac import _pytree

TASKS = 4
GRANULARITY = ogv.StackedLayers("blocks")
SHAPES = {
  "blocks": {"kernel": (3, 4, 4), "bias": (3, 4)},  # three stacked layers: one chunk
  "dense_0": {"kernel": (6, 5), "bias": (5,)},
  "dense_1": {"kernel": (5, 3)},
  "head": {"w": (3,)},
}
parametrize_methods = pytest.mark.parametrize("name", METHODS)


def grads_at(step: int, dtype=np.float64) -> dict:
  rng = np.random.default_rng(step)
  return {
    layer: {
      name: rng.normal(size=(TASKS, *shape)).astype(dtype) * rng.uniform(0.1, 10)
      for name, shape in leaves.items()
    }
    for layer, leaves in SHAPES.items()
  }


def params_like(grads: dict) -> dict:
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)


def losses_at(step: int) -> np.ndarray:
  return np.random.default_rng(100 + step).uniform(0.2, 2.0, TASKS) / (1 + step)


@pytest.fixture
def every_group_streams(monkeypatch):
  """No least chunk size: each group (each stack) of these small leaves is a chunk of its own
  unless packed with its neighbours by :func:`_pytree.chunk_limit`."""
  monkeypatch.setattr(_pytree, "_MIN_CHUNK_BYTES", 0)


@contextlib.contextmanager
def one_chunk():
  """Every group's weights computed together."""
  streamed = _pytree.stream_chunks

  def whole(leaves, groups):
    return [_pytree.Chunk(0, streamed(leaves, groups)[-1].stop, list(range(len(leaves))))]

  _pytree.stream_chunks = whole
  try:
    yield
  finally:
    _pytree.stream_chunks = streamed


def test_chunks_follow_groups_stacks_and_sizes(every_group_streams):
  grads = grads_at(0, np.float32)
  leaves = jax.tree.leaves(grads)  # blocks/bias, blocks/kernel, dense_0/bias, ..., head/w
  _, groups = _pytree.leaf_groups(grads, GRANULARITY, task_axis=True)
  assert groups == [(0, 1, 2), (0, 1, 2), 3, 3, 4, 5]
  # The stack's 3 groups share its leaves; the three small groups after it fit together
  # in the limit that the stack (the largest) sets.
  assert _pytree.stream_chunks(leaves, groups) == [
    _pytree.Chunk(0, 3, [0, 1]),
    _pytree.Chunk(3, 6, [2, 3, 4, 5]),
  ]
  layers = [np.zeros((TASKS, 64, 64), np.float32) for _ in range(20)]
  chunks = _pytree.stream_chunks(layers, list(range(20)))
  assert chunks == [_pytree.Chunk(g, g + 1, [g]) for g in range(20)]


def test_a_small_model_is_one_chunk():
  grads = grads_at(0, np.float32)
  _, groups = _pytree.leaf_groups(grads, GRANULARITY, task_axis=True)
  assert _pytree.stream_chunks(jax.tree.leaves(grads), groups) == [
    _pytree.Chunk(0, 6, list(range(6)))
  ]


def _inputs_of_outputs(closed) -> list[set[int]]:
  """For each output of the program, the indices of the inputs it depends on.

  An equation's outputs depend on all of its inputs (a loop's or a conditional's
  body is not looked into): a dependency found here may be spurious, one not
  found is absent.
  """
  jaxpr = closed.jaxpr
  depends: dict = {var: {index} for index, var in enumerate(jaxpr.invars)}

  def of(atom) -> set[int]:
    return set() if hasattr(atom, "val") else depends.get(atom, set())  # a literal has a val

  for equation in jaxpr.eqns:
    found = set().union(*(of(atom) for atom in equation.invars))
    for var in equation.outvars:
      depends[var] = found
  return [of(atom) for atom in jaxpr.outvars]


@parametrize_methods
def test_no_update_depends_on_the_gradients_of_another_chunk(name, every_group_streams):
  grads = grads_at(0, np.float32)
  params = params_like(grads)
  tx = METHODS[name](TASKS, granularity=GRANULARITY)
  kwargs = {"losses": jnp.asarray(losses_at(0), jnp.float32)} if name == "gradnorm" else {}
  closed = jax.make_jaxpr(lambda g: tx.update(g, tx.init(params), params, **kwargs)[0])(grads)
  chunks = _pytree.stream_chunks(
    jax.tree.leaves(grads), _pytree.leaf_groups(grads, GRANULARITY, task_axis=True)[1]
  )
  assert len(chunks) == 2
  chunk_of = {leaf: number for number, chunk in enumerate(chunks) for leaf in chunk.leaves}
  for leaf, inputs in enumerate(_inputs_of_outputs(closed)):
    assert {chunk_of[i] for i in inputs} == {chunk_of[leaf]}, (leaf, inputs)
  # The same program with one chunk: every update depends on every gradient.
  with one_chunk():
    closed = jax.make_jaxpr(lambda g: tx.update(g, tx.init(params), params, **kwargs)[0])(grads)
  assert all(inputs == set(range(6)) for inputs in _inputs_of_outputs(closed))


@parametrize_methods
def test_streamed_updates_and_states_equal_one_chunk(name, every_group_streams):
  """Three float64 steps; at the second, one group has a NaN (its sum, the state kept)."""

  def run() -> list:
    tx = METHODS[name](TASKS, granularity=GRANULARITY)
    update = jax.jit(tx.update)
    params = params_like(grads_at(0))
    state = tx.init(params)
    history = []
    for step in range(3):
      grads = grads_at(step)
      if step == 1:
        grads["dense_1"]["kernel"][2, 0, 1] = np.nan
      kwargs = {"losses": jnp.asarray(losses_at(step))} if name == "gradnorm" else {}
      updates, state = update(grads, state, params, **kwargs)
      history.append((updates, state))
    return history

  with enable_x64(True):
    streamed = run()
    with one_chunk():
      whole = run()

  def close(a, b):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a, b = jax.random.key_data(a), jax.random.key_data(b)
    # The same computations, but a solver batched over other groups: FairGrad's
    # Newton steps stop at residuals of about 200 float64 rounding units (4e-14),
    # which the conditioning of these Gram matrices (below 1e4) may amplify.
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)

  for got, expected in zip(streamed, whole, strict=True):
    jax.tree.map(close, got, expected)
  # The NaN step: its group's update is not finite, and the state was kept.
  assert not np.isfinite(np.asarray(streamed[1][0]["dense_1"]["kernel"])).all()
  np.testing.assert_array_equal(streamed[1][1].count, streamed[0][1].count)


def test_a_streamed_step_holds_a_window_of_layers_not_the_stack(every_group_streams):
  """From 12 to 24 dense layers (width 128, a Python loop, T = 8), the streamed step's
  scratch grows by less than three layers' per-task gradients beyond the plain step's
  growth; with one chunk it grows by the 12 added layers' (read from the compiled
  executables; measured on jaxlib 0.10.1: 0.01 and 12.1 layers' worth).

  The window itself (how many layers' gradients XLA keeps alive) is the scheduler's
  choice; the tapped path bounds it (``test_tap.py``).
  """
  num_tasks, width = 8, 128
  rng = np.random.default_rng(0)
  xs = jnp.asarray(rng.normal(size=(num_tasks, 16, width)), jnp.float32)
  tx = ogv.gradvac(num_tasks, granularity="layer")

  def loss(params, x):
    for layer in params.values():
      x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
    return jnp.sum(x**2)

  def plain(params, state):
    return jax.grad(lambda p: jax.vmap(loss, (None, 0))(p, xs).sum())(params), state

  def stacked(params, state):
    return tx.update(ogv.task_value_and_grad(loss)(params, xs)[1], state, params)

  def scratch(step, depth: int) -> int:
    params = {
      f"layer_{i:02d}": {
        "kernel": jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32),
        "bias": jnp.zeros(width, jnp.float32),
      }
      for i in range(depth)
    }
    # A new function each time: jit's trace cache would give one chunk the streamed trace.
    compiled = jax.jit(lambda *args: step(*args)).lower(params, tx.init(params)).compile()
    return compiled.memory_analysis().temp_size_in_bytes // 4

  def growth(step) -> int:
    return scratch(step, 24) - scratch(step, 12)

  layer = num_tasks * width * width
  streamed = growth(stacked)
  with one_chunk():
    whole = growth(stacked)
  assert streamed <= growth(plain) + 3 * layer, (streamed / layer, whole / layer)
  assert whole >= 12 * layer, whole / layer
