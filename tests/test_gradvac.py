"""The paper's invariants, special inputs and input errors of gradvac and pcgrad."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv
from optax_gradvac import _pytree


def random_grads(seed: int, num_tasks: int = 4, scale: float = 1.0) -> dict:
  """Per-task gradients of a two-layer tree; tasks 0 and 1 oppose the rest."""
  rng = np.random.default_rng(seed)
  signs = np.array([-1.0, -0.5, 1.0, 2.0, 1.5, -1.0, 0.7, 1.0][:num_tasks])
  tree = {}
  for layer, shape in {"dense_0": (6, 5), "dense_1": (5, 3)}.items():
    shared = rng.normal(size=shape)
    kernel = signs.reshape(-1, 1, 1) * shared + 0.8 * rng.normal(size=(num_tasks, *shape))
    tree[layer] = {
      "kernel": jnp.asarray(kernel * scale, jnp.float32),
      "bias": jnp.asarray(rng.normal(size=(num_tasks, shape[1])) * scale, jnp.float32),
    }
  return tree


def params_like(grads: dict) -> dict:
  return jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), grads)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


# The paper's invariants.


@pytest.mark.parametrize("num_tasks", [2, 5])
def test_corrected_gradient_has_the_target_cosine(num_tasks):
  """After its last correction, cos(g_i', g_j) equals the target it was compared with."""
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(num_tasks, 20))
  targets = rng.uniform(0.2, 0.9, size=(num_tasks, num_tasks))  # above most cosines
  order = np.array(
    [rng.permutation([j for j in range(num_tasks) if j != i]) for i in range(num_tasks)], int
  )
  with enable_x64(True):
    surgery = ogv.gradvac_coefficients(jnp.asarray(grads @ grads.T), targets, order, 0.1)
  corrected_grads = np.asarray(surgery.coefficients) @ grads
  checked = 0
  for i in range(num_tasks):
    last = order[i, -1]
    if surgery.corrected[i, last]:
      np.testing.assert_allclose(cosine(corrected_grads[i], grads[last]), targets[i, last], 1e-10)
      checked += 1
  assert checked >= num_tasks // 2


def test_ema_update_is_unconditional():
  """Pairs that are not corrected still move their targets towards the cosine."""
  grads = np.array([[1.0, 0.0], [1.0, 1.0]])  # cosine 1/sqrt(2), above the targets
  targets = np.zeros((2, 2))
  order = np.array([[1], [0]])
  surgery = ogv.gradvac_coefficients(jnp.asarray(grads @ grads.T), targets, order, 0.5)
  assert not surgery.corrected.any()
  np.testing.assert_allclose(surgery.targets, [[0, 0.5 / np.sqrt(2)], [0.5 / np.sqrt(2), 0]])


def test_zero_beta_and_zero_targets_is_pcgrad():
  grads = random_grads(0)
  params = params_like(grads)
  for granularity in ["model", "layer"]:
    gradvac = ogv.gradvac(4, beta=0.0, granularity=granularity, key=1)
    pcgrad = ogv.pcgrad(4, granularity=granularity, key=1)
    gv_state, pc_state = gradvac.init(params), pcgrad.init(params)
    gv_update, pc_update = jax.jit(gradvac.update), jax.jit(pcgrad.update)
    for step in range(3):
      grads = random_grads(step)
      gv_updates, gv_state = gv_update(grads, gv_state, params)
      pc_updates, pc_state = pc_update(grads, pc_state, params)
      jax.tree.map(np.testing.assert_array_equal, gv_updates, pc_updates)
    np.testing.assert_array_equal(gv_state.targets, 0)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_scaling_all_gradients_scales_the_update(scale):
  """eps is a division guard only: no absolute term meets a norm."""
  tx = ogv.gradvac(4, beta=0.2, granularity="layer", key=0)
  params = params_like(random_grads(0))
  state, scaled_state = tx.init(params), tx.init(params)
  update = jax.jit(tx.update)
  for step in range(5):
    grads = random_grads(step)
    updates, state = update(grads, state, params)
    scaled, scaled_state = update(jax.tree.map(lambda g: g * scale, grads), scaled_state, params)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(b / scale, a, rtol=2e-4, atol=1e-5), updates, scaled
    )
    np.testing.assert_allclose(scaled_state.targets, state.targets, atol=1e-5)
    np.testing.assert_array_equal(scaled_state.corrected, state.corrected)
  assert state.corrected.any()


