"""The surgery inside the backward pass: taps on scanned layers, for every stack style.

``tapped_value_and_grad`` must give what the method gives on the stacked per-task
gradients of the same model (``StackedLayers`` groups), over several steps
(state included, a NaN step too), for ``lax.scan``, linen ``nn.scan`` and
``nnx.scan`` stacks, with ``tap`` or ``tapped_vmap``; and hold, within one step,
only about one layer's per-task gradients at a time (read from the compiled
executable).
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from gram_methods import METHODS as GRAM_METHODS
from jax_compat import enable_x64

import optax_gradvac as ogv

TASKS, LAYERS, WIDTH, BATCH = 3, 4, 5, 6
GRANULARITY = ogv.StackedLayers("blocks")
# GradNorm needs the losses inside the backward pass: not tapped.
METHODS = {name: make for name, make in GRAM_METHODS.items() if name != "gradnorm"}


def init_params(dtype=np.float64) -> dict:
  rng = np.random.default_rng(0)

  def normal(*shape):
    return (rng.normal(size=shape) / np.sqrt(shape[-1])).astype(dtype)

  return {
    "embed": {"kernel": normal(WIDTH, WIDTH), "bias": np.zeros(WIDTH, dtype)},
    "blocks": {  # two groups per layer: mix and mlp
      "mix": {"kernel": normal(LAYERS, WIDTH, WIDTH)},
      "mlp": {"kernel": normal(LAYERS, WIDTH, WIDTH), "bias": np.zeros((LAYERS, WIDTH), dtype)},
    },
    "head": {"kernel": normal(WIDTH)},
  }


def task_data(step: int, dtype=np.float64) -> tuple[jax.Array, jax.Array, jax.Array]:
  rng = np.random.default_rng(10 + step)
  xs = rng.normal(size=(TASKS, BATCH, WIDTH)).astype(dtype)
  ys = rng.normal(size=(TASKS, BATCH)).astype(dtype)
  return xs, ys, np.asarray(step == 1)  # a NaN head gradient at the second step


def block(params: dict, h: jax.Array) -> jax.Array:
  h = jnp.tanh(h @ params["mix"]["kernel"])
  return jnp.tanh(h @ params["mlp"]["kernel"] + params["mlp"]["bias"])


def head_loss(params: dict, h: jax.Array, y: jax.Array, poison: jax.Array) -> jax.Array:
  kernel = params["kernel"]
  # A finite loss whose gradient is NaN when `poison`: 0 * NaN in the unselected branch.
  nan_gradient = jnp.where(True, 0.0, jnp.where(poison, jnp.nan, 0.0) * jnp.sum(kernel))
  return jnp.mean((h @ kernel - y) ** 2) + nan_gradient


def task_loss(params, x, y, poison):
  h = jnp.tanh(x @ params["embed"]["kernel"] + params["embed"]["bias"])
  h, _ = jax.lax.scan(lambda h, layer: (block(layer, h), None), h, params["blocks"])
  return head_loss(params["head"], h, y, poison)


def tapped_losses(params, carriers, xs, ys, poison):
  embed = ogv.tap(params["embed"], carriers["embed"])
  h = jax.vmap(lambda p, x: jnp.tanh(x @ p["kernel"] + p["bias"]))(embed, xs)
  return tapped_blocks_and_head(params, carriers, h, ys, poison)


def tapped_blocks_and_head(params, carriers, h, ys, poison):
  """The per-task losses from the embedded inputs ``h``: the scanned blocks, then the head."""

  @jax.checkpoint
  def body(h, slices):
    return jax.vmap(block)(ogv.tap(*slices), h), None

  h, _ = jax.lax.scan(body, h, (params["blocks"], carriers["blocks"]))
  head = ogv.tap(params["head"], carriers["head"])
  return jax.vmap(head_loss, (0, 0, 0, None))(head, h, ys, poison)


def vmapped_losses(params, carriers, xs, ys, poison):
  """``tapped_losses`` with ``tapped_vmap``: no copies per task, no ``jax.checkpoint``."""
  embed = ogv.tapped_vmap(lambda p, x: jnp.tanh(x @ p["kernel"] + p["bias"]))
  layer = ogv.tapped_vmap(block)
  h = embed(params["embed"], carriers["embed"], xs)
  h, _ = jax.lax.scan(
    lambda h, slices: (layer(*slices, h), None), h, (params["blocks"], carriers["blocks"])
  )
  head = ogv.tapped_vmap(lambda p, h, y: head_loss(p, h, y, poison))  # poison closed over
  return head(params["head"], carriers["head"], h, ys)


def remat_vmapped_losses(params, carriers, xs, ys, poison):
  """``vmapped_losses`` with the scan body under ``jax.checkpoint`` too."""
  embed = ogv.tapped_vmap(lambda p, x: jnp.tanh(x @ p["kernel"] + p["bias"]))
  layer = jax.checkpoint(lambda h, slices: (ogv.tapped_vmap(block)(*slices, h), None))
  h = embed(params["embed"], carriers["embed"], xs)
  h, _ = jax.lax.scan(layer, h, (params["blocks"], carriers["blocks"]))
  head = ogv.tapped_vmap(lambda p, h, y: head_loss(p, h, y, poison))
  return head(params["head"], carriers["head"], h, ys)


def close(got, expected):
  if jnp.issubdtype(got.dtype, jax.dtypes.prng_key):
    got, expected = jax.random.key_data(got), jax.random.key_data(expected)
  # The same float64 computations but for the order of the per-task backward
  # passes' sums (about 1e-16 relative), through solvers whose tolerance is
  # FairGrad's (Newton residuals of ~4e-14, amplified by the Gram matrices'
  # conditioning, below 1e4 here): as the streaming test, test_streaming.py.
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize(
  ("name", "losses"),
  [
    *((name, losses) for name in METHODS for losses in (tapped_losses, vmapped_losses)),
    ("gradvac", remat_vmapped_losses),
  ],
  ids=[
    *(f"{name}-{style}" for name in METHODS for style in ("tap", "tapped_vmap")),
    "gradvac-tapped_vmap-remat",
  ],
)
def test_tapped_lax_scan_equals_the_stacked_path(name, losses):
  """Three float64 steps; at the second the head's gradient is NaN (its sum, the state kept)."""

  def stacked_fn(params, xs, ys, poison):
    return ogv.task_value_and_grad(task_loss)(params, xs, ys, poison)[1]

  # task_value_and_grad vmaps every argument after params: poison gets a task axis.
  def stacked_batches(batch):
    xs, ys, poison = batch
    return xs, ys, np.broadcast_to(poison, (TASKS,))

  batches = [task_data(step) for step in range(3)]
  with enable_x64(True):
    tx = METHODS[name](TASKS, granularity=GRANULARITY)
    stacked = jax.jit(lambda p, s, *b: tx.update(stacked_fn(p, *b), s, p))
    tapped = jax.jit(ogv.tapped_value_and_grad(losses, tx))
    params = init_params()
    state = tx.init(params)
    for step, batch in enumerate(batches):
      # Both paths from the same parameters and state: each step is compared on its own.
      updates, new_state = stacked(params, state, *stacked_batches(batch))
      losses, tapped_updates, tapped_state = tapped(params, state, *batch)
      jax.tree.map(close, tapped_updates, updates)
      jax.tree.map(close, tapped_state, new_state)
      assert losses.shape == (TASKS,)
      if step == 1:  # the NaN step: the head passes its sum, the state is kept
        assert not np.isfinite(np.asarray(tapped_updates["head"]["kernel"])).any()
        assert np.isfinite(np.asarray(tapped_updates["blocks"]["mix"]["kernel"])).all()
        jax.tree.map(
          lambda a, b: np.testing.assert_array_equal(_data(a), _data(b)), tapped_state, state
        )
      params = jax.tree.map(lambda p, u: p - 0.1 * jnp.nan_to_num(u), params, updates)
      state = new_state
    assert int(state.count) == 2


