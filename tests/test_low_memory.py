"""The low-memory path: ``update(None, state, params, task_grads_fn=fn)``.

The transformation computes the per-task gradients itself, in two passes (Gram
matrices, then the weighted sum), so they never exist all at once. The
reference is the stacked path on the same gradients: same updates and states
to float32 rounding, over several steps. Memory is checked with XLA's compiled
memory analysis (no clock).
"""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradvac as ogv
from optax_gradvac import _pipeline

T = 3
LAYERS = 3
WIDTH = 4
STACKED = ogv.StackedLayers("blocks")

METHODS = {
  "gradvac": functools.partial(ogv.gradvac, T, 0.1),
  "pcgrad": functools.partial(ogv.pcgrad, T),
  "sum_tasks": lambda granularity: ogv.sum_tasks(T),
  "mean_tasks": lambda granularity: ogv.mean_tasks(T),
  "mgda": functools.partial(ogv.mgda, T),
  "nash_mtl": functools.partial(ogv.nash_mtl, T),
}


def _params(seed: int = 0) -> dict:
  """An MLP whose hidden blocks are stacked on a leading axis (as ``nn.scan`` does)."""
  rng = np.random.default_rng(seed)
  return {
    "blocks": {
      "kernel": jnp.asarray(rng.normal(size=(LAYERS, WIDTH, WIDTH)) / 2, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(LAYERS, WIDTH)) / 4, jnp.float32),
    },
    "head": {"kernel": jnp.asarray(rng.normal(size=(WIDTH, 1)), jnp.float32)},
  }


def _outputs(params: dict, x: jax.Array) -> jax.Array:
  def block(h, layer):
    return jnp.tanh(h @ layer["kernel"] + layer["bias"]), None

  h, _ = jax.lax.scan(block, x, params["blocks"])
  return (h @ params["head"]["kernel"])[..., 0]


def _task_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean((_outputs(params, x) - y) ** 2)


def _example_losses(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  return (_outputs(params, x) - y) ** 2


def _task_data(seed: int, nonfinite: bool = False, huge: bool = False):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(T, 5, WIDTH)).astype(np.float32)
  ys = rng.normal(size=(T, 5)).astype(np.float32)
  if nonfinite and seed == 1:
    xs[0, 1, 0] = np.nan
  if huge and seed == 1:
    ys[0] *= 3e19  # finite gradients whose squares overflow float32
  return jnp.asarray(xs), jnp.asarray(ys)


# One mixed batch: tasks 0 and 2 only (task 1 absent), and one padding example.
_TASK_IDS = jnp.asarray(np.r_[np.zeros(5), np.full(5, 2), np.zeros(4), -1], jnp.int32)


def _grads_fn(kind: str, xs: jax.Array, ys: jax.Array):
  """``params -> (losses, stacked grads)``, from task-separated or mixed batches."""
  if kind == "tasks":
    return lambda params: ogv.task_value_and_grad(_task_loss)(params, xs, ys)
  segment = ogv.segment_value_and_grad(_example_losses, T)
  return lambda params: segment(params, _TASK_IDS, xs.reshape(-1, WIDTH), ys.reshape(-1))


def _history(tx, kind: str, low_memory: bool, steps: int = 3, **data):
  """The updates and states of ``steps`` SGD steps through ``tx``, one jitted step."""

  @jax.jit
  def step(params, state, xs, ys):
    grads_fn = _grads_fn(kind, xs, ys)
    if low_memory:
      updates, state = tx.update(None, state, params, task_grads_fn=grads_fn)
    else:
      updates, state = tx.update(grads_fn(params)[1], state, params)
    return optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)), updates, state

  params = _params()
  state = jax.jit(tx.init)(params)
  history = []
  for seed in range(steps):
    params, updates, state = step(params, state, *_task_data(seed, **data))
    history.append((updates, state))
  return history


def _assert_close(got, expected, rtol: float = 1e-6, atol: float = 1e-7) -> None:
  """Same tree structure, and every leaf close (NaN matching NaN; keys as their data)."""

  def close(a, b):
    a, b = np.asarray(a), np.asarray(b)
    if np.issubdtype(a.dtype, np.inexact):
      np.testing.assert_allclose(a, b, rtol=rtol, atol=atol)
    else:
      np.testing.assert_array_equal(a, b)

  jax.tree.map(close, _plain(got), _plain(expected))


