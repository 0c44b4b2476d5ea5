"""gradvac and pcgrad against the plain-loop float64 references, over several steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax_compat import enable_x64

import optax_gradvac as ogv

import gradvac_reference as reference

NUM_TASKS = 4
SHAPES = {
  "dense_0/bias": (4,),
  "dense_0/kernel": (3, 4),
  "dense_1/bias": (2,),
  "dense_1/kernel": (4, 2),
  "embed/table": (5, 3),
  "scale": (3,),
}


def trunk_or_head(params):
  return {
    "dense_0": {"bias": "trunk", "kernel": "trunk"},
    "dense_1": {"bias": "head", "kernel": "head"},
    "embed": {"table": "trunk"},
    "scale": "head",
  }


# The groups each granularity must produce, written out by hand.
GROUPS = {
  "model": [list(SHAPES)],
  "layer": [
    ["dense_0/bias", "dense_0/kernel"],
    ["dense_1/bias", "dense_1/kernel"],
    ["embed/table"],
    ["scale"],
  ],
  "tensor": [[name] for name in SHAPES],
  trunk_or_head: [
    ["dense_0/bias", "dense_0/kernel", "embed/table"],
    ["dense_1/bias", "dense_1/kernel", "scale"],
  ],
}
GROUP_NAMES = {
  "model": ("model",),
  "layer": ("dense_0", "dense_1", "embed", "scale"),
  "tensor": tuple(SHAPES),
  trunk_or_head: ("trunk", "head"),
}


def nest(flat: dict) -> dict:
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def flatten(tree: dict) -> dict:
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def task_gradients(rng: np.random.Generator, num_tasks: int, step: int) -> dict:
  """Gradients with a shared direction that some tasks follow and others oppose."""
  signs = rng.choice([-1.0, 1.0], size=num_tasks) * rng.uniform(0.2, 2.0, size=num_tasks)
  grads = {}
  for name, shape in SHAPES.items():
    shared = rng.normal(size=shape)
    noise = rng.normal(size=(num_tasks, *shape))
    grads[name] = signs.reshape(-1, *[1] * len(shape)) * shared + 0.7 * noise
  if step == 2:  # task 1 absent from the head at this step
    grads["dense_1/bias"][1] = 0
    grads["dense_1/kernel"][1] = 0
  return grads


def ascending_orders(num_groups: int, num_tasks: int) -> np.ndarray:
  rows = [[j for j in range(num_tasks) if j != i] for i in range(num_tasks)]
  return np.array([rows] * num_groups, int).reshape(num_groups, num_tasks, num_tasks - 1)


def run_against_reference(granularity, shuffle, reduction, dtype, beta=0.3, steps=6):
  params = nest({name: jnp.zeros(shape, dtype) for name, shape in SHAPES.items()})
  assert ogv.group_names(params, granularity) == GROUP_NAMES[granularity]
  groups = GROUPS[granularity]
  tx = ogv.gradvac(
    NUM_TASKS, beta, granularity=granularity, shuffle=shuffle, reduction=reduction, key=7
  )
  update = jax.jit(tx.update)
  state = tx.init(params)
  assert state.targets.dtype == dtype and state.targets.shape == (len(groups), 4, 4)
  targets = np.zeros((len(groups), NUM_TASKS, NUM_TASKS))
  rng = np.random.default_rng(0)
  corrections = 0
  for step in range(steps):
    grads = task_gradients(rng, NUM_TASKS, step)
    if shuffle:
      orders = np.asarray(
        ogv.visiting_order(jax.random.split(state.key)[1], len(groups), NUM_TASKS)
      )
      for row, order in enumerate(orders.reshape(-1, NUM_TASKS - 1)):
        assert sorted(order) == [j for j in range(NUM_TASKS) if j != row % NUM_TASKS]
    else:
      orders = ascending_orders(len(groups), NUM_TASKS)
    expected, targets, cosine, corrected = reference.gradvac_tree(
      grads, groups, targets, orders, beta, reduction
    )
    updates, state = update(nest({k: jnp.asarray(v, dtype) for k, v in grads.items()}), state)
    exact = dtype == jnp.float64
    tolerance = {"rtol": 1e-9, "atol": 1e-12} if exact else {"rtol": 2e-4, "atol": 2e-5}
    actual = flatten(updates)
    for name in SHAPES:
      np.testing.assert_allclose(actual[name], expected[name], **tolerance, err_msg=name)
    np.testing.assert_allclose(state.targets, targets, **tolerance)
    np.testing.assert_allclose(state.cosine, cosine, **tolerance)
    np.testing.assert_array_equal(state.corrected, corrected)
    assert int(state.count) == step + 1
    corrections += corrected.sum()
  # The run must exercise both branches of the algorithm.
  assert 0 < corrections < steps * len(groups) * NUM_TASKS * (NUM_TASKS - 1)


@pytest.mark.parametrize("granularity", list(GROUPS), ids=lambda g: getattr(g, "__name__", g))
@pytest.mark.parametrize("shuffle", [False, True], ids=["ascending", "shuffled"])
def test_gradvac_matches_reference_in_float64(granularity, shuffle):
  with enable_x64(True):
    run_against_reference(granularity, shuffle, "sum", jnp.float64)


def test_mean_reduction_matches_reference():
  with enable_x64(True):
    run_against_reference("layer", True, "mean", jnp.float64)


@pytest.mark.parametrize("granularity", ["model", "layer"])
def test_gradvac_matches_reference_in_float32(granularity):
  run_against_reference(granularity, True, "sum", jnp.float32)


@pytest.mark.parametrize("shuffle", [False, True], ids=["ascending", "shuffled"])
def test_pcgrad_matches_pcgrad_reference(shuffle):
  with enable_x64(True):
    params = nest({name: jnp.zeros(shape, jnp.float64) for name, shape in SHAPES.items()})
    for tx in [
      ogv.pcgrad(NUM_TASKS, shuffle=shuffle, key=3),
      ogv.gradvac(NUM_TASKS, beta=0.0, granularity="model", shuffle=shuffle, key=3),
    ]:
      state = tx.init(params)
      rng = np.random.default_rng(1)
      for step in range(4):
        grads = task_gradients(rng, NUM_TASKS, step)
        flat = np.concatenate([grads[name].reshape(NUM_TASKS, -1) for name in SHAPES], axis=1)
        if shuffle:
          order = np.asarray(ogv.visiting_order(jax.random.split(state.key)[1], 1, NUM_TASKS)[0])
        else:
          order = ascending_orders(1, NUM_TASKS)[0]
        expected = reference.pcgrad_group(flat, order).sum(0)
        updates, state = jax.jit(tx.update)(nest(grads), state)
        actual = np.concatenate([flatten(updates)[name].ravel() for name in SHAPES])
        np.testing.assert_allclose(actual, expected, rtol=1e-9, atol=1e-12)
        np.testing.assert_array_equal(state.targets, 0)


@settings(deadline=None)
@given(
  num_tasks=st.integers(1, 8),
  sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
  beta=st.floats(0.0, 1.0),
  seed=st.integers(0, 2**16),
)
def test_pure_function_matches_reference_for_random_shapes(num_tasks, sizes, beta, seed):
  rng = np.random.default_rng(seed)
  # At least 2 dimensions: in one, every pair is exactly (anti)parallel, where
  # sqrt(1 - phi^2) turns rounding of phi into visible error in any precision.
  grads = rng.normal(size=(num_tasks, 1 + sum(sizes))) * rng.uniform(0.1, 10, size=(num_tasks, 1))
  targets = rng.uniform(-0.95, 0.95, size=(num_tasks, num_tasks))
  order = np.array(
    [rng.permutation([j for j in range(num_tasks) if j != i]) for i in range(num_tasks)], int
  ).reshape(num_tasks, num_tasks - 1)
  expected_grads, expected_targets, expected_corrected = reference.gradvac_group(
    grads, targets, order, beta
  )
  with enable_x64(True):
    surgery = jax.jit(ogv.gradvac_coefficients)(jnp.asarray(grads @ grads.T), targets, order, beta)
    np.testing.assert_allclose(
      np.asarray(surgery.coefficients) @ grads, expected_grads, rtol=1e-8, atol=1e-10
    )
    np.testing.assert_allclose(surgery.targets, expected_targets, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(surgery.corrected, expected_corrected)


@settings(deadline=None)
@given(
  num_tasks=st.integers(1, 8),
  shapes=st.lists(st.lists(st.integers(1, 4), max_size=3).map(tuple), min_size=1, max_size=4),
  granularity=st.sampled_from(["model", "tensor"]),
  seed=st.integers(0, 2**16),
)
def test_transform_matches_reference_for_random_trees(num_tasks, shapes, granularity, seed):
  # Every group spans more dimensions than there are tasks: whole-model groups get an
  # anchor leaf, per-tensor groups a trailing axis, of T + 1. With fewer dimensions than
  # tasks the gradients are linearly dependent, a corrected gradient can all but cancel
  # (7 tasks in 2 dimensions), and its squared norm, read from the Gram matrix, then
  # loses digits that the reference's vectors keep (a target 1.7e-6 off in float64):
  # the Gram form's accuracy goes with the gradients' conditioning.
  anchor = (num_tasks + 1,)
  shapes = [*shapes, anchor] if granularity == "model" else [(*s, *anchor) for s in shapes]
  names = [f"leaf_{k}" for k in range(len(shapes))]
  groups = [names] if granularity == "model" else [[name] for name in names]
  rng = np.random.default_rng(seed)
  with enable_x64(True):
    tx = ogv.gradvac(num_tasks, 0.5, granularity=granularity, shuffle=False)
    params = {name: jnp.zeros(s, jnp.float64) for name, s in zip(names, shapes, strict=True)}
    state = tx.init(params)
    targets = np.zeros((len(groups), num_tasks, num_tasks))
    for _ in range(3):
      scales = rng.uniform(0.1, 10, size=num_tasks)
      grads = {
        name: rng.normal(size=(num_tasks, *shape)) * scales.reshape(-1, *[1] * len(shape))
        for name, shape in zip(names, shapes, strict=True)
      }
      expected, targets, _, _ = reference.gradvac_tree(
        grads, groups, targets, ascending_orders(len(groups), num_tasks), 0.5
      )
      updates, state = jax.jit(tx.update)(grads, state, params)
      for name in names:
        np.testing.assert_allclose(updates[name], expected[name], rtol=1e-7, atol=1e-9)
      # A float32 leak would show as 1e-8 and more on targets near 1.
      np.testing.assert_allclose(state.targets, targets, rtol=1e-7, atol=1e-8)
