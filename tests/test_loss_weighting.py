"""The loss weightings against their papers (float64 numpy references) over several steps,
and how they compose: jit, vmap, grad, checkpoints; their input errors.

A training step with each of them, chained with Adam, is the loss-weighting guide's
example (run by test_docs.py)."""

import functools

import jax
import jax.numpy as jnp
import loss_weighting_reference as reference
import numpy as np
import pytest
from jax_compat import enable_x64

import optax_gradvac as ogv

NUM_TASKS = 3
STEPS = 8
MIN_LOSSES = np.array([0.0, 0.1, 0.2])
PREFERENCES = np.array([0.2, 0.5, 0.3])
REFERENCE_POINT = np.array([0.1, 0.0, 0.3])

WEIGHTINGS = {
  "uw": lambda: ogv.uw(NUM_TASKS),
  "imtl_l": lambda: ogv.imtl_l(NUM_TASKS),
  "gls": lambda: ogv.gls(NUM_TASKS),
  "stch": lambda: ogv.stch(NUM_TASKS, mu=0.3, preferences=PREFERENCES, reference=REFERENCE_POINT),
  "dwa": lambda: ogv.dwa(NUM_TASKS, steps_per_epoch=2, temperature=0.5),
  "famo": lambda: ogv.famo(NUM_TASKS, learning_rate=0.1, weight_decay=0.01, min_losses=MIN_LOSSES),
}


def loss_sequence(seed: int, steps: int = STEPS, bad_step: int | None = 3) -> np.ndarray:
  """``[steps, T]`` positive losses drifting down at task-dependent rates; one step ``nan``."""
  rng = np.random.default_rng(seed)
  rates = rng.uniform(0.7, 1.0, NUM_TASKS)
  losses = rng.uniform(0.5, 3.0, NUM_TASKS) * rates ** np.arange(steps)[:, None]
  losses = losses * rng.uniform(0.9, 1.1, losses.shape) + MIN_LOSSES
  if bad_step is not None:
    losses[bad_step, 1] = np.nan
  return losses


@functools.cache
def jitted(name: str, recompute: bool):
  """One jitted step: the loss, its weights, its gradients, the next state; traces counted."""
  weighting = WEIGHTINGS[name]()
  traces = []

  def step(losses, state, params, after):
    traces.append(None)
    (loss, weights), (loss_grad, params_grad) = jax.value_and_grad(
      weighting.loss, argnums=(0, 2), has_aux=True
    )(losses, state, params)
    new_state = weighting.update(losses, state, losses_after_step=after)
    return loss, weights, loss_grad, params_grad, new_state

  if not recompute:
    return (
      weighting,
      traces,
      jax.jit(lambda losses, state, params: step(losses, state, params, None)),
    )
  return weighting, traces, jax.jit(step)


def reference_step(name, model, losses, params, after):
  """The reference's loss, weights and gradient in the learned parameters (or ``None``)."""
  if name in ("uw", "imtl_l"):
    return getattr(reference, name)(losses, params)
  if name == "gls":
    return (*reference.gls(losses), None)
  if name == "stch":
    return (*reference.stch(losses, 0.3, PREFERENCES, REFERENCE_POINT), None)
  loss, weights = model.loss(losses)
  model.update(losses, after) if name == "famo" else model.update(losses)
  return loss, weights, None