def _assert_equal(got, expected) -> None:
  jax.tree.map(np.testing.assert_array_equal, _plain(got), _plain(expected))


def _is_key(leaf) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key)


def _plain(tree):
  """Key leaves as their raw data, so that every leaf compares as an array."""
  return jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)


def _assert_same_as_stacked(make, kind: str, **data):
  low = _history(make(), kind, low_memory=True, **data)
  stacked = _history(make(), kind, low_memory=False, **data)
  for step, (got, expected) in enumerate(zip(low, stacked, strict=True)):
    try:
      _assert_close(got, expected)
    except AssertionError as error:
      raise AssertionError(f"step {step}: {error}") from None
  return low


# (method, granularity, batches, what step 1 holds): every granularity on both
# kinds of batches, every method on one of them. Step 1 holds a NaN (the update is
# the plain sum's NaN, the state is kept) or finite gradients whose squares
# overflow float32 (the Gram matrices are rescaled) where named.
CASES = [
  ("gradvac", "model", "tasks", "normal"),
  ("gradvac", "layer", "segments", "nonfinite"),
  ("gradvac", "tensor", "tasks", "huge"),
  ("gradvac", STACKED, "segments", "normal"),
  ("pcgrad", STACKED, "tasks", "normal"),
  ("mgda", "tensor", "segments", "huge"),
  ("nash_mtl", "layer", "tasks", "nonfinite"),
  ("nash_mtl", "model", "segments", "normal"),
  ("sum_tasks", None, "segments", "normal"),
  ("mean_tasks", None, "tasks", "nonfinite"),
]


def _case_id(value) -> str:
  return "stacked-layers" if value is STACKED else str(value)


@pytest.mark.parametrize(("method", "granularity", "kind", "step_1"), CASES, ids=_case_id)
def test_low_memory_path_matches_the_stacked_path(method, granularity, kind, step_1):
  make = functools.partial(METHODS[method], granularity=granularity)
  flags = {"nonfinite": step_1 == "nonfinite", "huge": step_1 == "huge"}
  history = _assert_same_as_stacked(make, kind, **flags)
  (_, state_0), (updates_1, state_1), _ = history
  if step_1 == "nonfinite":
    assert all(bool(jnp.isnan(leaf).any()) for leaf in jax.tree.leaves(updates_1))
    _assert_equal(state_1, state_0)
  if step_1 == "huge":
    # The case is the one it claims: the squared norms overflow float32.
    _, grads = _grads_fn(kind, *_task_data(1, huge=True))(_params())
    assert not np.isfinite(float(sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(grads))))
  if step_1 == "huge" and hasattr(state_1, "count"):
    assert int(state_1.count) == 2
    assert np.isfinite(np.asarray(state_1.cosine)).all()


def _step_pair(tx):
  """A low-memory and a stacked jitted step of ``tx`` on task-separated batches."""

  @jax.jit
  def low(params, state, xs, ys):
    grads_fn = _grads_fn("tasks", xs, ys)
    return tx.update(None, state, params, task_grads_fn=grads_fn)

  @jax.jit
  def stacked(params, state, xs, ys):
    return tx.update(_grads_fn("tasks", xs, ys)(params)[1], state, params)

  return low, stacked


def test_chain_inject_hyperparams_summary_and_checkpoints():
  injected = optax.inject_hyperparams(ogv.gradvac, static_args=("num_tasks", "granularity"))
  tx = optax.chain(injected(T, beta=0.5, granularity="layer"), optax.adam(1e-2))
  low, stacked = _step_pair(tx)
  params = _params()
  low_state = stacked_state = tx.init(params)
  for seed in range(2):
    data = _task_data(seed)
    low_updates, low_state = low(params, low_state, *data)
    updates, stacked_state = stacked(params, stacked_state, *data)
    _assert_close(low_updates, updates, rtol=1e-6, atol=1e-7)
  _assert_close(
    ogv.similarity_summary(low_state, params), ogv.similarity_summary(stacked_state, params)
  )
  restored = ogv.from_bytes(tx.init(params), ogv.to_bytes(low_state))
  _assert_equal(restored, low_state)
  _assert_close(
    low(params, restored, *_task_data(2))[0], stacked(params, stacked_state, *_task_data(2))[0]
  )