@pytest.fixture(params=[False, True], ids=["one-cond", "cond-per-leaf"])
def cond_per_leaf(request, monkeypatch):
  """The overflow rescue with every leaf in one lax.cond (as small leaves share one on one
  device) and with one per leaf (as on a mesh)."""

  def chunks(views, limit):
    indices = list(range(len(views)))
    return [[index] for index in indices] if request.param else [indices]

  monkeypatch.setattr(_pytree, "_rescue_chunks", chunks)
  return request.param


@pytest.mark.parametrize("exponent", [70, 100])
def test_gradients_whose_squares_overflow_are_handled_exactly(exponent, cond_per_leaf):
  """Entries around 1e21-1e30 overflow float32 squared norms but are finite: no fallback."""
  scale = 2.0**exponent
  tx = ogv.gradvac(4, beta=0.2, granularity="layer", key=0)
  params = params_like(random_grads(0))
  state, scaled_state = tx.init(params), tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = random_grads(step)
    assert not np.isfinite(float(jnp.sum(jnp.square(grads["dense_0"]["kernel"][0] * scale))))
    updates, state = update(grads, state, params)
    scaled, scaled_state = update(jax.tree.map(lambda g: g * scale, grads), scaled_state, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b / scale, a, rtol=1e-6), updates, scaled)
    for field in ["count", "targets", "cosine", "corrected", "weights"]:
      np.testing.assert_allclose(getattr(scaled_state, field), getattr(state, field), rtol=1e-6)
  assert int(scaled_state.count) == 3 and state.corrected.any()


@pytest.mark.parametrize("method", ["imtl_g", "gradvac"])  # whole model, per layer
def test_the_overflow_rescue_holds_one_chunk_of_the_gradients(method):
  """XLA copies a ``lax.cond``'s operands: the update's scratch is one rescue chunk's.

  With every leaf in one conditional, the update held a second copy of all the
  stacked gradients. 48 leaves, T = 8, compiled from shapes, 24 chunks of a kernel and
  a bias of T gradients (520 KiB): the scratch is the copies of at most two chunks (the
  one checked and the next, which XLA may start before the first is freed: jaxlib
  0.10.1 holds one, 0.12.1 one and a half) and the update's ``[T, T]``-sized arrays,
  a twelfth of the gradients where one conditional for all held all of them.
  """
  num_tasks, width = 8, 128
  param = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)  # noqa: E731
  params = {f"dense_{i}": {"kernel": param(width, width), "bias": param(width)} for i in range(24)}
  grads = jax.tree.map(lambda p: param(num_tasks, *p.shape), params)
  views = [param(num_tasks, leaf.size // num_tasks) for leaf in jax.tree.leaves(grads)]
  chunks = _pytree._rescue_chunks(views, _pytree.chunk_limit(views))
  largest = max(sum(views[index].size * 4 for index in chunk) for chunk in chunks)
  stacked = sum(leaf.size * 4 for leaf in views)
  assert 1 < len(chunks) <= 48 and largest < stacked / 8
  tx = getattr(ogv, method)(num_tasks)
  compiled = jax.jit(tx.update).lower(grads, jax.eval_shape(tx.init, params), params).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert temp <= 2 * largest + 64 * 1024, (temp, largest, stacked)


def test_only_the_layer_that_overflows_is_rescaled(cond_per_leaf):
  """Layer groups are independent: scaling one layer by 2**80 scales its update alone."""
  scale = 2.0**80
  tx = ogv.gradvac(4, beta=0.2, granularity="layer", key=0)
  params = params_like(random_grads(0))
  state, scaled_state = tx.init(params), tx.init(params)
  update = jax.jit(tx.update)
  for step in range(3):
    grads = random_grads(step)
    huge = {**grads, "dense_0": jax.tree.map(lambda g: g * scale, grads["dense_0"])}
    updates, state = update(grads, state, params)
    scaled, scaled_state = update(huge, scaled_state, params)
    expected = {**updates, "dense_0": jax.tree.map(lambda u: u * scale, updates["dense_0"])}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6), expected, scaled)
    for field in ["count", "targets", "cosine", "corrected"]:
      np.testing.assert_allclose(getattr(scaled_state, field), getattr(state, field), rtol=1e-6)
  assert int(scaled_state.count) == 3 and state.corrected[0].any()