@pytest.mark.parametrize(
  ("name", "recompute"),
  [(name, False) for name in WEIGHTINGS] + [("famo", True)],
  ids=[*WEIGHTINGS, "famo-recomputed"],
)
def test_matches_the_paper_over_steps_in_float64(name, recompute):
  """Float64 against float64: rounding only (T terms of exp and log: 1e-12 relative).

  The state keeps its structure and dtypes (a ``lax.cond`` over it works), stays
  finite through a step of ``nan`` losses, and round-trips a checkpoint.
  """
  weighting, traces, step = jitted(name, recompute)
  compiled_before = len(traces)
  losses = loss_sequence(seed=len(name))
  afters = losses * np.random.default_rng(1).uniform(0.8, 1.05, losses.shape)
  afters[5, 0] = MIN_LOSSES[0] - 1  # below its bound: the logits must not move
  model = {
    "dwa": lambda: reference.DWA(NUM_TASKS, 2, 0.5),
    "famo": lambda: reference.FAMO(NUM_TASKS, 0.1, 0.01, MIN_LOSSES),
  }.get(name, lambda: None)()
  rng = np.random.default_rng(2)
  with enable_x64(True):
    initial = state = weighting.init(jnp.float64)
    for k in range(STEPS):
      params = weighting.init_params(jnp.float64)
      params = None if params is None else jnp.asarray(rng.normal(size=NUM_TASKS))
      after = afters[k] if recompute else None
      args = (losses[k], state, params, after) if recompute else (losses[k], state, params)
      loss, weights, loss_grad, params_grad, state = step(*args)
      expected = reference_step(name, model, losses[k], params, after)
      assert jax.tree.structure(state) == jax.tree.structure(initial)
      assert jax.tree.map(lambda leaf: leaf.dtype, state) == jax.tree.map(
        lambda leaf: leaf.dtype, initial
      )
      assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(state))
      if k == 3:  # the nan step
        assert not np.isfinite(loss)
        continue
      np.testing.assert_allclose(loss, expected[0], rtol=1e-12)
      np.testing.assert_allclose(weights, expected[1], rtol=1e-12)
      np.testing.assert_allclose(loss_grad, weights, rtol=1e-12)
      if expected[2] is not None:
        np.testing.assert_allclose(params_grad, expected[2], rtol=1e-12, atol=1e-15)
      if name == "famo":
        np.testing.assert_allclose(state.logits, model.logits, rtol=1e-12, atol=1e-15)
    restored = ogv.from_bytes(
      jax.eval_shape(lambda: weighting.init(jnp.float64)), ogv.to_bytes(state)
    )
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
      np.testing.assert_array_equal(got, want)
  assert len(traces) - compiled_before <= 1  # one compilation for every step


@pytest.mark.parametrize("name", WEIGHTINGS)
def test_a_step_may_donate_the_state(name):
  """Every field in a buffer of its own (DWA's two counters once shared one, and a
  jitted step donating the state failed: the same buffer donated twice)."""
  weighting = WEIGHTINGS[name]()
  losses = jnp.asarray(loss_sequence(0)[0], jnp.float32)
  update = jax.jit(lambda state: weighting.update(losses, state), donate_argnums=0)
  state = weighting.init()
  for _ in range(2):
    state = update(state)
  jax.block_until_ready(state)


def test_famo_without_recomputed_losses_takes_the_next_steps_losses():
  """Not recomputing equals recomputing losses that happen to be the next step's."""
  lagged, _, lagged_step = jitted("famo", False)
  _, _, recomputed_step = jitted("famo", True)
  losses = loss_sequence(seed=7, bad_step=None)
  with enable_x64(True):
    state = recomputed_state = lagged.init(jnp.float64)
    for k in range(STEPS - 1):
      _, weights, _, _, state = lagged_step(losses[k], state, None)
      _, expected, _, _, recomputed_state = recomputed_step(
        losses[k], recomputed_state, None, losses[k + 1]
      )
      np.testing.assert_allclose(weights, expected, rtol=1e-12)
    # The last recorded losses still wait for their after-step losses.
    assert bool(state.has_previous) and not bool(recomputed_state.has_previous)
    weights = lagged_step(losses[-1], state, None)[1]
    expected = recomputed_step(losses[-1], recomputed_state, None, losses[-1])[1]
    np.testing.assert_allclose(weights, expected, rtol=1e-12)


def test_vmap_over_independent_runs():
  """Two FAMO runs at once, each against its own reference."""
  weighting = WEIGHTINGS["famo"]()

  @jax.jit
  @jax.vmap
  def step(losses, state, after):
    return weighting.loss(losses, state)[1], weighting.update(
      losses, state, losses_after_step=after
    )

  runs = np.stack([loss_sequence(seed, steps=4, bad_step=None) for seed in range(2)], axis=1)
  models = [reference.FAMO(NUM_TASKS, 0.1, 0.01, MIN_LOSSES) for _ in range(2)]
  with enable_x64(True):
    states = jax.vmap(lambda _: weighting.init(jnp.float64))(jnp.arange(2))
    for k in range(3):
      weights, states = step(runs[k], states, runs[k + 1])
      for run, model in enumerate(models):
        np.testing.assert_allclose(weights[run], model.loss(runs[k, run])[1], rtol=1e-12)
        model.update(runs[k, run], runs[k + 1, run])
        np.testing.assert_allclose(states.logits[run], model.logits, rtol=1e-12, atol=1e-15)


