"""Models of other frameworks: layer groups that follow their names, stacked layers, errors.

Equinox and Haiku are optional (the ``frameworks`` extra): a test that needs one
skips without it. The guides (``docs/guides/equinox.md``, ``haiku.md`` and
``keras.md``, run by ``tests/test_docs.py``) train with each framework; this
module checks what they rest on: the groups of trees keyed by paths, the stacked
layers of ``eqx.filter_vmap`` and ``hk.layer_stack`` against the same models
unrolled (the same outputs; the same updates and targets on the same per-task
gradients), and the errors that name the fix.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gradvac as ogv
from optax_gradvac import _pytree

NUM_TASKS, NUM_LAYERS, WIDTH = 3, 3, 4

# The outputs of the unrolled model and of the scanned one (entries of order 1)
# differ at most by the rounding of float32 sums over WIDTH terms per layer,
# compounded over the layers: a few eps. On the same gradients the
# transformations differ only by the order of their float32 sums.
MODEL_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
SAME_GRADIENTS_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


def _tasks(seed: int) -> tuple[jax.Array, jax.Array]:
  """``[T, 8, WIDTH]`` inputs and ``[T, 8]`` targets of tasks that pull different ways."""
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(NUM_TASKS, 8, WIDTH)).astype(np.float32)
  directions = rng.normal(size=(NUM_TASKS, WIDTH)).astype(np.float32)
  return jnp.asarray(xs), jnp.asarray(np.einsum("tbi,ti->tb", xs, directions))


def _task_gradients(params, seed: int):
  """Random per-task gradients shaped like ``params``, ``[T, *param.shape]`` per leaf."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda leaf: jnp.asarray(rng.normal(size=(NUM_TASKS, *leaf.shape)), jnp.float32), params
  )


def _assert_close(actual, expected, tolerance):
  jax.tree.map(lambda a, e: np.testing.assert_allclose(a, e, **tolerance), actual, expected)


def _steps(tx, params, grads_of_step, num_steps=2):
  """``num_steps`` jitted updates on ``grads_of_step(step)``: the updates and state of each."""
  update = jax.jit(tx.update)
  state, history = tx.init(params), []
  for step in range(num_steps):
    updates, state = update(grads_of_step(step), state, params)
    history.append((updates, state))
  return history


# Groups: the model's own names, in nested trees and in flat dicts keyed by paths.

NESTED = {
  "dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
  "head": {"kernel": jnp.zeros((3, 1))},
  "scale": jnp.zeros(()),
}
FLAT = {"dense/kernel": NESTED["dense"]["kernel"], "dense/bias": NESTED["dense"]["bias"],
        "head/kernel": NESTED["head"]["kernel"], "scale": NESTED["scale"]}  # fmt: skip


def test_a_dict_keyed_by_paths_gives_the_nested_trees_groups():
  assert ogv.group_names(FLAT, "layer") == ("dense", "head", "scale")
  # The same leaves in the same order, in the same groups: the same arithmetic.
  assert _pytree.leaf_groups(FLAT, "layer") == _pytree.leaf_groups(NESTED, "layer")
  assert _pytree.leaf_groups(FLAT, "tensor") == _pytree.leaf_groups(NESTED, "tensor")
  assert list(map(id, jax.tree.leaves(FLAT))) == list(map(id, jax.tree.leaves(NESTED)))


def test_top_level_arrays_are_groups_of_their_own():
  haiku_like = {"~": {"w": jnp.zeros(2), "b": jnp.zeros(2)}, "mlp/~/linear_0": {"w": jnp.zeros(2)}}
  assert ogv.group_names(haiku_like, "layer") == ("mlp/~/linear_0", "~/b", "~/w")
  assert ogv.group_names([jnp.zeros(2), jnp.zeros(3)], "layer") == ("0", "1")
  assert ogv.group_names({"w": jnp.zeros(2), "b": jnp.zeros(2)}, "layer") == ("b", "w")


# Equinox: modules, filter_vmap stacks.


@pytest.fixture(scope="module")
def eqx():
  return pytest.importorskip("equinox")