def test_only_the_stacked_layer_that_overflows_is_rescaled(cond_per_leaf):
  """A leaf of 3 stacked layers, one of them 2**80 larger: each layer is its own group."""
  keys = jax.random.split(jax.random.key(0), 2)
  grads = {
    "blocks": {"kernel": jax.random.normal(keys[0], (4, 3, 5, 5))},
    "head": jax.random.normal(keys[1], (4, 5)),
  }
  huge = {**grads, "blocks": {"kernel": grads["blocks"]["kernel"].at[:, 1].multiply(2.0**80)}}
  params = jax.tree.map(lambda g: g[0], grads)
  tx = ogv.gradvac(4, beta=0.2, granularity=ogv.StackedLayers("blocks"), key=0)
  assert len(ogv.group_names(params, ogv.StackedLayers("blocks"))) == 4
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  scaled, scaled_state = jax.jit(tx.update)(huge, tx.init(params), params)
  expected = {**updates, "blocks": {"kernel": updates["blocks"]["kernel"].at[1].multiply(2.0**80)}}
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, a, rtol=1e-6), expected, scaled)
  np.testing.assert_allclose(scaled_state.cosine, state.cosine, rtol=1e-6, atol=1e-7)
  assert state.corrected.any()


def test_weights_in_the_state_reproduce_the_update():
  """state.weights[g, t] is task t's weight in group g: sum_t w[g, t] grad_t is the update."""
  grads = random_grads(0)
  params = params_like(grads)
  for tx in [ogv.gradvac(4, 0.5), ogv.pcgrad(4, granularity="layer", reduction="mean")]:
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
    for group, layer in enumerate(["dense_0", "dense_1"]):
      for name, grad in grads[layer].items():
        expected = np.einsum("t,t...->...", np.asarray(state.weights[group]), np.asarray(grad))
        np.testing.assert_allclose(updates[layer][name], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(state.weights, state.weights[0, 0])  # surgery changed the weights


def test_random_orders_differ_across_rows_groups_and_steps():
  order = np.asarray(ogv.visiting_order(jax.random.key(0), 3, 6))
  assert order.shape == (3, 6, 5) and order.dtype == np.int32
  for group in order:
    for i, row in enumerate(group):
      assert sorted(row) == [j for j in range(6) if j != i]
  assert len({tuple(row) for row in order.reshape(-1, 5)}) > 10
  later = np.asarray(ogv.visiting_order(jax.random.key(1), 3, 6))
  assert not np.array_equal(order, later)


def test_no_shuffle_visits_in_ascending_order():
  order = np.asarray(ogv.visiting_order(jax.random.key(0), 2, 4, shuffle=False))
  expected = [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]]
  np.testing.assert_array_equal(order, [expected, expected])


# Special inputs.


