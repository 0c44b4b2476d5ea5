"""Per-layer groups of scanned models: the same groups and results as unrolled blocks."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_gradvac as ogv

NUM_LAYERS, WIDTH, NUM_TASKS = 4, 6, 3


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.LayerNorm()(jnp.tanh(nn.Dense(WIDTH)(x))), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    blocks = nn.scan(
      Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=NUM_LAYERS
    )
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(1, name="head")(x)


class Unrolled(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH, name="embed")(x)
    for layer in range(NUM_LAYERS):
      x, _ = Block(name=f"blocks_{layer}")(x, None)
    return nn.Dense(1, name="head")(x)


def unroll(tree):
  """The scanned tree's stacked `blocks` as `blocks_0`, `blocks_1`, ..."""
  tree = dict(tree)
  stacked = tree.pop("blocks")
  for layer in range(NUM_LAYERS):
    tree[f"blocks_{layer}"] = jax.tree.map(lambda leaf, layer=layer: leaf[layer], stacked)
  return tree


def unroll_task_grads(tree):
  tree = dict(tree)
  stacked = tree.pop("blocks")
  for layer in range(NUM_LAYERS):
    tree[f"blocks_{layer}"] = jax.tree.map(lambda leaf, layer=layer: leaf[:, layer], stacked)
  return tree


def task_batches(seed):
  rng = np.random.default_rng(seed)
  xs = rng.normal(size=(NUM_TASKS, 8, 5)).astype(np.float32)
  signs = np.array([1.0, -1.0, 0.5])[:, None]
  return jnp.asarray(xs), jnp.asarray(signs * xs.sum(-1) + rng.normal(size=(NUM_TASKS, 8)))


def losses_of(model):
  def loss(params, x, y):
    return jnp.mean((model.apply({"params": params}, x)[:, 0] - y) ** 2)

  return jax.jit(ogv.task_value_and_grad(loss))


def test_scanned_blocks_give_one_group_per_layer_in_unrolled_order():
  params = Scanned().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  names = ogv.group_names(params, ogv.StackedLayers("blocks"))
  expected = [
    name.replace("blocks_", "blocks/") for name in ogv.group_names(unroll(params), "layer")
  ]
  assert list(names) == expected
  assert "blocks/3/Dense_0" in names and len(names) == 2 * NUM_LAYERS + 2
  assert ogv.group_names(params, "layer").count("blocks/Dense_0") == 1  # what "layer" merges
  tensors = ogv.group_names(params, ogv.StackedLayers("blocks", granularity="tensor"))
  assert tensors == tuple(
    name.replace("blocks_", "blocks/") for name in ogv.group_names(unroll(params), "tensor")
  )


@pytest.mark.parametrize(
  "make",
  [
    lambda granularity: ogv.gradvac(NUM_TASKS, 0.3, granularity=granularity, key=1),
    lambda granularity: ogv.pcgrad(NUM_TASKS, granularity=granularity, key=2),
  ],
  ids=["gradvac", "pcgrad"],
)
@pytest.mark.parametrize("inner", ["layer", "tensor"])
def test_scanned_model_matches_the_unrolled_model_over_steps(make, inner):
  scanned_params = Scanned().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
  unrolled_params = unroll(scanned_params)
  scanned_tx = optax.chain(make(ogv.StackedLayers("blocks", granularity=inner)), optax.sgd(0.1))
  unrolled_tx = optax.chain(make(inner), optax.sgd(0.1))
  scanned_state, unrolled_state = scanned_tx.init(scanned_params), unrolled_tx.init(unrolled_params)
  scanned_grads_fn, unrolled_grads_fn = losses_of(Scanned()), losses_of(Unrolled())
  for step in range(3):
    xs, ys = task_batches(step)
    _, scanned_grads = scanned_grads_fn(scanned_params, xs, ys)
    # The two models agree up to the rounding of their different loops; the
    # transforms then get exactly the same numbers.
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4),
      unroll_task_grads(scanned_grads),
      unrolled_grads_fn(unrolled_params, xs, ys)[1],
    )
    unrolled_grads = unroll_task_grads(scanned_grads)
    scanned_updates, scanned_state = jax.jit(scanned_tx.update)(
      scanned_grads, scanned_state, scanned_params
    )
    unrolled_updates, unrolled_state = jax.jit(unrolled_tx.update)(
      unrolled_grads, unrolled_state, unrolled_params
    )
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
      unroll(scanned_updates),
      unrolled_updates,
    )
    for field in ["targets", "cosine", "corrected", "weights"]:
      np.testing.assert_allclose(
        getattr(scanned_state[0], field), getattr(unrolled_state[0], field), atol=1e-5
      )
    scanned_params = optax.apply_updates(scanned_params, scanned_updates)
    unrolled_params = optax.apply_updates(unrolled_params, unrolled_updates)
  assert unrolled_state[0].corrected.any()
  summary = ogv.similarity_summary(
    scanned_state, scanned_params, ogv.StackedLayers("blocks", granularity=inner)
  )
  assert any(name.startswith("blocks/3/") for name in summary["cosine"])


def test_nnx_stacked_blocks_give_per_layer_groups_at_init_and_update():
  class Model(nnx.Module):
    def __init__(self, rngs):
      @nnx.split_rngs(splits=NUM_LAYERS)
      @nnx.vmap(in_axes=(0,), out_axes=0)
      def make_blocks(rngs):
        return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

      self.blocks = make_blocks(rngs)
      self.head = nnx.Linear(WIDTH, 1, rngs=rngs)

    def __call__(self, x):
      @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
      def forward(block, x):
        return jnp.tanh(block(x))

      return self.head(forward(self.blocks, x))

  model = Model(nnx.Rngs(0))
  granularity = ogv.StackedLayers("blocks")
  optimizer = nnx.Optimizer(model, ogv.gradvac(NUM_TASKS, granularity=granularity), wrt=nnx.Param)

  def loss(model, x, y):
    return jnp.mean((model(x)[:, 0] - y) ** 2)

  per_task = nnx.vmap(nnx.value_and_grad(loss), in_axes=(None, 0, 0))
  xs, ys = task_batches(0)
  xs = jnp.concatenate([xs, xs[..., :1]], -1)  # WIDTH inputs
  _, grads = per_task(model, xs, ys)
  optimizer.update(model, grads)
  params = nnx.state(model, nnx.Param)
  names = ogv.group_names(params, granularity)
  assert names == (*[f"blocks/{layer}" for layer in range(NUM_LAYERS)], "head")
  summary = ogv.similarity_summary(optimizer.opt_state, params, granularity)
  assert set(summary["cosine"]) == set(names) and int(summary["count"]) == 1


def test_bad_stacked_layers_are_rejected():
  params = {"blocks": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones((4, 2))}}
  mismatch = r"'blocks/kernel' stacks 3 layers .* but 'blocks/bias' under the same prefix 'blocks'"
  with pytest.raises(ValueError, match=mismatch):
    ogv.group_names(params, ogv.StackedLayers("blocks"))
  with pytest.raises(ValueError, match="no leaf lies under the prefix 'encoder'"):
    ogv.group_names(params, ogv.StackedLayers("encoder"))
  with pytest.raises(ValueError, match="granularity must be 'layer' or 'tensor'"):
    ogv.StackedLayers("blocks", granularity="model")
  with pytest.raises(ValueError, match="no stacked layer axis"):
    ogv.group_names({"blocks": {"scale": jnp.ones(())}}, ogv.StackedLayers("blocks"))
