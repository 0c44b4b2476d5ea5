"""imtl_g against the paper's closed form in float64, its invariant and special inputs."""

import closed_form_reference as reference
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_gradvac as ogv


@pytest.mark.parametrize("granularity", ["model", "layer"])
@pytest.mark.parametrize("num_tasks", [2, 3, 5, 8])
@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_matches_the_papers_closed_form(granularity, num_tasks, x64):
  """float32: the rounding of a [T, T] eigh (relative eps * condition number)."""
  rng = np.random.default_rng(num_tasks)
  groups = reference.GROUPS[granularity]
  tx = ogv.imtl_g(num_tasks, granularity=granularity)
  dtype, rtol, atol = (jnp.float64, 1e-9, 1e-11) if x64 else (jnp.float32, 1e-3, 1e-4)
  state = None
  with jax.enable_x64(x64):
    for _ in range(3):
      grads = reference.task_gradients(rng, num_tasks)
      weights = reference.group_weights(grads, groups, reference.imtl_g)
      updates, state = reference.run(tx, grads, dtype, state=state)
      assert state.weights.dtype == dtype
      np.testing.assert_allclose(state.weights, weights, rtol, atol)
      expected = reference.group_updates(grads, groups, weights)
      reference.assert_updates_close(updates, expected, rtol, atol)


@pytest.mark.parametrize("num_tasks", [2, 4, 7])
def test_projections_on_unit_gradients_are_equal(num_tasks):
  rng = np.random.default_rng(0)
  grads = rng.normal(size=(num_tasks, 30)) * rng.uniform(0.01, 10, size=(num_tasks, 1))
  with jax.enable_x64(True):
    weights = np.asarray(ogv.imtl_g_weights(jnp.asarray(grads @ grads.T)))
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  projections = units @ (weights @ grads)
  np.testing.assert_allclose(projections, projections[0], rtol=1e-10)
  np.testing.assert_allclose(weights.sum(), 1, rtol=1e-12)


def test_negative_sum_follows_the_paper():
  """A small third gradient can make the update's projections equal and negative."""
  grads = np.array([[-1.4, 0.5, 1.0], [-0.2, -1.1, 0.9], [-0.13, -0.07, 0.06]])
  expected = reference.imtl_g(grads)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  assert (units @ (expected @ grads) < 0).all()  # the case exists
  weights = ogv.imtl_g_weights(jnp.asarray(grads @ grads.T, jnp.float32))
  np.testing.assert_allclose(weights, expected, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-6, 1e-3, 1e3, 1e6])
def test_scaling_all_gradients_scales_the_update(scale):
  rng = np.random.default_rng(1)
  tx = ogv.imtl_g(4, granularity="layer")
  grads = reference.task_gradients(rng, 4)
  updates, state = reference.run(tx, grads)
  scaled, scaled_state = reference.run(tx, {k: v * scale for k, v in grads.items()})
  np.testing.assert_allclose(scaled_state.weights, state.weights, rtol=1e-4, atol=1e-6)
  for name in grads:
    np.testing.assert_allclose(scaled[name] / scale, updates[name], rtol=1e-4, atol=1e-5)


def test_bfloat16_gradients_use_float32_math():
  rng = np.random.default_rng(2)
  grads = reference.task_gradients(rng, 3)
  rounded = {k: np.asarray(jnp.asarray(v, jnp.bfloat16), np.float64) for k, v in grads.items()}
  weights = reference.group_weights(rounded, reference.GROUPS["model"], reference.imtl_g)
  updates, state = reference.run(ogv.imtl_g(3), grads, dtype=jnp.bfloat16)
  assert state.weights.dtype == jnp.float32
  np.testing.assert_allclose(state.weights, weights, rtol=1e-4, atol=1e-5)
  expected = reference.group_updates(rounded, reference.GROUPS["model"], weights)
  reference.assert_updates_close(updates, expected, rtol=2e-2, atol=2e-2)


# Special inputs.