def test_absent_task_takes_no_part():
  grads = random_grads(0)
  grads["dense_1"] = jax.tree.map(lambda g: g.at[2].set(0), grads["dense_1"])
  params = params_like(grads)
  tx = ogv.gradvac(4, beta=0.5, granularity="layer", shuffle=False)
  state = tx.init(params)._replace(targets=jnp.full((2, 4, 4), 0.3))
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  # dense_1 is group 1; task 2 is absent from it and present in dense_0.
  np.testing.assert_array_equal(new_state.targets[1, 2, :], np.float32(0.3))
  np.testing.assert_array_equal(new_state.targets[1, :, 2], np.float32(0.3))
  assert not new_state.corrected[1, 2, :].any() and not new_state.corrected[1, :, 2].any()
  np.testing.assert_array_equal(new_state.cosine[1, 2], 0)
  assert (new_state.targets[0, 2, [0, 1, 3]] != 0.3).all()
  # Without task 2, dense_1 gets GradVac on the other three tasks.
  three = ogv.gradvac(3, beta=0.5, granularity="layer", shuffle=False)
  without = jax.tree.map(lambda g: g[jnp.array([0, 1, 3])], grads)
  three_state = three.init(params)._replace(targets=jnp.full((2, 3, 3), 0.3))
  expected, _ = jax.jit(three.update)(without, three_state, params)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    updates["dense_1"],
    expected["dense_1"],
  )


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_a_non_finite_group_gives_its_plain_sum_and_the_state_is_kept(bad):
  """The group with a NaN or inf passes its sum; the others are unaffected."""
  grads = random_grads(0)
  params = params_like(grads)
  tx = ogv.gradvac(4, beta=0.5, granularity="layer")
  update = jax.jit(tx.update)
  _, state = update(random_grads(1), tx.init(params), params)
  clean, _ = update(grads, state, params)
  grads["dense_0"]["kernel"] = grads["dense_0"]["kernel"].at[1, 2, 3].set(bad)
  updates, new_state = update(grads, state, params)
  jax.tree.map(
    lambda u, g: np.testing.assert_allclose(u, g.sum(0), rtol=1e-6, atol=1e-6),
    updates["dense_0"],
    grads["dense_0"],
  )
  assert not np.isfinite(updates["dense_0"]["kernel"][2, 3])
  jax.tree.map(np.testing.assert_array_equal, updates["dense_1"], clean["dense_1"])
  assert not np.allclose(clean["dense_1"]["kernel"], grads["dense_1"]["kernel"].sum(0))
  jax.tree.map(
    np.testing.assert_array_equal,
    jax.random.key_data(new_state.key),
    jax.random.key_data(state.key),
  )
  for field in ["count", "targets", "cosine", "corrected", "weights"]:
    np.testing.assert_array_equal(getattr(new_state, field), getattr(state, field))


def test_identical_tasks_are_never_corrected():
  """Cosine exactly 1, targets driven to 1 by beta = 1: the update stays the sum."""
  grad = random_grads(0, num_tasks=1)
  grads = jax.tree.map(lambda g: jnp.repeat(g, 3, axis=0), grad)
  params = params_like(grads)
  tx = ogv.gradvac(3, beta=1.0, granularity="layer")
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    jax.tree.map(lambda u, g: np.testing.assert_allclose(u, 3 * g[0], rtol=1e-6), updates, grad)
    assert not state.corrected.any()
  np.testing.assert_array_equal(state.cosine[:, 0, 1], 1.0)
  np.testing.assert_array_equal(state.targets[:, 0, 1], 1.0)


def test_opposite_tasks_give_finite_updates():
  grad = random_grads(0, num_tasks=1)
  grads = jax.tree.map(lambda g: jnp.concatenate([g, -g, 2 * g]), grad)
  params = params_like(grads)
  tx = ogv.gradvac(3, beta=0.5)
  state = tx.init(params)._replace(targets=jnp.full((2, 3, 3), 0.999))
  update = jax.jit(tx.update)
  for _ in range(3):
    updates, state = update(grads, state, params)
    assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
    assert np.isfinite(state.targets).all()