def _data(leaf):
  return jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return nn.LayerNorm()(jnp.tanh(nn.Dense(WIDTH)(h))), None


class LinenModel(nn.Module):
  """Blocks stacked by ``nn.scan``: ``params["blocks"]`` leaves are ``[LAYERS, ...]``."""

  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(
      LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
    )
    h, _ = blocks(name="blocks")(nn.Dense(WIDTH, name="embed")(x), None)
    return nn.Dense(1, name="head")(h)[..., 0]


def linen_tapped_losses(params, carriers, xs, ys):
  """The recipe: the same modules, the scan written with lax.scan over tapped layers."""

  def apply(module, tapped, *inputs):
    return jax.vmap(lambda p, *x: module.apply({"params": p}, *x))(tapped, *inputs)

  h = apply(nn.Dense(WIDTH), ogv.tap(params["embed"], carriers["embed"]), xs)

  @jax.checkpoint
  def body(h, slices):
    return apply(LinenBlock(), ogv.tap(*slices), h, None)[0], None

  h, _ = jax.lax.scan(body, h, (params["blocks"], carriers["blocks"]))
  out = apply(nn.Dense(1), ogv.tap(params["head"], carriers["head"]), h)[..., 0]
  return jnp.mean((out - ys) ** 2, axis=1)