def _equinox_models(eqx):
  class Stacked(eqx.Module):
    blocks: eqx.nn.Linear  # NUM_LAYERS blocks, stacked by eqx.filter_vmap
    head: eqx.nn.Linear

    def __call__(self, x):
      blocks, static = eqx.partition(self.blocks, eqx.is_array)

      def block(x, layer):
        return jnp.tanh(eqx.combine(layer, static)(x)), None

      return self.head(jax.lax.scan(block, x, blocks)[0])[0]

  class Unrolled(eqx.Module):
    blocks: list
    head: eqx.nn.Linear

    def __call__(self, x):
      for block in self.blocks:
        x = jnp.tanh(block(x))
      return self.head(x)[0]

  def unroll(tree, axis):
    """A stacked model's tree as the unrolled model's: slice ``n`` of ``blocks`` is block ``n``."""
    blocks = [
      jax.tree.map(lambda leaf, n=n: jnp.take(leaf, n, axis=axis), tree.blocks)
      for n in range(NUM_LAYERS)
    ]
    return Unrolled(blocks, tree.head)

  keys = jax.random.split(jax.random.key(0), NUM_LAYERS + 1)
  make = lambda key: eqx.nn.Linear(WIDTH, WIDTH, key=key)  # noqa: E731
  stacked = Stacked(eqx.filter_vmap(make)(keys[:NUM_LAYERS]), eqx.nn.Linear(WIDTH, 1, key=keys[-1]))
  return stacked, unroll(stacked, 0), unroll


def test_equinox_filter_vmap_stack_gives_the_unrolled_models_groups_and_results(eqx):
  stacked, unrolled, unroll = _equinox_models(eqx)
  stacked_params = eqx.filter(stacked, eqx.is_inexact_array)
  unrolled_params = eqx.filter(unrolled, eqx.is_inexact_array)
  granularity = ogv.StackedLayers("blocks")
  names = ogv.group_names(stacked_params, granularity)
  assert names == ogv.group_names(unrolled_params, "layer")
  assert names == ("blocks/0", "blocks/1", "blocks/2", "head")
  inputs = _tasks(0)[0][0]
  _assert_close(jax.vmap(stacked)(inputs), jax.vmap(unrolled)(inputs), MODEL_TOLERANCE)
  grads = [_task_gradients(stacked_params, step) for step in range(2)]
  make = functools.partial(ogv.gradvac, NUM_TASKS, 0.5, key=1)
  stacked_history = _steps(make(granularity=granularity), stacked_params, lambda step: grads[step])
  unrolled_history = _steps(
    make(granularity="layer"), unrolled_params, lambda step: unroll(grads[step], 1)
  )
  for (stacked_updates, stacked_state), (unrolled_updates, unrolled_state) in zip(
    stacked_history, unrolled_history, strict=True
  ):
    _assert_close(unroll(stacked_updates, 0), unrolled_updates, SAME_GRADIENTS_TOLERANCE)
    _assert_close(stacked_state.targets, unrolled_state.targets, SAME_GRADIENTS_TOLERANCE)
  assert unrolled_history[-1][1].corrected.any()
  updated = eqx.apply_updates(stacked, stacked_history[-1][0])
  assert updated.blocks.weight.shape == (NUM_LAYERS, WIDTH, WIDTH)


def test_equinox_modules_whole_get_an_error_naming_the_fix(eqx):
  model = eqx.nn.MLP(WIDTH, 1, WIDTH, 1, key=jax.random.key(0))
  fix = r"eqx\.partition\(model, eqx\.is_inexact_array\).*eqx\.filter_value_and_grad"
  with pytest.raises(
    TypeError, match=r"gradvac: parameter leaf 'activation' is not an array: got custom_jvp.*" + fix
  ):
    ogv.gradvac(NUM_TASKS).init(model)

  def loss(model, x, y):
    return jnp.mean((jax.vmap(model)(x)[:, 0] - y) ** 2)

  with pytest.raises(
    TypeError, match=r"task_value_and_grad: parameter leaf 'activation' is not an array.*" + fix
  ):
    ogv.task_value_and_grad(loss)(model, *_tasks(0))
  with pytest.raises(
    TypeError, match=r"segment_value_and_grad: parameter leaf 'activation'.*" + fix
  ):
    ogv.segment_value_and_grad(loss, NUM_TASKS)(model, jnp.zeros(8, jnp.int32), *_tasks(0))
  # Without Equinox in the tree, no word of it.
  with pytest.raises(TypeError, match=r"gradvac: parameter leaf 'f' is not an array") as error:
    ogv.gradvac(NUM_TASKS).init({"f": jnp.tanh})
  assert "eqx" not in str(error.value)