def test_zero_gradients_give_zero_update_and_keep_targets():
  grads = jax.tree.map(jnp.zeros_like, random_grads(0))
  params = params_like(grads)
  tx = ogv.gradvac(4, beta=0.5)
  state = tx.init(params)._replace(targets=jnp.full((2, 4, 4), -0.2))
  updates, new_state = jax.jit(tx.update)(grads, state, params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0), updates)
  np.testing.assert_array_equal(new_state.targets, np.float32(-0.2))
  np.testing.assert_array_equal(new_state.cosine, 0)
  assert int(new_state.count) == 1


def test_one_task_returns_the_gradient_unchanged():
  grads = random_grads(0, num_tasks=1)
  params = params_like(grads)
  tx = ogv.gradvac(1)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params)
  jax.tree.map(lambda u, g: np.testing.assert_array_equal(u, g[0]), updates, grads)
  assert state.targets.shape == (2, 1, 1)


def test_bfloat16_gradients_keep_their_dtype_and_use_float32_math():
  grads = random_grads(0)
  low = jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads)
  params = params_like(low)
  tx = ogv.gradvac(4, beta=0.3)
  state = tx.init(params)
  assert state.targets.dtype == jnp.float32
  updates, new_state = jax.jit(tx.update)(low, state, params)
  assert all(u.dtype == jnp.bfloat16 for u in jax.tree.leaves(updates))
  # Same values upcast: only the final rounding to bfloat16 differs.
  upcast = jax.tree.map(lambda g: g.astype(jnp.float32), low)
  expected, expected_state = jax.jit(tx.update)(
    upcast, tx.init(params_like(upcast)), params_like(upcast)
  )
  jax.tree.map(
    lambda u, e: np.testing.assert_allclose(u.astype(np.float32), e, rtol=1e-2, atol=1e-2),
    updates,
    expected,
  )
  np.testing.assert_allclose(new_state.targets, expected_state.targets, atol=1e-6)


def test_float64_params_give_float64_state():
  with enable_x64(True):
    params = {"w": jnp.zeros(3, jnp.float64)}
    state = ogv.gradvac(2).init(params)
    assert state.targets.dtype == state.cosine.dtype == jnp.float64


def test_state_layout():
  params = params_like(random_grads(0))
  state = ogv.gradvac(4, granularity="tensor", key=jax.random.key(3)).init(params)
  assert state.count.dtype == jnp.int32 and state.count.shape == ()
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key)
  assert state.targets.shape == state.cosine.shape == state.corrected.shape == (4, 4, 4)
  assert state.corrected.dtype == bool
  assert state.weights.shape == (4, 4)
  assert ogv.group_names(params, "tensor") == (
    "dense_0/bias",
    "dense_0/kernel",
    "dense_1/bias",
    "dense_1/kernel",
  )


def test_nnx_value_paths_give_the_same_layer_groups():
  """nnx flattens Param leaves with a trailing `.value` at init only."""
  from flax import nnx

  class Model(nnx.Module):
    def __init__(self, rngs):
      self.dense = nnx.Linear(3, 2, rngs=rngs)
      self.scale = nnx.Param(jnp.ones(2))  # on top: a group of its own

  with_value = nnx.state(Model(nnx.Rngs(0)), nnx.Param)
  arrays = jax.tree.map(lambda x: x, nnx.to_pure_dict(with_value))
  assert ogv.group_names(with_value, "layer") == ogv.group_names(arrays, "layer")
  assert ogv.group_names(arrays, "layer") == ("dense", "scale")
  assert ogv.group_names(with_value, "tensor") == ("dense/bias", "dense/kernel", "scale")


# Input errors, at trace time, naming the leaf and the shapes.


def test_wrong_task_axis_names_the_leaf():
  grads = random_grads(0, num_tasks=3)
  params = params_like(grads)
  tx = ogv.gradvac(4)
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"dense_0/bias.*\(3, 5\).*num_tasks=4"):
    tx.update(grads, state, params)
  with pytest.raises(ValueError, match=r"dense_0/bias.*\(3, 5\).*num_tasks=4"):
    jax.jit(tx.update)(grads, state, params)