def linen_vmapped_losses(params, carriers, xs, ys):
  """The recipe with tapped_vmap: each module's own apply, no jax.checkpoint."""

  def tapped(module, *extra):
    return ogv.tapped_vmap(lambda p, x: module.apply({"params": p}, x, *extra))

  h = tapped(nn.Dense(WIDTH))(params["embed"], carriers["embed"], xs)
  block = tapped(LinenBlock(), None)
  h, _ = jax.lax.scan(
    lambda h, slices: (block(*slices, h)[0], None), h, (params["blocks"], carriers["blocks"])
  )
  out = tapped(nn.Dense(1))(params["head"], carriers["head"], h)[..., 0]
  return jnp.mean((out - ys) ** 2, axis=1)


class NnxModel(nnx.Module):
  """Blocks made by ``nnx.vmap`` and run by ``nnx.scan``."""

  def __init__(self, rngs: nnx.Rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make_blocks(rngs):
      return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    self.blocks = make_blocks(rngs)
    self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def forward(block, h):
      return jnp.tanh(block(h))

    return self.head(forward(self.blocks, x))[..., 0]


def nnx_tapped_losses(graphdefs, params, carriers, xs, ys):
  """The recipe: each module merged from its tapped state, the scan over the stack's state."""
  blocks, head = graphdefs

  @jax.checkpoint
  def body(h, slices):
    layer = lambda state, h: jnp.tanh(nnx.merge(blocks, state)(h))  # noqa: E731
    return jax.vmap(layer)(ogv.tap(*slices), h), None

  h, _ = jax.lax.scan(body, xs, (params["blocks"], carriers["blocks"]))
  tapped = ogv.tap(params["head"], carriers["head"])
  out = jax.vmap(lambda state, h: nnx.merge(head, state)(h))(tapped, h)[..., 0]
  return jnp.mean((out - ys) ** 2, axis=1)


def nnx_vmapped_losses(graphdefs, params, carriers, xs, ys):
  """The recipe with tapped_vmap: each module merged from its state, no jax.checkpoint."""
  blocks, head = graphdefs
  block = ogv.tapped_vmap(lambda state, h: jnp.tanh(nnx.merge(blocks, state)(h)))
  h, _ = jax.lax.scan(
    lambda h, slices: (block(*slices, h), None), xs, (params["blocks"], carriers["blocks"])
  )
  apply_head = ogv.tapped_vmap(lambda state, h: nnx.merge(head, state)(h))
  out = apply_head(params["head"], carriers["head"], h)[..., 0]
  return jnp.mean((out - ys) ** 2, axis=1)


@pytest.mark.parametrize(
  "losses", [linen_tapped_losses, linen_vmapped_losses], ids=["tap", "tapped_vmap"]
)
def test_linen_nn_scan_recipe_equals_the_stacked_path(losses):
  model = LinenModel()
  xs, ys, _ = task_data(0)
  with enable_x64(True):
    params = jax.tree.map(
      lambda p: p.astype(jnp.float64), model.init(jax.random.key(0), xs[0])["params"]
    )
    tx = ogv.gradvac(TASKS, 0.3, granularity=GRANULARITY)

    def task_loss(params, x, y):
      return jnp.mean((model.apply({"params": params}, x) - y) ** 2)

    stacked = jax.jit(
      lambda p, s, x, y: tx.update(ogv.task_value_and_grad(task_loss)(p, x, y)[1], s, p)
    )
    tapped = jax.jit(ogv.tapped_value_and_grad(losses, tx))
    state = tx.init(params)
    assert len(ogv.group_names(params, GRANULARITY)) == 2 * LAYERS + 2  # Dense, LayerNorm
    for step in range(3):
      xs, ys, _ = task_data(step)
      updates, new_state = stacked(params, state, xs, ys)
      _, tapped_updates, tapped_state = tapped(params, state, xs, ys)
      jax.tree.map(close, tapped_updates, updates)
      jax.tree.map(close, tapped_state, new_state)
      params, state = (
        optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)),
        new_state,
      )
    assert state.corrected.any()