def test_linen_train_state_step():
  from flax import linen as nn
  from flax.training import train_state

  model = nn.Sequential([nn.Dense(WIDTH), nn.tanh, nn.Dense(1)])
  xs, ys = _task_data(0)
  params = model.init(jax.random.key(0), xs[0])
  tx = optax.chain(ogv.gradvac(T, granularity="layer"), optax.sgd(0.1))
  state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  def task_loss(params, x, y):
    return jnp.mean((model.apply(params, x)[:, 0] - y) ** 2)

  @jax.jit
  def low_memory_step(state, xs, ys):
    def task_grads_fn(params):
      return ogv.task_value_and_grad(task_loss)(params, xs, ys)

    updates, opt_state = state.tx.update(
      None, state.opt_state, state.params, task_grads_fn=task_grads_fn
    )
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)

  @jax.jit
  def stacked_step(state, xs, ys):
    _, task_grads = ogv.task_value_and_grad(task_loss)(state.params, xs, ys)
    return state.apply_gradients(grads=task_grads)

  low, stacked = low_memory_step(state, xs, ys), stacked_step(state, xs, ys)
  _assert_close(low.params, stacked.params, rtol=1e-6, atol=1e-7)
  _assert_close(low.opt_state, stacked.opt_state)
  assert int(low.step) == 1


def test_nnx_optimizer_step():
  from flax import nnx

  def make():
    model = nnx.Sequential(
      nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0)), nnx.tanh, nnx.Linear(WIDTH, 1, rngs=nnx.Rngs(1))
    )
    tx = optax.chain(ogv.gradvac(T, granularity="layer"), optax.sgd(0.1))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  def task_loss(model, x, y):
    return jnp.mean((model(x)[:, 0] - y) ** 2)

  @nnx.jit
  def low_memory_step(model, optimizer, xs, ys):
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)

    def task_grads_fn(params):
      loss = lambda params, x, y: task_loss(nnx.merge(graphdef, params, rest), x, y)  # noqa: E731
      return ogv.task_value_and_grad(loss)(params, xs, ys)

    optimizer.update(model, None, task_grads_fn=task_grads_fn)

  @nnx.jit
  def stacked_step(model, optimizer, xs, ys):
    per_task = nnx.vmap(nnx.grad(task_loss), in_axes=(None, 0, 0))
    optimizer.update(model, per_task(model, xs, ys))

  (low_model, low_optimizer), (model, optimizer) = make(), make()
  for seed in range(2):
    low_memory_step(low_model, low_optimizer, *_task_data(seed))
    stacked_step(model, optimizer, *_task_data(seed))
  _assert_close(nnx.state(low_model, nnx.Param), nnx.state(model, nnx.Param), rtol=1e-6, atol=1e-7)
  _assert_close(
    _plain(nnx.state(low_optimizer)), _plain(nnx.state(optimizer)), rtol=1e-6, atol=1e-7
  )


def _errors_tx():
  return ogv.gradvac(T, granularity="layer")


@pytest.mark.parametrize(
  ("call", "error", "match"),
  [
    (lambda tx, s, p, fn: tx.update(p, s, p, task_grads_fn=fn), ValueError, "both"),
    (lambda tx, s, p, fn: tx.update(None, s, None, task_grads_fn=fn), ValueError, "params"),
    (lambda tx, s, p, fn: tx.update(None, s, p, task_grads_fn=1.0), TypeError, "function"),
    (
      lambda tx, s, p, fn: tx.update(None, s, p, task_grads_fn=lambda q: fn(q)[1]),
      TypeError,
      r"\(losses, per-task gradients\)",
    ),
    (  # the gradient of the summed loss: no task axis
      lambda tx, s, p, fn: tx.update(
        None, s, p, task_grads_fn=lambda q: (0.0, jax.grad(lambda r: fn(r)[0].sum())(q))
      ),
      ValueError,
      r"'blocks/bias'.*\(3, 4\).*parameter has shape \(3, 4\)",
    ),
    (  # two tasks' gradients for a transformation of three
      lambda tx, s, p, fn: tx.update(
        None, s, p, task_grads_fn=lambda q: jax.tree.map(lambda x: x[:2], fn(q))
      ),
      ValueError,
      r"'blocks/bias'.*\(2, 3, 4\).*num_tasks=3",
    ),
    (  # gradients of other parameters
      lambda tx, s, p, fn: tx.update(
        None, s, p, task_grads_fn=lambda q: (0.0, {"head": fn(q)[1]["head"]})
      ),
      ValueError,
      "blocks",
    ),
  ],
  ids=["updates-too", "no-params", "not-callable", "not-a-pair", "summed", "two-tasks", "tree"],
)
def test_bad_input_is_rejected_at_trace_time(call, error, match):
  tx = _errors_tx()
  params = _params()
  state = tx.init(params)
  grads_fn = _grads_fn("tasks", *_task_data(0))
  with pytest.raises(error, match=match):
    jax.jit(lambda s, p: call(tx, s, p, grads_fn))(state, params)