# Haiku: hk.layer_stack.


def test_haiku_layer_stack_gives_the_unrolled_models_groups_and_results():
  hk = pytest.importorskip("haiku")

  def stacked_forward(x):
    x = hk.Linear(WIDTH, name="embed")(x)
    x = hk.layer_stack(NUM_LAYERS)(lambda x: jnp.tanh(hk.Linear(WIDTH)(x)))(x)
    return hk.Linear(1, name="head")(x)[:, 0]

  def unrolled_forward(x):
    x = hk.Linear(WIDTH, name="embed")(x)
    for _ in range(NUM_LAYERS):
      x = jnp.tanh(hk.Linear(WIDTH)(x))
    return hk.Linear(1, name="head")(x)[:, 0]

  stacked, unrolled = (
    hk.without_apply_rng(hk.transform(forward)) for forward in (stacked_forward, unrolled_forward)
  )
  stack = "__layer_stack_no_per_layer"
  stacked_params = stacked.init(jax.random.key(0), jnp.zeros((1, WIDTH)))
  layer_names = ["linear", *(f"linear_{n}" for n in range(1, NUM_LAYERS))]

  def unroll(tree, axis):
    tree = dict(tree)
    layers = tree.pop(f"{stack}/linear")
    for n, name in enumerate(layer_names):
      tree[name] = jax.tree.map(lambda leaf, n=n: jnp.take(leaf, n, axis=axis), layers)
    return tree

  unrolled_params = unroll(stacked_params, 0)
  shapes = jax.tree.map(
    jnp.shape, jax.eval_shape(unrolled.init, jax.random.key(0), jnp.zeros((1, WIDTH)))
  )
  assert jax.tree.map(jnp.shape, unrolled_params) == shapes
  granularity = ogv.StackedLayers(stack)
  names = ogv.group_names(stacked_params, granularity)
  assert names == (*(f"{stack}/{n}/linear" for n in range(NUM_LAYERS)), "embed", "head")
  # The unrolled model's groups are the same, named and ordered after its own paths.
  renamed = {f"{stack}/{n}/linear": name for n, name in enumerate(layer_names)}
  assert sorted(renamed.get(name, name) for name in names) == list(
    ogv.group_names(unrolled_params, "layer")
  )

  inputs = _tasks(0)[0][0]
  _assert_close(
    stacked.apply(stacked_params, inputs), unrolled.apply(unrolled_params, inputs), MODEL_TOLERANCE
  )
  grads = [_task_gradients(stacked_params, step) for step in range(2)]
  # No shuffling: the two transformations number their groups differently.
  make = functools.partial(ogv.gradvac, NUM_TASKS, 0.5, shuffle=False)
  stacked_history = _steps(make(granularity=granularity), stacked_params, lambda step: grads[step])
  unrolled_history = _steps(
    make(granularity="layer"), unrolled_params, lambda step: unroll(grads[step], 1)
  )
  unrolled_names = ogv.group_names(unrolled_params, "layer")
  for (stacked_updates, stacked_state), (unrolled_updates, unrolled_state) in zip(
    stacked_history, unrolled_history, strict=True
  ):
    _assert_close(unroll(stacked_updates, 0), unrolled_updates, SAME_GRADIENTS_TOLERANCE)
    for index, name in enumerate(names):
      np.testing.assert_allclose(
        stacked_state.targets[index],
        unrolled_state.targets[unrolled_names.index(renamed.get(name, name))],
        **SAME_GRADIENTS_TOLERANCE,
      )
  assert unrolled_history[-1][1].corrected.any()