@pytest.mark.parametrize(
  "losses", [nnx_tapped_losses, nnx_vmapped_losses], ids=["tap", "tapped_vmap"]
)
def test_nnx_scan_recipe_equals_the_stacked_path_and_trains_with_nnx_optimizer(losses):
  with enable_x64(True):
    model = NnxModel(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
    nnx.update(model, params)
    graphdefs = (nnx.graphdef(model.blocks), nnx.graphdef(model.head))
    tx = ogv.gradvac(TASKS, 0.3, granularity=GRANULARITY)

    def task_loss(params, x, y):
      return jnp.mean((nnx.merge(graphdef, params)(x) - y) ** 2)

    stacked = jax.jit(
      lambda p, s, x, y: tx.update(ogv.task_value_and_grad(task_loss)(p, x, y)[1], s, p)
    )
    tapped = jax.jit(ogv.tapped_value_and_grad(functools.partial(losses, graphdefs), tx))
    state = tx.init(params)
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    first = np.array(jax.tree.leaves(params["blocks"])[0])
    for step in range(3):
      xs, ys, _ = task_data(step)
      params = nnx.state(model, nnx.Param)
      updates, new_state = stacked(params, state, xs, ys)
      _, tapped_updates, tapped_state = tapped(params, state, xs, ys)
      jax.tree.map(close, tapped_updates, updates)
      jax.tree.map(close, tapped_state, new_state)
      optimizer.update(model, tapped_updates)
      state = tapped_state
    assert int(state.count) == 3
    assert not np.allclose(jax.tree.leaves(nnx.state(model, nnx.Param)["blocks"])[0], first)


def mlp_params(depth: int, width: int) -> dict:
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(depth, width, width)) / np.sqrt(width)
  return {
    "blocks": {"kernel": kernel.astype(np.float32), "bias": np.zeros((depth, width), np.float32)}
  }


def mlp_layer(params, h):
  return jnp.tanh(h @ params["kernel"] + params["bias"])


def scratch(step, params, state) -> int:
  """Floats of scratch memory of the jitted ``step(params, state)``."""
  compiled = jax.jit(step).lower(params, state).compile()
  return compiled.memory_analysis().temp_size_in_bytes // 4


def scanned_steps(num_tasks: int, depth: int, width: int, remat: bool) -> dict:
  """The steps of a scanned MLP, on fixed batches: plain, stacked, tap and tapped_vmap."""
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(num_tasks, 4, width)).astype(np.float32)
  ys = rng.normal(size=(num_tasks, 4, width)).astype(np.float32)
  tx = ogv.mgda(num_tasks, granularity=GRANULARITY)
  maybe_remat = jax.checkpoint if remat else lambda fn: fn
  body = maybe_remat(mlp_layer)
  tapped_layer = ogv.tapped_vmap(mlp_layer)

  def task_loss(params, x, y):
    h, _ = jax.lax.scan(lambda h, p: (body(p, h), None), x, params["blocks"])
    return jnp.mean((h - y) ** 2)

  def losses_with(layer):
    def losses(params, carriers, xs, ys):
      h, _ = jax.lax.scan(maybe_remat(layer), xs, (params["blocks"], carriers["blocks"]))
      return jnp.mean((h - ys) ** 2, axis=(1, 2))

    return losses

  def plain(params, state):
    return jax.grad(lambda p: jax.vmap(task_loss, (None, 0, 0))(p, xs, ys).sum())(params), state

  def stacked(params, state):
    return tx.update(ogv.task_value_and_grad(task_loss)(params, xs, ys)[1], state, params)

  def tapped(layer):
    step = ogv.tapped_value_and_grad(losses_with(layer), tx)
    return lambda params, state: step(params, state, xs, ys)[1:]

  params = mlp_params(depth, width)
  steps = {
    "plain": plain,
    "stacked": stacked,
    "tap": tapped(lambda h, slices: (jax.vmap(mlp_layer)(ogv.tap(*slices), h), None)),
    "tapped_vmap": tapped(lambda h, slices: (tapped_layer(*slices, h), None)),
  }
  state = tx.init(params)
  return {name: scratch(step, params, state) for name, step in steps.items()}