def test_zero_gradient_task_is_left_out():
  rng = np.random.default_rng(3)
  grads = reference.task_gradients(rng, 4)
  for name in ["dense_1/bias", "dense_1/kernel"]:
    grads[name][2] = 0
  updates, state = reference.run(ogv.imtl_g(4, granularity="layer"), grads)
  assert state.weights[1, 2] == 0 and state.weights[0, 2] != 0
  without = {name: np.delete(g, 2, axis=0) for name, g in grads.items()}
  expected, three = reference.run(ogv.imtl_g(3, granularity="layer"), without)
  np.testing.assert_allclose(state.weights[1, [0, 1, 3]], three.weights[1], rtol=1e-5)
  for name in ["dense_1/bias", "dense_1/kernel"]:
    np.testing.assert_allclose(updates[name], expected[name], rtol=1e-5, atol=1e-6)


def test_single_task_gives_its_gradient():
  grads = {"w": np.array([[1.0, -2.0, 3.0]])}
  updates, state = reference.run(ogv.imtl_g(1), grads)
  np.testing.assert_allclose(updates["w"], grads["w"][0], rtol=1e-6)
  np.testing.assert_allclose(state.weights, [[1.0]])


def test_identical_tasks_share_the_weight():
  g = np.random.default_rng(4).normal(size=(1, 6))
  updates, state = reference.run(ogv.imtl_g(3), {"w": np.concatenate([g, g, g])})
  np.testing.assert_allclose(state.weights, [[1 / 3] * 3], rtol=1e-5)
  np.testing.assert_allclose(updates["w"], g[0], rtol=1e-5)


@pytest.mark.parametrize("ratio", [1.0, 3.0])
def test_opposite_tasks_give_a_zero_update(ratio):
  """Only the zero vector has equal projections on u and -u: the paper's answer too."""
  g = np.random.default_rng(5).normal(size=(1, 6))
  updates, state = reference.run(ogv.imtl_g(2), {"w": np.concatenate([g, -ratio * g])})
  np.testing.assert_allclose(updates["w"], 0, atol=1e-6)
  assert np.isfinite(state.weights).all()


def test_opposite_pair_beside_a_third_task_follows_least_squares():
  rng = np.random.default_rng(6)
  g = rng.normal(size=(2, 6))
  grads = np.stack([g[0], -2 * g[0], g[1]])
  expected = reference.imtl_g_least_squares(grads)
  updates, state = reference.run(ogv.imtl_g(3), {"w": grads})
  np.testing.assert_allclose(state.weights[0], expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(updates["w"], expected @ grads, rtol=1e-4, atol=1e-5)


def test_more_tasks_than_parameters_follows_least_squares():
  grads = np.random.default_rng(7).normal(size=(6, 3))
  expected = reference.imtl_g_least_squares(grads)
  assert np.abs(expected).sum() > 0
  updates, state = reference.run(ogv.imtl_g(6), {"w": grads})
  np.testing.assert_allclose(state.weights[0], expected, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(updates["w"], expected @ grads, rtol=1e-3, atol=1e-4)


def test_all_zero_group_gives_a_zero_update():
  grads = {"a": np.zeros((3, 4)), "b": np.random.default_rng(8).normal(size=(3, 2))}
  updates, state = reference.run(ogv.imtl_g(3, granularity="tensor"), grads)
  np.testing.assert_array_equal(updates["a"], 0)
  np.testing.assert_array_equal(state.weights[0], 0)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_gradients_give_the_plain_sum_and_keep_the_state(bad):
  rng = np.random.default_rng(9)
  tx = ogv.imtl_g(3, granularity="layer")
  _, state = reference.run(tx, reference.task_gradients(rng, 3))
  grads = reference.task_gradients(rng, 3)
  grads["dense_0/kernel"][1, 2, 3] = bad
  updates, new_state = reference.run(tx, grads, state=state)
  for name, g in grads.items():
    np.testing.assert_allclose(updates[name], g.sum(0), rtol=1e-5, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new_state, state)