def test_already_summed_gradient_is_caught_against_params():
  grads = random_grads(0, num_tasks=4)
  params = params_like(grads)
  summed = jax.tree.map(lambda g: g.sum(0), grads)
  summed["dense_1"]["kernel"] = jnp.zeros((4, 3))  # 4 rows: leading axis looks right
  summed = {"dense_1": {"kernel": summed["dense_1"]["kernel"]}}
  tx = ogv.gradvac(4, granularity="model")
  state = tx.init({"dense_1": {"kernel": params["dense_1"]["kernel"]}})
  with pytest.raises(ValueError, match=r"dense_1/kernel.*\(4, 3\).*\(5, 3\)"):
    tx.update(summed, state, {"dense_1": {"kernel": params["dense_1"]["kernel"]}})


def test_non_float_gradients_are_rejected():
  tx = ogv.gradvac(2)
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(TypeError, match=r"'w'.*int32"):
    tx.update({"w": jnp.zeros((2, 3), jnp.int32)}, state)


def test_tree_with_other_groups_than_init_is_rejected():
  tx = ogv.gradvac(2, granularity="tensor")
  state = tx.init({"a": jnp.zeros(3)})
  with pytest.raises(ValueError, match=r"2 groups.*initialised with 1"):
    tx.update({"a": jnp.zeros((2, 3)), "b": jnp.zeros((2, 3))}, state)


@pytest.mark.parametrize(
  ("kwargs", "error", "message"),
  [
    ({"num_tasks": 0}, ValueError, "num_tasks must be at least 1"),
    ({"num_tasks": 2.0}, TypeError, "num_tasks must be a Python int"),
    ({"num_tasks": 2, "beta": 1.5}, ValueError, r"beta must be in \[0, 1\]"),
    ({"num_tasks": 2, "beta": -0.1}, ValueError, r"beta must be in \[0, 1\]"),
    ({"num_tasks": 2, "eps": 0.0}, ValueError, "eps must be positive"),
    ({"num_tasks": 2, "granularity": "block"}, ValueError, "'model', 'layer', 'tensor'"),
    ({"num_tasks": 2, "reduction": "max"}, ValueError, "reduction must be one of"),
  ],
)
def test_bad_hyperparameters(kwargs, error, message):
  with pytest.raises(error, match=message):
    ogv.gradvac(**kwargs)


def test_granularity_callable_must_label_every_leaf():
  tx = ogv.gradvac(2, granularity=lambda params: ["a"])
  with pytest.raises(ValueError, match="1 labels for a tree of 2 leaves"):
    tx.init({"a": jnp.zeros(3), "b": jnp.zeros(3)})


def test_pcgrad_bad_input_is_rejected_too():
  with pytest.raises(ValueError, match="num_tasks must be at least 1"):
    ogv.pcgrad(0)
  with pytest.raises(ValueError, match="Unknown granularity"):
    ogv.pcgrad(2, granularity="block")


def test_inject_hyperparams_with_traced_key_and_beta_schedule():
  grads = random_grads(0)
  params = params_like(grads)
  schedule = optax.linear_schedule(0.0, 0.5, 4)
  injected = optax.inject_hyperparams(ogv.gradvac, static_args=("num_tasks",))(
    num_tasks=4, beta=schedule, key=5
  )
  state = injected.init(params)
  update = jax.jit(injected.update)
  reference_state = ogv.gradvac(4, key=5).init(params)
  for step in range(4):
    grads = random_grads(step)
    updates, state = update(grads, state, params)
    plain = ogv.gradvac(4, beta=float(schedule(step)), key=5)
    expected, reference_state = jax.jit(plain.update)(grads, reference_state, params)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates, expected
    )
  np.testing.assert_allclose(
    state.inner_state.targets, reference_state.targets, rtol=1e-5, atol=1e-6
  )