@pytest.mark.parametrize("num_tasks", [8, 32])
def test_in_scan_step_holds_one_layer_of_per_task_gradients(num_tasks):
  """Scratch at most the plain step's (same remat) plus 3 T x the largest layer leaf.

  A 16-layer scanned MLP of width 64 (``P`` = 66,560 floats, the largest layer
  leaf ``M`` = 4,096): the bound is plain + 0.74 P at T = 8 and + 5.9 P at T = 32,
  while the stacked step holds the ``T x P`` stacked gradients and more. With the
  body under ``jax.checkpoint`` both taps meet it; without, ``tapped_vmap`` does,
  and ``tap`` keeps its ``[T, ...]`` copies of every layer's parameters.
  """
  depth, width = 16, 64
  size, largest = depth * (width * width + width), width * width
  remat = scanned_steps(num_tasks, depth, width, remat=True)
  bound = remat["plain"] + 3 * num_tasks * largest
  assert remat["tap"] <= bound, (remat["tap"] / size, bound / size)
  assert remat["tapped_vmap"] <= bound, (remat["tapped_vmap"] / size, bound / size)
  assert remat["stacked"] > num_tasks * size > bound  # what the taps save

  no_remat = scanned_steps(num_tasks, depth, width, remat=False)
  bound = no_remat["plain"] + 3 * num_tasks * largest
  assert no_remat["tapped_vmap"] <= bound, (no_remat["tapped_vmap"] / size, bound / size)
  # The tap's copies, saved for the backward pass: T x P less one layer's.
  assert no_remat["tap"] > num_tasks * (size - largest - width) > bound


@pytest.mark.parametrize("num_tasks", [8, 32])
def test_tapped_vmap_in_a_python_loop_holds_one_layer_of_per_task_gradients(num_tasks):
  """Layers of a Python loop, each run by tapped_vmap: the same bound as in a scan.

  16 layers of width 64, no remat: at most the plain step's scratch plus 3 T x a
  layer's kernel. Each layer's input gradient waits for its update, so XLA cannot
  run the layers before it ahead. ``tap`` on the same loop keeps every layer's
  ``[T, ...]`` copies (more than ``T x P`` less one layer).
  """
  depth, width = 16, 64
  layer = width * width + width
  rng = np.random.default_rng(1)
  xs = rng.normal(size=(num_tasks, 4, width)).astype(np.float32)
  tx = ogv.mgda(num_tasks, granularity="layer")
  tapped_layer = ogv.tapped_vmap(mlp_layer)
  stack = mlp_params(depth, width)["blocks"]
  params = {f"layer_{i:02d}": jax.tree.map(lambda a, i=i: a[i], stack) for i in range(depth)}

  def plain(params, state):
    def loss(params, x):
      for name in params:
        x = mlp_layer(params[name], x)
      return jnp.sum(x**2)

    return jax.grad(lambda p: jax.vmap(loss, (None, 0))(p, xs).sum())(params), state

  def looped(apply):
    def losses(params, carriers, xs):
      for name in params:
        xs = apply(params[name], carriers[name], xs)
      return jnp.sum(xs**2, axis=(1, 2))

    step = ogv.tapped_value_and_grad(losses, tx)
    return lambda params, state: step(params, state, xs)[1:]

  def tap_apply(params, carriers, xs):
    return jax.vmap(mlp_layer)(ogv.tap(params, carriers), xs)

  steps = {"plain": plain, "tapped_vmap": looped(tapped_layer), "tap": looped(tap_apply)}
  held = {name: scratch(step, params, tx.init(params)) for name, step in steps.items()}
  bound = held["plain"] + 3 * num_tasks * width * width
  assert held["tapped_vmap"] <= bound, (held, bound)
  assert held["tap"] > num_tasks * (depth - 1) * layer > bound, (held, bound)