def test_low_precision_losses_are_weighted_in_float32():
  weighting = WEIGHTINGS["famo"]()

  @jax.jit
  def step(losses):
    (loss, weights), grad = jax.value_and_grad(weighting.loss, has_aux=True)(
      losses, weighting.init()
    )
    return (
      loss,
      weights,
      grad,
      weighting.update(losses, weighting.init(), losses_after_step=losses / 2),
    )

  loss, weights, grad, state = step(jnp.asarray([1.0, 2.0, 3.0], jnp.bfloat16))
  assert loss.dtype == weights.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  assert jax.tree.map(lambda leaf: leaf.dtype, state) == jax.tree.map(
    lambda leaf: leaf.dtype, weighting.init()
  )
  assert np.isfinite(state.logits).all() and (state.logits != 0).all()


# Bad input: a clear error at trace time.


def test_wrong_inputs_name_the_problem():
  """Checked at trace time: abstract states (``jax.eval_shape``) and numpy inputs suffice."""
  uw, famo, dwa = ogv.uw(NUM_TASKS), ogv.famo(NUM_TASKS), ogv.dwa(NUM_TASKS, steps_per_epoch=1)
  famo_state, dwa_state = jax.eval_shape(famo.init), jax.eval_shape(dwa.init)
  losses = np.ones(NUM_TASKS, np.float32)
  with pytest.raises(
    ValueError, match=r"losses must have shape \(3,\).*got float32 array of shape \(2,\)"
  ):
    famo.loss(losses[:2], famo_state)
  with pytest.raises(TypeError, match="losses must be floating"):
    famo.loss(np.ones(NUM_TASKS, int), famo_state)
  with pytest.raises(TypeError, match="uw: pass its learned log-variances as params"):
    uw.loss(losses, uw.init())
  with pytest.raises(ValueError, match=r"uw: params \(the log-variances\) must have shape \(3,\)"):
    uw.loss(losses, uw.init(), np.zeros(4, np.float32))
  with pytest.raises(TypeError, match="famo learns no parameters"):
    famo.loss(losses, famo_state, losses)
  with pytest.raises(TypeError, match="famo: expected its own state, a FAMOState, got DWAState"):
    famo.loss(losses, dwa_state)
  with pytest.raises(ValueError, match=r"state.logits has shape \(2,\), expected \(3,\)"):
    famo.update(losses, jax.eval_shape(ogv.famo(2).init))
  with pytest.raises(TypeError, match="dwa: losses_after_step is read by famo only"):
    dwa.update(losses, dwa_state, losses_after_step=losses)
  with pytest.raises(ValueError, match=r"famo: losses_after_step must have shape \(3,\)"):
    famo.update(losses, famo_state, losses_after_step=losses[:2])
  with pytest.raises(ValueError, match="stch: mu must be positive"):
    ogv.stch(NUM_TASKS, mu=0.0)
  with pytest.raises(ValueError, match=r"stch: preferences must have shape \(3,\)"):
    ogv.stch(NUM_TASKS, preferences=[1.0, 1.0])
  with pytest.raises(ValueError, match="dwa: steps_per_epoch must be at least 1"):
    ogv.dwa(NUM_TASKS, steps_per_epoch=0)
  with pytest.raises(TypeError, match="dwa: steps_per_epoch must be a Python int"):
    ogv.dwa(NUM_TASKS, steps_per_epoch=2.5)
  with pytest.raises(ValueError, match="famo: weight_decay must be nonnegative"):
    ogv.famo(NUM_TASKS, weight_decay=-1.0)
  with pytest.raises(TypeError, match="gls: num_tasks must be a Python int"):
    ogv.gls(3.0)
  with pytest.raises(TypeError, match="dtype must be a floating dtype"):
    famo.init(jnp.int32)
