"""The battery every transform of the library runs through, on stacked per-task input.

Granularities other than the whole model are represented by GradVac, Aligned-MTL and
FairGrad here; every method runs every granularity in test_gram_methods.py. GradNorm,
whose update needs the losses, runs its own battery there too.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradvac as ogv

NUM_TASKS = 3

TRANSFORMS = {
  "gradvac-layer": functools.partial(ogv.gradvac, NUM_TASKS, 0.1, granularity="layer"),
  "gradvac-model": functools.partial(ogv.gradvac, NUM_TASKS, 0.1, granularity="model"),
  "gradvac-tensor-mean": functools.partial(
    ogv.gradvac, NUM_TASKS, 0.1, granularity="tensor", reduction="mean"
  ),
  "pcgrad": functools.partial(ogv.pcgrad, NUM_TASKS),
  "imtl_g": functools.partial(ogv.imtl_g, NUM_TASKS),
  "aligned_mtl": functools.partial(ogv.aligned_mtl, NUM_TASKS),
  "aligned_mtl-tensor-weighted": functools.partial(
    ogv.aligned_mtl, NUM_TASKS, [0.5, 1.0, 2.0], granularity="tensor"
  ),
  "nash_mtl": functools.partial(ogv.nash_mtl, NUM_TASKS),
  "mgda": functools.partial(ogv.mgda, NUM_TASKS),
  "upgrad": functools.partial(ogv.upgrad, NUM_TASKS),
  "cagrad": functools.partial(ogv.cagrad, NUM_TASKS),
  "fairgrad-layer": functools.partial(ogv.fairgrad, NUM_TASKS, granularity="layer"),
  "dualproj": functools.partial(ogv.dualproj, NUM_TASKS),
  "config": functools.partial(ogv.config, NUM_TASKS),
  "rlw": functools.partial(ogv.rlw, NUM_TASKS),
  "sum_tasks": ogv.sum_tasks,
  "mean_tasks": ogv.mean_tasks,
}
parametrize_transforms = pytest.mark.parametrize("make", TRANSFORMS.values(), ids=TRANSFORMS)
# One transformation per kind of state (EMA targets, a warm start, a PRNG key, weights,
# none): what depends on the state's plumbing, not on the method's math (eager
# execution, chaining with donation, float16) runs on these.
STATE_KINDS = ["gradvac-layer", "nash_mtl", "rlw", "mgda", "sum_tasks"]
parametrize_state_kinds = pytest.mark.parametrize(
  "make", [TRANSFORMS[name] for name in STATE_KINDS], ids=STATE_KINDS
)


def problem(dtype=jnp.float32, seed: int = 0):
  rng = np.random.default_rng(seed)
  shapes = {"conv": {"kernel": (3, 3, 2, 4), "bias": (4,)}, "head": {"kernel": (4, 2)}}
  params = jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s), dtype), shapes, is_leaf=tuple.__instancecheck__
  )
  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=(NUM_TASKS, *p.shape)), dtype), params)
  return params, grads


@functools.cache
def jitted_update(make):
  """A transformation and its jitted update, traced once per process for the tests below."""
  tx = make()
  return tx, jax.jit(tx.update)


@parametrize_transforms
def test_jit_does_not_recompile_and_vmap_runs_independent_runs(make):
  tx = make()
  params, _ = problem()
  traces = 0

  def update(grads, state, params):
    nonlocal traces
    traces += 1
    return tx.update(grads, state, params)

  jitted = jax.jit(update)
  state = jax.jit(tx.init)(params)
  singles = []
  for seed in range(2):
    updates, state = jitted(problem(seed=seed)[1], state, params)
    singles.append(updates)
  assert traces == 1
  jax.tree.map(
    lambda u, p: (u.shape, u.dtype) == (p.shape, p.dtype) or pytest.fail(), updates, params
  )
  # The second step from a fresh state is the second run's first step.
  grads = jax.tree.map(lambda *g: jnp.stack(g), *[problem(seed=s)[1] for s in range(2)])
  states = jax.vmap(lambda _: tx.init(params))(jnp.arange(2))
  batched, _ = jax.jit(jax.vmap(tx.update, in_axes=(0, 0, None)))(grads, states, params)
  second, _ = jitted(problem(seed=1)[1], tx.init(params), params)
  for run, expected in enumerate([singles[0], second]):
    for leaf, want in zip(jax.tree.leaves(batched), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(leaf[run], want, rtol=1e-5, atol=1e-6)


@parametrize_state_kinds
def test_eager_matches_jit(make):
  tx, jitted = jitted_update(make)
  params, _ = problem()
  state = eager_state = tx.init(params)
  for seed in range(2):
    grads = problem(seed=seed)[1]
    updates, state = jitted(grads, state, params)
    eager_updates, eager_state = tx.update(grads, eager_state, params)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), updates, eager_updates
    )


def assert_low_precision_update(make, dtype):
  tx = make()
  params, grads = problem(dtype)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  for update, param in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert update.dtype == dtype and update.shape == param.shape
    assert jnp.isfinite(update).all()


@parametrize_transforms
def test_bfloat16_updates_keep_the_gradient_dtype(make):
  assert_low_precision_update(make, jnp.bfloat16)


@parametrize_state_kinds
def test_float16_updates_keep_the_gradient_dtype(make):
  assert_low_precision_update(make, jnp.float16)


@parametrize_transforms
def test_state_is_stable_under_cond(make):
  tx = make()
  params, grads = problem()
  state = tx.init(params)

  @jax.jit
  def step(grads, state):
    new_state = tx.update(grads, state, params)[1]
    return jax.lax.cond(jnp.asarray(True), lambda: new_state, lambda: state)

  # lax.cond compares its branches' trees, shapes and dtypes when it traces: no need to run.
  new_state = jax.eval_shape(step, grads, state)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for new, old in zip(jax.tree.leaves(new_state), jax.tree.leaves(state), strict=True):
    assert (new.shape, new.dtype) == (old.shape, old.dtype)


@parametrize_state_kinds
def test_chain_equals_the_optimizer_applied_to_the_surgery_update(make):
  """Chained before an optimizer with a state of its own, jitted with params and state donated."""
  optimizer = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-2))  # noqa: E731
  chained = optax.chain(make(), optimizer())
  surgery, surgery_update = jitted_update(make)
  inner = optimizer()

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def step(params, state, grads):
    updates, state = chained.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, _ = problem()
  chained_state = chained.init(params)
  surgery_state, inner_state = surgery.init(params), inner.init(params)
  for seed in range(2):
    grads = problem(seed=seed)[1]
    reduced, surgery_state = surgery_update(grads, surgery_state, params)
    expected, inner_state = inner.update(reduced, inner_state, params)
    expected = optax.apply_updates(params, expected)
    params, chained_state = step(params, chained_state, grads)
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), params, expected
    )
  assert all(jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(params))


@parametrize_transforms
def test_extra_arguments_are_accepted(make):
  tx = make()
  params, grads = problem()
  updates, _ = jax.eval_shape(
    lambda grads, state: tx.update(grads, state, params, value=jnp.ones(()), loss=2.0),
    grads,
    tx.init(params),
  )
  assert jax.tree.structure(updates) == jax.tree.structure(params)


@parametrize_transforms
def test_wrong_task_axis_is_rejected(make):
  tx = make()
  params, grads = problem()
  state = tx.init(params)
  short = jax.tree.map(lambda g: g[:2], grads)
  short["conv"]["bias"] = grads["conv"]["bias"]
  with pytest.raises(ValueError, match=r"conv/kernel.*\(2, 3, 3, 2, 4\)"):
    tx.update(short, state, params)
  summed = jax.tree.map(lambda g: g.sum(0), grads)
  with pytest.raises(ValueError, match=r"conv/bias.*\(4,\)"):
    tx.update(summed, state, params)


@pytest.mark.parametrize(("make", "reduce"), [(ogv.sum_tasks, np.sum), (ogv.mean_tasks, np.mean)])
def test_baselines_reduce_the_task_axis(make, reduce):
  params, grads = problem()
  updates, _ = make(NUM_TASKS).update(grads, optax.EmptyState(), params)
  jax.tree.map(
    lambda u, g: np.testing.assert_allclose(u, reduce(np.asarray(g), axis=0), rtol=1e-6, atol=1e-7),
    updates,
    grads,
  )
  with pytest.raises(ValueError, match="num_tasks must be at least 1"):
    make(0)