def simple_losses(params, carriers, xs):
  tapped = ogv.tap(params, carriers)
  return jax.vmap(lambda p, x: jnp.sum((x @ p["dense"]["kernel"] + p["dense"]["bias"]) ** 2))(
    tapped, xs
  )


SIMPLE = {"dense": {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}}
XS = np.ones((TASKS, 1, 2), np.float32)


def test_bad_uses_are_reported_at_trace_time():
  tx = ogv.mgda(TASKS, granularity="layer")
  state = tx.init(SIMPLE)

  def call(losses, tx=tx, params=SIMPLE):
    return ogv.tapped_value_and_grad(losses, tx)(params, state, XS)

  with pytest.raises(TypeError, match="not wrapped in a chain"):
    ogv.tapped_value_and_grad(simple_losses, optax.chain(tx))
  with pytest.raises(ValueError, match="gradnorm needs the losses"):
    ogv.tapped_value_and_grad(simple_losses, ogv.gradnorm(TASKS))

  def split_group(params, carriers, xs):
    kernel = ogv.tap(params["dense"]["kernel"], carriers["dense"]["kernel"])
    bias = ogv.tap(params["dense"]["bias"], carriers["dense"]["bias"])
    return jax.vmap(lambda k, b, x: jnp.sum(x @ k + b))(kernel, bias, xs)

  with pytest.raises(
    ValueError, match="group 'dense' has 2 parameter leaves but this tap is given 1"
  ):
    call(split_group)

  def untapped(params, carriers, xs):
    return jnp.sum(xs @ params["dense"]["kernel"], axis=(1, 2))

  with pytest.raises(ValueError, match=r"group\(s\) \['dense'\] were not tapped"):
    call(untapped)
  with pytest.raises(TypeError, match="'dense/bias' is an array, not a Carrier"):
    call(lambda params, carriers, xs: simple_losses(params, params, xs))
  with pytest.raises(ValueError, match="the carriers must have the structure of the parameters"):
    call(lambda params, carriers, xs: simple_losses(params, carriers["dense"], xs))
  with pytest.raises(ValueError, match=r"must return the \[3\] per-task losses, got shape \(\)"):
    call(lambda params, carriers, xs: simple_losses(params, carriers, xs).sum())

  stacked = mlp_params(2, 2)
  stacked_tx = ogv.mgda(TASKS, granularity=GRANULARITY)

  def unscanned(params, carriers, xs):
    tapped = ogv.tap(params, carriers)
    return jax.vmap(lambda p, x: jnp.sum(x @ p["blocks"]["kernel"][0]))(tapped, xs)

  with pytest.raises(ValueError, match="'blocks/bias' is tapped with the carrier of 2 stacked"):
    ogv.tapped_value_and_grad(unscanned, stacked_tx)(stacked, stacked_tx.init(stacked), XS)