def test_multi_steps_rejects_the_low_memory_path():
  tx = ogv.multi_steps(_errors_tx(), 2, num_tasks=T)
  params = _params()
  fn = _grads_fn("tasks", *_task_data(0))
  with pytest.raises(ValueError, match="multi_steps: task_grads_fn"):
    jax.jit(lambda p: tx.update(None, tx.init(p), p, task_grads_fn=fn))(params)


def test_the_extra_argument_is_not_one_of_optax():
  linesearch = optax.scale_by_backtracking_linesearch(max_backtracking_steps=3)
  optax_names = set(inspect.signature(linesearch.update).parameters)
  assert {"value", "grad", "value_fn"} <= optax_names
  assert _pipeline.TASK_GRADS_FN not in optax_names
  # and a chain forwards it to the surgery, past a transformation without extra args
  tx = optax.chain(optax.scale(1.0), ogv.sum_tasks(T))
  params = _params()
  fn = _grads_fn("tasks", *_task_data(0))
  updates, _ = jax.jit(lambda p: tx.update(None, tx.init(p), p, task_grads_fn=fn))(params)
  _assert_close(updates, jax.tree.map(lambda g: g.sum(0), fn(params)[1]), rtol=1e-6)


def _mlp(layers: int, width: int, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  return {
    f"dense_{layer}": {
      "kernel": jnp.asarray(rng.normal(size=(width, width)) / np.sqrt(width), jnp.float32),
      "bias": jnp.zeros(width, jnp.float32),
    }
    for layer in range(layers)
  }


def _mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
  for layer in range(len(params)):
    x = jnp.tanh(x @ params[f"dense_{layer}"]["kernel"] + params[f"dense_{layer}"]["bias"])
  return jnp.mean((x - y) ** 2)


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("num_tasks", [8, 16])
def test_low_memory_step_holds_one_leaf_of_per_task_gradients(num_tasks):
  """XLA's scratch memory: the plain step's, plus a few ``T x largest leaf``, not ``T x P``.

  The bound allows 2.5 leaves of ``T`` gradients: the one being reduced, the next
  one being computed, and the scaled copy of one leaf that the overflow rescue
  (a ``lax.cond`` branch, allocated whether or not it runs) makes.
  """
  params = _mlp(layers=6, width=128)
  largest_leaf = max(leaf.size for leaf in jax.tree.leaves(params)) * 4
  xs = jnp.ones((num_tasks, 16, 128))
  ys = jnp.zeros((num_tasks, 16, 128))
  grads_fn = lambda params, xs, ys: ogv.task_value_and_grad(_mlp_loss)(params, xs, ys)  # noqa: E731

  def plain(params, xs, ys):
    return jax.grad(lambda p: jax.vmap(_mlp_loss, (None, 0, 0))(p, xs, ys).sum())(params)

  bound = _temp_bytes(plain, params, xs, ys) + 2.5 * num_tasks * largest_leaf
  for granularity in ["model", "layer", "tensor"] if num_tasks == 8 else ["model"]:
    tx = ogv.gradvac(num_tasks, granularity=granularity)
    state = tx.init(params)

    def low(state, params, xs, ys, tx=tx):
      return tx.update(None, state, params, task_grads_fn=lambda p: grads_fn(p, xs, ys))

    def stacked(state, params, xs, ys, tx=tx):
      return tx.update(grads_fn(params, xs, ys)[1], state, params)

    assert _temp_bytes(low, state, params, xs, ys) <= bound, granularity
    if num_tasks == 16:  # the bound can fail: the stacked step holds all T x P gradients
      num_params = sum(leaf.size for leaf in jax.tree.leaves(params))
      assert _temp_bytes(stacked, state, params, xs, ys) > max(bound, num_tasks * num_params * 4)