def test_an_untapped_embedding_gets_the_plain_gradient_of_the_summed_losses():
  """The scaling guide's huge-embedding recipe: one gradient for it, the surgery for the rest."""
  params = init_params()
  embed, rest = params["embed"], {name: params[name] for name in ("blocks", "head")}
  xs, ys, poison = task_data(0)
  tx = ogv.gradvac(TASKS, 0.3, granularity=GRANULARITY)

  def losses(rest, carriers, embed, xs, ys):
    embedded = jax.vmap(lambda x: jnp.tanh(x @ embed["kernel"] + embed["bias"]))(xs)
    return tapped_blocks_and_head(rest, carriers, embedded, ys, poison)

  with enable_x64(True):
    state = tx.init(rest)
    step = jax.jit(ogv.tapped_value_and_grad(losses, tx, summed_argnums=0))
    _, (updates, embed_grads), new_state = step(rest, state, embed, xs, ys)
    _, stacked = ogv.task_value_and_grad(task_loss)(params, xs, ys, np.zeros(TASKS, bool))
    expected, expected_state = tx.update({name: stacked[name] for name in rest}, state, rest)
    jax.tree.map(close, updates, expected)
    jax.tree.map(close, new_state, expected_state)
    jax.tree.map(close, embed_grads, jax.tree.map(lambda g: g.sum(0), stacked["embed"]))
    with pytest.raises(ValueError, match="summed_argnums has 3, but the step was given 3"):
      ogv.tapped_value_and_grad(losses, tx, summed_argnums=3)(rest, state, embed, xs, ys)


def test_tapped_vmap_passes_the_summed_gradient_to_what_fn_closes_over():
  """A skip connection from an untapped embedding, closed over by a tapped block.

  The reference is the same losses with ``tap``, where the closure is ordinary
  autodiff through ``jax.vmap``.
  """
  params = init_params()
  embed, rest = params["embed"], {name: params[name] for name in ("blocks", "head")}
  xs, ys, poison = task_data(0)
  tx = ogv.upgrad(TASKS, granularity=GRANULARITY)

  def losses_with(skip_block):
    def losses(rest, carriers, embed, xs, ys):
      embedded = jax.vmap(lambda x: jnp.tanh(x @ embed["kernel"] + embed["bias"]))(xs)
      h, _ = jax.lax.scan(
        lambda h, slices: (skip_block(embed["bias"], *slices, h), None),
        embedded,
        (rest["blocks"], carriers["blocks"]),
      )
      head = ogv.tap(rest["head"], carriers["head"])
      return jax.vmap(head_loss, (0, 0, 0, None))(head, h, ys, poison)

    return losses

  def with_tap(bias, layer, carriers, h):
    return jax.vmap(lambda p, h: block(p, h) + bias)(ogv.tap(layer, carriers), h)

  def with_tapped_vmap(bias, layer, carriers, h):
    return ogv.tapped_vmap(lambda p, h: block(p, h) + bias)(layer, carriers, h)

  with enable_x64(True):
    state = tx.init(rest)
    results = [
      jax.jit(ogv.tapped_value_and_grad(losses_with(skip), tx, summed_argnums=0))(
        rest, state, embed, xs, ys
      )
      for skip in (with_tap, with_tapped_vmap)
    ]
  jax.tree.map(close, results[1], results[0])
  assert np.abs(results[0][1][1]["bias"]).min() > 0  # the skip's gradient reached the bias


def test_tapped_vmap_reports_arguments_without_the_task_axis():
  tx = ogv.mgda(TASKS, granularity="layer")
  dense = ogv.tapped_vmap(lambda p, x: x @ p["dense"]["kernel"] + p["dense"]["bias"])

  def losses(params, carriers, xs):
    return jnp.sum(dense(params, carriers, xs[0]), axis=1)

  with pytest.raises(ValueError, match=r"args\[0\] has shape \(1, 2\): every argument"):
    ogv.tapped_value_and_grad(losses, tx)(SIMPLE, tx.init(SIMPLE), XS)


def test_aux_comes_back_with_the_losses():
  tx = ogv.mgda(TASKS, granularity="layer")

  def losses_and_aux(params, carriers, xs):
    losses = simple_losses(params, carriers, xs)
    return losses, {"largest": jnp.max(losses)}

  step = jax.jit(ogv.tapped_value_and_grad(losses_and_aux, tx, has_aux=True))
  (losses, aux), updates, state = step(SIMPLE, tx.init(SIMPLE), XS)
  plain = jax.jit(ogv.tapped_value_and_grad(simple_losses, tx))(SIMPLE, tx.init(SIMPLE), XS)
  np.testing.assert_array_equal(losses, plain[0])
  assert float(aux["largest"]) == float(jnp.max(plain[0]))
  jax.tree.map(np.testing.assert_array_equal, (updates, state), plain[1:])
