"""Bad input to every public function fails at once, with a message naming both sides.

Wherever two things must agree, the library checks them at trace time (from
shapes, dtypes, paths and Python values only, so under ``jax.jit`` too) and
the message names the leaf path, the shapes or the value. Each table below is
one class of input; every case asserts on the message.

Classes covered:

1. Configuration at construction: ``num_tasks`` (bool, float, str, 0,
   negative) of every function that takes it; ``beta`` and ``eps`` (out of
   range, NaN, inf, bool, str, vector, a schedule without
   ``inject_hyperparams``); ``granularity`` (typos, non-str); ``reduction``;
   the flags ``shuffle``, ``has_aux``, ``use_grad_mean``; ``multi_steps``'
   ``tx`` (a factory instead of a transformation), ``every_k_schedule`` and
   ``accumulator_dtype``; ``visiting_order``'s sizes.
2. Random keys: an int seed, a typed key and a legacy raw ``uint32`` key give
   the same key, visiting orders and updates (also through
   ``optax.inject_hyperparams``); the state owns its key buffer; floats,
   bools, ``None``, split keys and raw keys of the wrong shape or dtype fail.
3. Gradients against params and ``num_tasks`` (every transformation, eager
   and jitted): non-array and integer leaves, a missing or wrong-sized task
   axis, shapes that disagree with params, and params of another tree
   structure with the same number of leaves, or more, or fewer.
4. A state against the transformation that uses it: another transformation's
   state (a chain's tuple, ``EmptyState``, a dict, ``optax.MultiSteps``'),
   a state built for another ``num_tasks`` or granularity, fields that
   disagree, wrong dtypes, a raw or split key in the state.
5. Granularity callables against their tree: labels in a list for a dict,
   missing (``None``) labels, containers as labels, other paths, unhashable
   labels.
6. Batches and their task axis: ``task_value_and_grad`` with leading axes
   that disagree, scalar or no batch leaves, non-scalar, integer or
   mis-packed (``has_aux``) losses; ``segment_value_and_grad`` with a batch
   mean instead of per-example losses, ``[B, 1]`` losses, ``task_ids`` of
   another length, float, bool, 2-D or list ``task_ids``.
7. Checkpoints against their target (``from_bytes``): another tree, another
   ``num_tasks``, granularity, dtype or PRNG implementation.
8. Logging (``similarity_summary``): no GradVac state, another granularity or
   tree, ``task_names`` of the wrong length, a str, repeated or unhashable.
9. The pure functions: non-square Gram matrices, batched inputs to the
   per-group ``gradvac_coefficients``, orders of the wrong shape or dtype.
10. Unusual but valid input that the checks must let through, each compared
    with an independent expectation.
11. Groups that cannot follow the model: ``StackedLayers`` on an unrolled
    sequence of blocks (a list, int keys, keys that are paths); one group for
    many leaves under ``"layer"`` (a warning); the low-memory path on stacked
    layers (a warning). The Equinox modules' errors are in
    ``tests/test_frameworks.py``, which needs Equinox.
"""

import functools
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_gradvac as ogv

NUM_TASKS = 3
# Flattened in the order dense/bias, dense/kernel, head/kernel: two layers.
PARAMS = {
  "dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)},
  "head": {"kernel": jnp.ones(3)},
}


def _stacked(tree, num_tasks=NUM_TASKS, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda p: jnp.asarray(rng.normal(size=(num_tasks, *p.shape)), jnp.float32), tree
  )


GRADS = _stacked(PARAMS)


def case(case_id, *values):
  return pytest.param(*values, id=case_id)


def with_runs(cases, eager_only=()):
  """Every case eagerly and under ``jax.jit``: the checks must fire at trace time."""
  return [
    pytest.param(run, *case.values, id=f"{case.id}-{run}")
    for case in cases
    for run in ("eager", "jit")
    if run == "eager" or case.id not in eager_only
  ]


def _replace(tree, path, value):
  """A copy of a nested dict with ``tree[path[0]][path[1]]...`` set (or added) to ``value``."""
  if not path:
    return value
  return {**tree, path[0]: _replace(tree.get(path[0], {}), path[1:], value)}


def _key_data(tree):
  """Typed keys as their raw data, which numpy can compare."""
  is_key = lambda x: jnp.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)  # noqa: E731
  return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


def _assert_same(actual, expected):
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6),
    _key_data(actual),
    _key_data(expected),
  )


def _call(run, fn, *args):
  return (jax.jit(fn) if run == "jit" else fn)(*args)


# 1. Configuration at construction.


def _loss(params, x, y):
  return jnp.mean((x @ params["w"] - y) ** 2)


# fmt: off
CONFIGURATION = [
  case("gradvac-num_tasks-0", lambda: ogv.gradvac(0),
       ValueError, r"gradvac: num_tasks must be at least 1, got 0"),
  case("gradvac-num_tasks-negative", lambda: ogv.gradvac(-2),
       ValueError, r"num_tasks must be at least 1, got -2"),
  case("gradvac-num_tasks-bool", lambda: ogv.gradvac(True),
       TypeError, r"num_tasks must be a Python int, got bool True"),
  case("gradvac-num_tasks-float", lambda: ogv.gradvac(3.0),
       TypeError, r"num_tasks must be a Python int, got float 3.0"),
  case("gradvac-num_tasks-str", lambda: ogv.gradvac("3"),
       TypeError, r"num_tasks must be a Python int, got str '3'"),
  case("gradvac-num_tasks-array", lambda: ogv.gradvac(jnp.array(3)),
       TypeError, r"num_tasks must be a Python int, got int32 array.*static_args=\('num_tasks',\)"),
  case("pcgrad-num_tasks-0", lambda: ogv.pcgrad(0),
       ValueError, r"num_tasks must be at least 1, got 0"),
  case("sum_tasks-num_tasks-0", lambda: ogv.sum_tasks(0),
       ValueError, r"sum_tasks: num_tasks must be at least 1, got 0"),
  case("mean_tasks-num_tasks-float", lambda: ogv.mean_tasks(2.0),
       TypeError, r"mean_tasks: num_tasks must be a Python int, got float 2.0"),
  case("segment-num_tasks-0", lambda: ogv.segment_value_and_grad(_loss, 0),
       ValueError, r"segment_value_and_grad: num_tasks must be at least 1, got 0"),
  case("segment-num_tasks-float", lambda: ogv.segment_value_and_grad(_loss, 3.0),
       TypeError, r"segment_value_and_grad: num_tasks must be a Python int, got float 3.0"),
  case("multi_steps-num_tasks-bool", lambda: ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=True),
       TypeError, r"multi_steps: num_tasks must be a Python int, got bool True"),
  case("multi_steps-num_tasks-0", lambda: ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=0),
       ValueError, r"multi_steps: num_tasks must be at least 1, got 0"),
  case("beta-above-1", lambda: ogv.gradvac(3, 1.5),
       ValueError, r"gradvac: beta must be in \[0, 1\], got 1.5"),
  case("beta-negative", lambda: ogv.gradvac(3, -0.1),
       ValueError, r"beta must be in \[0, 1\], got -0.1"),
  case("beta-nan", lambda: ogv.gradvac(3, float("nan")),
       ValueError, r"beta must be in \[0, 1\], got nan"),
  case("beta-bool", lambda: ogv.gradvac(3, True),
       TypeError, r"beta must be a number, got bool True"),
  case("beta-str", lambda: ogv.gradvac(3, "0.1"),
       TypeError, r"beta must be a real number or a scalar array, got str '0.1'"),
  case("beta-vector", lambda: ogv.gradvac(3, jnp.full(3, 0.1)),
       ValueError, r"beta must be a scalar, got float32 array of shape \(3,\)"),
  case("beta-bool-array", lambda: ogv.gradvac(3, jnp.array(True)),
       TypeError, r"beta must be a number, got bool array of shape \(\)"),
  case("beta-schedule", lambda: ogv.gradvac(3, optax.constant_schedule(0.1)),
       TypeError, r"beta must be a real number.*got function.*optax.inject_hyperparams"),
  case("eps-0", lambda: ogv.gradvac(3, eps=0.0),
       ValueError, r"gradvac: eps must be positive and finite, got 0.0"),
  case("eps-negative", lambda: ogv.gradvac(3, eps=-1e-8),
       ValueError, r"eps must be positive and finite, got -1e-08"),
  case("eps-inf", lambda: ogv.gradvac(3, eps=float("inf")),
       ValueError, r"eps must be positive and finite, got inf"),
  case("eps-nan", lambda: ogv.pcgrad(3, eps=float("nan")),
       ValueError, r"eps must be positive and finite, got nan"),
  case("eps-str", lambda: ogv.gradvac(3, eps="1e-8"),
       TypeError, r"eps must be a real number or a scalar array, got str '1e-8'"),
  case("granularity-typo", lambda: ogv.gradvac(3, granularity="layers"),
       ValueError, r"Unknown granularity 'layers': expected one of \('model', 'layer', 'tensor'\)"),
  case("granularity-case", lambda: ogv.pcgrad(3, granularity="Model"),
       ValueError, r"Unknown granularity 'Model'"),
  case("granularity-none", lambda: ogv.gradvac(3, granularity=None),
       ValueError, r"Unknown granularity None"),
  case("granularity-int", lambda: ogv.gradvac(3, granularity=2),
       ValueError, r"Unknown granularity 2"),
  case("reduction-typo", lambda: ogv.gradvac(3, reduction="avg"),
       ValueError, r"gradvac: reduction must be one of \('sum', 'mean'\), got 'avg'"),
  case("reduction-none", lambda: ogv.pcgrad(3, reduction=None),
       ValueError, r"reduction must be one of \('sum', 'mean'\), got None"),
  case("shuffle-str", lambda: ogv.gradvac(3, shuffle="no"),
       TypeError, r"gradvac: shuffle must be True or False, got str 'no'"),
  case("shuffle-int", lambda: ogv.pcgrad(3, shuffle=0),
       TypeError, r"shuffle must be True or False, got int 0"),
  case("task_value_and_grad-has_aux", lambda: ogv.task_value_and_grad(_loss, has_aux="yes"),
       TypeError, r"task_value_and_grad: has_aux must be True or False, got str 'yes'"),
  case("segment-has_aux", lambda: ogv.segment_value_and_grad(_loss, 3, has_aux=1),
       TypeError, r"segment_value_and_grad: has_aux must be True or False, got int 1"),
  case("multi_steps-tx-factory", lambda: ogv.multi_steps(ogv.sum_tasks, 2, num_tasks=3),
       TypeError, r"multi_steps: tx must be an optax.GradientTransformation, got function.*Call it "
                  r"first, e.g. sum_tasks\(...\)"),
  case("multi_steps-tx-none", lambda: ogv.multi_steps(None, 2, num_tasks=3),
       TypeError, r"tx must be an optax.GradientTransformation, got NoneType None"),
  case("multi_steps-every_k-0", lambda: ogv.multi_steps(ogv.sum_tasks(), 0, num_tasks=3),
       ValueError, r"multi_steps: every_k_schedule must be at least 1, got 0"),
  case("multi_steps-every_k-float", lambda: ogv.multi_steps(ogv.sum_tasks(), 2.0, num_tasks=3),
       TypeError, r"every_k_schedule must be a Python int or a function of the step count, got "
                  r"float 2.0"),
  case("multi_steps-every_k-numpy",
       lambda: ogv.multi_steps(ogv.sum_tasks(), np.int64(2), num_tasks=3),
       TypeError, r"every_k_schedule must be a Python int.*got int64 array of shape \(\)"),
  case("multi_steps-use_grad_mean",
       lambda: ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=3, use_grad_mean="no"),
       TypeError, r"use_grad_mean must be True or False, got str 'no'"),
  case("multi_steps-int-accumulator",
       lambda: ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=3, accumulator_dtype=jnp.int32),
       TypeError, r"accumulator_dtype must be a floating dtype, got int32"),
  case("multi_steps-bad-accumulator",
       lambda: ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=3, accumulator_dtype="f32x"),
       TypeError, r"accumulator_dtype must be a floating dtype, got 'f32x'"),
  case("visiting_order-num_tasks-0", lambda: ogv.visiting_order(jax.random.key(0), 1, 0),
       ValueError, r"visiting_order: num_tasks must be at least 1, got 0"),
  case("visiting_order-num_groups-negative", lambda: ogv.visiting_order(jax.random.key(0), -1, 3),
       ValueError, r"visiting_order: num_groups must be at least 0, got -1"),
  case("visiting_order-num_groups-float", lambda: ogv.visiting_order(jax.random.key(0), 1.0, 3),
       TypeError, r"visiting_order: num_groups must be a Python int, got float 1.0"),
  case("visiting_order-shuffle",
       lambda: ogv.visiting_order(jax.random.key(0), 1, 3, shuffle="yes"),
       TypeError, r"visiting_order: shuffle must be True or False"),
]
# fmt: on


@pytest.mark.parametrize(("build", "error", "match"), CONFIGURATION)
def test_configuration_is_checked_at_construction(build, error, match):
  with pytest.raises(error, match=match):
    build()


# 2. Random keys.

KEY_FORMS = {
  "int-seed": lambda: 1,
  "numpy-int-seed": lambda: np.int64(1),
  "int-array-seed": lambda: jnp.array(1),
  "typed-key": lambda: jax.random.key(1),
  "raw-key": lambda: jax.random.PRNGKey(1),
  "numpy-raw-key": lambda: np.asarray(jax.random.PRNGKey(1)),
}


@pytest.mark.parametrize("form", KEY_FORMS.values(), ids=KEY_FORMS)
def test_every_key_form_gives_the_same_key_orders_and_updates(form):
  # Reference: threefry seeds key(s) with the raw data [0, s], as PRNGKey(s) shows.
  np.testing.assert_array_equal(jax.random.key_data(jax.random.key(1)), [0, 1])
  tx = ogv.gradvac(NUM_TASKS, 0.5, key=form())
  reference_tx = ogv.gradvac(NUM_TASKS, 0.5, key=jax.random.key(1))
  state, reference_state = tx.init(PARAMS), reference_tx.init(PARAMS)
  assert jnp.issubdtype(state.key.dtype, jax.dtypes.prng_key) and state.key.shape == ()
  np.testing.assert_array_equal(jax.random.key_data(state.key), [0, 1])
  for step in range(2):
    orders = ogv.visiting_order(jax.random.split(state.key)[1], 2, NUM_TASKS)
    reference_orders = ogv.visiting_order(jax.random.split(reference_state.key)[1], 2, NUM_TASKS)
    np.testing.assert_array_equal(orders, reference_orders)
    grads = _stacked(PARAMS, seed=step)
    updates, state = jax.jit(tx.update)(grads, state, PARAMS)
    expected, reference_state = reference_tx.update(grads, reference_state, PARAMS)
    _assert_same((updates, state), (expected, reference_state))


def test_orders_depend_on_the_seed():
  # The check above would pass if every key were ignored: different seeds must differ.
  orders = [
    ogv.visiting_order(jax.random.split(ogv.gradvac(5, key=seed).init(PARAMS).key)[1], 4, 5)
    for seed in (1, 2)
  ]
  assert not np.array_equal(*orders)


@pytest.mark.parametrize("form", ["raw-key", "int-seed"])
def test_key_through_inject_hyperparams(form):
  key = KEY_FORMS[form]()
  injected = optax.inject_hyperparams(ogv.gradvac, static_args=("num_tasks",))(
    num_tasks=NUM_TASKS, beta=0.5, key=key
  )
  plain = ogv.gradvac(NUM_TASKS, 0.5, key=jax.random.key(1))
  state, plain_state = injected.init(PARAMS), plain.init(PARAMS)
  updates, state = jax.jit(injected.update)(GRADS, state, PARAMS)
  expected, plain_state = plain.update(GRADS, plain_state, PARAMS)
  _assert_same((updates, state.inner_state), (expected, plain_state))


@pytest.mark.parametrize("form", ["typed-key", "raw-key"])
def test_state_owns_its_key_buffer(form):
  # Donating the state must not delete the key the transformation was built with.
  key = KEY_FORMS[form]()
  tx = ogv.gradvac(NUM_TASKS, key=key)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state):
    return tx.update(GRADS, state, PARAMS)[1]

  step(tx.init(PARAMS))
  assert not key.is_deleted()
  step(tx.init(PARAMS))


# fmt: off
BAD_KEYS = [
  case("float-seed", 1.5,
       TypeError, r"gradvac: key must be a typed key \(jax.random.key\), a raw key "
                  r"\(jax.random.PRNGKey: uint32 of shape \(2,\)\) or an integer seed, got float "
                  r"1.5"),
  case("bool-seed", True, TypeError, r"key must be a PRNG key or an integer seed, got bool True"),
  case("bool-array-seed", jnp.array(True), TypeError, r"got bool array of shape \(\)"),
  case("none", None, TypeError, r"or an integer seed, got NoneType None"),
  case("str", "0", TypeError, r"or an integer seed, got str '0'"),
  case("float-array", jnp.zeros(2),
       TypeError, r"or an integer seed, got float32 array of shape \(2,\)"),
  case("split-typed-keys", jax.random.split(jax.random.key(0)),
       ValueError, r"key must be a single key, got a key array of shape \(2,\).*jax.random.split"),
  case("split-raw-keys", jax.random.split(jax.random.PRNGKey(0)),
       TypeError, r"raw key \(jax.random.PRNGKey: uint32 of shape \(2,\)\).*got uint32 array of "
                  r"shape \(2, 2\)"),
  case("raw-key-wrong-length", jnp.zeros(3, jnp.uint32),
       TypeError, r"uint32 of shape \(2,\)\).*got uint32 array of shape \(3,\)"),
  case("raw-key-int32", jnp.zeros(2, jnp.int32),
       TypeError, r"uint32 of shape \(2,\)\).*got int32 array of shape \(2,\)"),
]
# fmt: on


@pytest.mark.parametrize(("key", "error", "match"), BAD_KEYS)
def test_bad_keys_fail_at_construction(key, error, match):
  with pytest.raises(error, match=match):
    ogv.gradvac(NUM_TASKS, key=key)
  with pytest.raises(error, match=match.replace("gradvac:", "visiting_order:")):
    ogv.visiting_order(key, 1, NUM_TASKS)


# 3. Gradients against params and num_tasks.

TRANSFORMS = {
  "gradvac": lambda: ogv.gradvac(NUM_TASKS, 0.1),
  "gradvac-callable-granularity": lambda: ogv.gradvac(
    NUM_TASKS, granularity=lambda tree: jax.tree.map(lambda _: "all", tree)
  ),
  "pcgrad": lambda: ogv.pcgrad(NUM_TASKS),
  "sum_tasks": lambda: ogv.sum_tasks(NUM_TASKS),
  "mean_tasks": lambda: ogv.mean_tasks(NUM_TASKS),
  "multi_steps": lambda: ogv.multi_steps(ogv.gradvac(NUM_TASKS), 2, num_tasks=NUM_TASKS),
}
# The name each transformation signs its messages with (pcgrad is gradvac with beta=0).
SIGNATURES = {
  "gradvac": "gradvac",
  "gradvac-callable-granularity": "gradvac",
  "pcgrad": "pcgrad",
  "sum_tasks": "sum_tasks",
  "mean_tasks": "mean_tasks",
  "multi_steps": "multi_steps",
}
# jit turns a Python float leaf into an array: that case runs eagerly only.
EAGER_ONLY = ("python-float-leaf",)

# (grads, params) -> the bad (grads, params); messages start with "{name}: ".
# fmt: off
GRADIENT_CASES = [
  case("python-float-leaf", lambda g, p: (_replace(g, ("head", "kernel"), 1.0), p),
       TypeError, r"gradient leaf 'head/kernel' is not an array: got float 1.0"),
  case("integer-leaf",
       lambda g, p: (_replace(g, ("head", "kernel"), jnp.ones((3, 3), jnp.int32)), p),
       TypeError, r"gradient leaf 'head/kernel' has dtype int32; per-task gradients must be "
                  r"floating point"),
  case("bool-leaf", lambda g, p: (_replace(g, ("dense", "bias"), jnp.ones((3, 3), bool)), p),
       TypeError, r"gradient leaf 'dense/bias' has dtype bool"),
  case("summed-over-tasks", lambda g, p: (jax.tree.map(lambda x: x.sum(0), g), p),
       ValueError, r"gradient leaf 'dense/bias' has shape \(3,\) but its parameter has shape "
                   r"\(3,\); expected \[num_tasks, \*param.shape\]"),
  # Without params, the summed dense/bias, shape (3,), passes for 3 tasks of a scalar.
  case("summed-without-params", lambda g, p: (jax.tree.map(lambda x: x.sum(0), g), None),
       ValueError, r"gradient leaf 'dense/kernel' has shape \(2, 3\), expected a leading task "
                   r"axis of size num_tasks=3"),
  case("too-few-tasks", lambda g, p: (jax.tree.map(lambda x: x[:2], g), p),
       ValueError, r"gradient leaf 'dense/bias' has shape \(2, 3\), expected a leading task axis "
                   r"of size num_tasks=3"),
  case("one-task", lambda g, p: (jax.tree.map(lambda x: x[:1], g), None),
       ValueError, r"gradient leaf 'dense/bias' has shape \(1, 3\), expected a leading task axis "
                   r"of size num_tasks=3"),
  case("one-leaf-without-task-axis",
       lambda g, p: (_replace(g, ("head", "kernel"), g["head"]["kernel"][0]), p),
       ValueError, r"gradient leaf 'head/kernel' has shape \(3,\) but its parameter has shape "
                   r"\(3,\)"),
  case("leaves-disagree-on-tasks",
       lambda g, p: (_replace(g, ("head", "kernel"), jnp.ones((4, 3))), None),
       ValueError, r"gradient leaf 'head/kernel' has shape \(4, 3\), expected a leading task axis "
                   r"of size num_tasks=3"),
  case("param-of-other-shape", lambda g, p: (g, _replace(p, ("head", "kernel"), jnp.zeros(4))),
       ValueError, r"gradient leaf 'head/kernel' has shape \(3, 3\) but its parameter has shape "
                   r"\(4,\)"),
  case("params-with-other-paths", lambda g, p: (g, {"dense": p["dense"], "out": p["head"]}),
       ValueError, r"the gradients \(3 leaves\) and params \(3 leaves\) are different trees: "
                   r"gradients leaves \['head/kernel'\] are not in params; params leaves "
                   r"\['out/kernel'\] are not in gradients"),
  case("params-renamed-leaf",
       lambda g, p: (g, _replace(p, ("dense",), {"w": p["dense"]["kernel"],
                                                  "bias": p["dense"]["bias"]})),
       ValueError, r"the gradients \(3 leaves\) and params \(3 leaves\) are different trees: "
                   r"gradients leaves \['dense/kernel'\] are not in params; params leaves "
                   r"\['dense/w'\] are not in gradients"),
  case("params-as-a-list",
       lambda g, p: (g, [p["dense"]["bias"], p["dense"]["kernel"], p["head"]["kernel"]]),
       ValueError, r"the gradients \(3 leaves\) and params \(3 leaves\) are different trees: "
                   r"gradients leaves \['dense/bias', 'dense/kernel', 'head/kernel'\] are not in "
                   r"params; params leaves \['0', '1', '2'\]"),
  case("params-with-an-extra-leaf", lambda g, p: (g, _replace(p, ("head", "bias"), jnp.zeros(1))),
       ValueError, r"the gradients \(3 leaves\) and params \(4 leaves\) are different trees: "
                   r"params leaves \['head/bias'\] are not in gradients"),
  case("params-missing-a-leaf", lambda g, p: (g, {"dense": p["dense"]}),
       ValueError, r"the gradients \(3 leaves\) and params \(2 leaves\) are different trees: "
                   r"gradients leaves \['head/kernel'\] are not in params\."),
]
# fmt: on


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize(
  ("run", "corrupt", "error", "match"), with_runs(GRADIENT_CASES, eager_only=EAGER_ONLY)
)
def test_gradients_must_match_params_and_num_tasks(run, corrupt, error, match, transform):
  tx = TRANSFORMS[transform]()
  state = tx.init(PARAMS)
  grads, params = corrupt(GRADS, PARAMS)
  with pytest.raises(error, match=f"{SIGNATURES[transform]}: {match}"):
    _call(run, tx.update, grads, state, params)


# 4. A state against the transformation that uses it.


def _gradvac_state(**kwargs):
  return ogv.gradvac(**{"num_tasks": NUM_TASKS, **kwargs}).init(PARAMS)


# Every case updates gradvac(NUM_TASKS) with granularity "layer" (2 groups).
# fmt: off
STATE_CASES = [
  case("chain-state", lambda: optax.chain(ogv.gradvac(NUM_TASKS), optax.sgd(1.0)).init(PARAMS),
       TypeError, r"gradvac: expected its own state, a GradVacState, got tuple"),
  case("empty-state", lambda: optax.EmptyState(),
       TypeError, r"expected its own state, a GradVacState, got EmptyState"),
  case("dict-state", lambda: _gradvac_state()._asdict(),
       TypeError, r"expected its own state, a GradVacState, got dict"),
  case("built-for-4-tasks", lambda: _gradvac_state(num_tasks=4),
       ValueError, r"state.targets has shape \(2, 4, 4\) but this transformation has num_tasks=3: "
                   r"expected \[num_groups, 3, 3\]. It was built for num_tasks=4"),
  case("built-for-2-tasks", lambda: _gradvac_state(num_tasks=2),
       ValueError, r"state.targets has shape \(2, 2, 2\).*num_tasks=3.*built for num_tasks=2"),
  case("built-for-model-groups", lambda: _gradvac_state(granularity="model"),
       ValueError, r"the gradients form 2 groups under granularity 'layer' but the state was "
                   r"initialised with 1"),
  case("built-for-tensor-groups", lambda: _gradvac_state(granularity="tensor"),
       ValueError, r"the gradients form 2 groups under granularity 'layer' but the state was "
                   r"initialised with 3"),
  case("targets-without-groups", lambda: _gradvac_state()._replace(targets=jnp.zeros((3, 3))),
       ValueError, r"state.targets has shape \(3, 3\) but this transformation has num_tasks=3: "
                   r"expected \[num_groups, 3, 3\]"),
  case("cosine-with-other-groups", lambda: _gradvac_state()._replace(cosine=jnp.zeros((1, 3, 3))),
       ValueError, r"state.cosine has shape \(1, 3, 3\) but state.targets has \(2, 3, 3\)"),
  case("corrected-with-other-tasks",
       lambda: _gradvac_state()._replace(corrected=jnp.zeros((2, 4, 4), bool)),
       ValueError, r"state.corrected has shape \(2, 4, 4\).*built for num_tasks=4"),
  case("integer-targets",
       lambda: _gradvac_state()._replace(targets=jnp.zeros((2, 3, 3), jnp.int32)),
       TypeError, r"state.targets has dtype int32, expected floating"),
  case("float-corrected", lambda: _gradvac_state()._replace(corrected=jnp.zeros((2, 3, 3))),
       TypeError, r"state.corrected has dtype float32, expected bool"),
  case("float-count", lambda: _gradvac_state()._replace(count=jnp.zeros(())),
       TypeError, r"state.count is float32 array of shape \(\), expected an int scalar"),
  case("raw-key-in-state", lambda: _gradvac_state()._replace(key=jax.random.PRNGKey(0)),
       TypeError, r"state.key is uint32 array of shape \(2,\), expected a single typed PRNG "
                  r"key.*from_bytes"),
  case("split-keys-in-state",
       lambda: _gradvac_state()._replace(key=jax.random.split(jax.random.key(0))),
       TypeError, r"state.key is key<fry> array of shape \(2,\), expected a single typed PRNG key"),
]
# fmt: on


@pytest.mark.parametrize(("run", "make_state", "error", "match"), with_runs(STATE_CASES))
def test_state_must_match_the_transformation(run, make_state, error, match):
  tx = ogv.gradvac(NUM_TASKS)
  with pytest.raises(error, match=match):
    _call(run, tx.update, GRADS, make_state(), PARAMS)


def _multi_steps(num_tasks=NUM_TASKS):
  return ogv.multi_steps(ogv.sum_tasks(num_tasks), 2, num_tasks=num_tasks)


# fmt: off
MULTI_STEPS_STATE_CASES = [
  case("optax-MultiSteps-state", lambda: optax.MultiSteps(ogv.sum_tasks(), 2).init(PARAMS),
       ValueError, r"multi_steps: state.acc_grads leaf 'dense/bias' has shape \(3,\) but its "
                   r"gradient has \(3, 3\).*not optax.MultiSteps\(...\).init"),
  case("built-for-2-tasks", lambda: _multi_steps(2).init(PARAMS),
       ValueError, r"state.acc_grads leaf 'dense/bias' has shape \(2, 3\) but its gradient has "
                   r"\(3, 3\)"),
  case("built-for-other-params", lambda: _multi_steps().init({"w": jnp.zeros(3)}),
       ValueError, r"the gradients \(3 leaves\) and state.acc_grads \(1 leaves\) are different "
                   r"trees"),
  case("inner-state", lambda: ogv.sum_tasks().init(PARAMS),
       TypeError, r"multi_steps: expected an optax.MultiStepsState, got EmptyState"),
]
# fmt: on


@pytest.mark.parametrize(
  ("run", "make_state", "error", "match"), with_runs(MULTI_STEPS_STATE_CASES)
)
def test_multi_steps_state_must_match(run, make_state, error, match):
  with pytest.raises(error, match=match):
    _call(run, _multi_steps().update, GRADS, make_state(), PARAMS)


# 5. Granularity callables against their tree.

# fmt: off
LABEL_CASES = [
  case("list-for-a-dict", lambda tree: ["a", "b", "c"],
       ValueError, r"returned 3 labels for a tree of 3 leaves: it must return a tree with the same "
                   r"paths.*no label for leaves \['dense/bias', 'dense/kernel', 'head/kernel'\], "
                   r"labels at paths \['0', '1', '2'\]"),
  case("too-few-labels", lambda tree: ["a"],
       ValueError, r"returned 1 labels for a tree of 3 leaves"),
  case("prefix-tree", lambda tree: {"dense": "a", "head": "b"},
       ValueError, r"no label for leaves \['dense/bias', 'dense/kernel', 'head/kernel'\], labels "
                   r"at paths \['dense', 'head'\]"),
  case("none-label",
       lambda tree: _replace(jax.tree.map(lambda _: "a", tree), ("dense", "bias"), None),
       ValueError, r"returned 2 labels for a tree of 3 leaves.*no label for leaves "
                   r"\['dense/bias'\]"),
  case("list-as-a-label",
       lambda tree: _replace(jax.tree.map(lambda _: "a", tree), ("head", "kernel"), ["b", "c"]),
       ValueError, r"no label for leaves \['head/kernel'\], labels at paths \['head/kernel/0', "
                   r"'head/kernel/1'\]"),
  case("other-keys", lambda tree: {"body": {"bias": 0, "kernel": 0}, "head": {"kernel": 1}},
       ValueError, r"no label for leaves \['dense/bias', 'dense/kernel'\], labels at paths "
                   r"\['body/bias', 'body/kernel'\]"),
  case("array-label", lambda tree: jax.tree.map(lambda _: jnp.array(0), tree),
       TypeError, r"returned int32 array of shape \(\) as the label of leaf 'dense/bias'; labels "
                  r"must be hashable"),
  case("set-label",
       lambda tree: _replace(jax.tree.map(lambda _: "a", tree), ("head", "kernel"), {"b"}),
       TypeError, r"returned set \{'b'\} as the label of leaf 'head/kernel'"),
]
# fmt: on

LABEL_USERS = {
  "group_names": lambda labels: ogv.group_names(PARAMS, labels),
  "gradvac.init": lambda labels: ogv.gradvac(NUM_TASKS, granularity=labels).init(PARAMS),
  "gradvac.update": lambda labels: ogv.gradvac(NUM_TASKS, granularity=labels).update(
    GRADS, _gradvac_state(), PARAMS
  ),
  "similarity_summary": lambda labels: ogv.similarity_summary(_gradvac_state(), PARAMS, labels),
}


@pytest.mark.parametrize("user", LABEL_USERS.values(), ids=LABEL_USERS)
@pytest.mark.parametrize(("labels", "error", "match"), LABEL_CASES)
def test_granularity_labels_must_match_the_tree(labels, error, match, user):
  with pytest.raises(error, match=match):
    user(labels)


# 6. Batches and their task axis.

W = {"w": jnp.ones(2)}
XS, YS = jnp.ones((NUM_TASKS, 4, 2)), jnp.zeros((NUM_TASKS, 4))


def _vector_loss(params, x, y):
  return (x @ params["w"] - y) ** 2


# fmt: off
TASK_CASES = [
  case("batch-axes-disagree", _loss, False, (XS, YS[:2]),
       ValueError, r"task_value_and_grad: task_batches\[1\] has shape \(2, 4\) but "
                   r"task_batches\[0\] has \(3, 4, 2\): every batch leaf needs the same leading "
                   r"task axis"),
  case("nested-batch-axes-disagree", lambda p, b: _loss(p, b["x"], b["y"]), False,
       ({"x": XS, "y": YS[0]},),
       ValueError, r"task_batches\[0\]\['y'\] has shape \(4,\) but task_batches\[0\]\['x'\] has "
                   r"\(3, 4, 2\)"),
  case("scalar-batch-leaf", lambda p, x, scale: _loss(p, x, 0.0) * scale, False, (XS, 2.0),
       ValueError, r"task_batches\[1\] has shape \(\), but every batch leaf needs a leading task "
                   r"axis"),
  case("no-batch", lambda p: jnp.sum(p["w"]), False, (),
       ValueError, r"task_value_and_grad: no batch arrays"),
  case("per-example-loss", _vector_loss, False, (XS, YS),
       ValueError, r"task_value_and_grad: loss_fn returned shape \(4,\) for one task's batch; it "
                   r"must return a scalar"),
  case("loss-of-shape-1", lambda p, x, y: _loss(p, x, y)[None], False, (XS, YS),
       ValueError, r"loss_fn returned shape \(1,\) for one task's batch"),
  case("pair-without-has_aux", lambda p, x, y: (_loss(p, x, y), {}), False, (XS, YS),
       TypeError, r"loss_fn returned a tuple of 2 items; return the loss alone, or a \(loss, aux\) "
                  r"pair with has_aux=True"),
  case("has_aux-without-pair", _loss, True, (XS, YS),
       TypeError, r"has_aux=True but loss_fn returned float32 array of shape \(\), not a \(loss, "
                  r"aux\) pair"),
  case("integer-loss", lambda p, x, y: jnp.sum(x > 0), False, (XS, YS),
       TypeError, r"loss_fn returned int32 array of shape \(\) as the loss; it must be a float"),
]
# fmt: on


@pytest.mark.parametrize(
  ("run", "loss_fn", "has_aux", "batches", "error", "match"), with_runs(TASK_CASES)
)
def test_task_batches_and_losses(run, loss_fn, has_aux, batches, error, match):
  value_and_grad = ogv.task_value_and_grad(loss_fn, has_aux=has_aux)
  with pytest.raises(error, match=match):
    _call(run, value_and_grad, W, *batches)


X, Y, IDS = jnp.ones((4, 2)), jnp.zeros(4), jnp.array([0, 1, 2, 0])

# fmt: off
SEGMENT_CASES = [
  case("batch-mean-loss", _loss, False, IDS,
       ValueError, r"segment_value_and_grad: loss_fn returned losses of shape \(\) but task_ids "
                   r"has shape \(4,\): it must return one loss per example, shape \(4,\); return "
                   r"the per-example losses, not their mean"),
  case("loss-of-shape-B-1", lambda p, x, y: _vector_loss(p, x, y)[:, None], False, IDS,
       ValueError, r"losses of shape \(4, 1\) but task_ids has shape \(4,\).*squeeze the trailing "
                   r"axes"),
  case("fewer-ids-than-examples", _vector_loss, False, IDS[:3],
       ValueError, r"losses of shape \(4,\) but task_ids has shape \(3,\).*one id per example"),
  case("more-ids-than-examples", _vector_loss, False, jnp.zeros(5, jnp.int32),
       ValueError, r"losses of shape \(4,\) but task_ids has shape \(5,\)"),
  case("float-ids", _vector_loss, False, IDS.astype(jnp.float32),
       TypeError, r"task_ids is float32 array of shape \(4,\), expected integer task ids; cast it"),
  case("bool-ids", _vector_loss, False, IDS > 0,
       TypeError, r"task_ids is bool array of shape \(4,\), expected integer task ids.*a mask"),
  case("2d-ids", _vector_loss, False, IDS.reshape(2, 2),
       ValueError, r"task_ids has shape \(2, 2\), expected one id per example, \[B\]"),
  case("scalar-id", _vector_loss, False, jnp.array(0),
       ValueError, r"task_ids has shape \(\), expected one id per example"),
  case("list-ids", _vector_loss, False, [0, 1, 2, 0],
       TypeError, r"task_ids must be an integer array \[B\], got list"),
  case("pair-without-has_aux", lambda p, x, y: (_vector_loss(p, x, y), None), False, IDS,
       TypeError, r"loss_fn returned a tuple of 2 items.*has_aux=True"),
  case("has_aux-without-pair", _vector_loss, True, IDS,
       TypeError, r"has_aux=True but loss_fn returned float32 array of shape \(4,\)"),
  case("integer-losses", lambda p, x, y: (x[:, 0] > 0).astype(jnp.int32), False, IDS,
       TypeError, r"loss_fn returned int32 array of shape \(4,\) as the loss; it must be a float"),
]
# fmt: on


@pytest.mark.parametrize(
  ("run", "loss_fn", "has_aux", "task_ids", "error", "match"), with_runs(SEGMENT_CASES)
)
def test_segment_task_ids_and_losses(run, loss_fn, has_aux, task_ids, error, match):
  value_and_grad = ogv.segment_value_and_grad(loss_fn, NUM_TASKS, has_aux=has_aux)
  with pytest.raises(error, match=match):
    _call(run, value_and_grad, W, task_ids, X, Y)


# 7. Checkpoints against their target.


def _saved_state(**kwargs):
  return ogv.to_bytes(_gradvac_state(**kwargs))


# fmt: off
CHECKPOINT_CASES = [
  case("other-num_tasks", lambda: _gradvac_state(num_tasks=4), _saved_state,
       ValueError, r"from_bytes: leaf 'corrected' is bool\[2, 3, 3\] in the bytes but bool\[2, 4, "
                   r"4\] in the target"),
  case("other-num_tasks-abstract", lambda: jax.eval_shape(ogv.gradvac(4).init, PARAMS),
       _saved_state,
       ValueError, r"leaf 'corrected' is bool\[2, 3, 3\] in the bytes but bool\[2, 4, 4\] in the "
                   r"target"),
  case("other-granularity", lambda: _gradvac_state(granularity="model"), _saved_state,
       ValueError, r"leaf 'corrected' is bool\[2, 3, 3\] in the bytes but bool\[1, 3, 3\] in the "
                   r"target"),
  case("other-dtype", lambda: {"w": jnp.zeros(3, jnp.bfloat16)},
       lambda: ogv.to_bytes({"w": jnp.zeros(3)}),
       ValueError, r"leaf 'w' is float32\[3\] in the bytes but bfloat16\[3\] in the target"),
  case("other-key-implementation", lambda: _gradvac_state(key=jax.random.key(0, impl="rbg")),
       _saved_state,
       ValueError, r"leaf 'key' is uint32\[2\] in the bytes but uint32\[4\] in the target"),
  case("bare-state-for-a-chain", lambda: _gradvac_state(),
       lambda: ogv.to_bytes(optax.chain(ogv.gradvac(NUM_TASKS), optax.sgd(1.0)).init(PARAMS)),
       ValueError, r"from_bytes: the bytes and the target are different trees: leaves "
                   r"\['0/corrected', '0/cosine', '0/count'\] are only in the bytes, leaves "
                   r"\['corrected', 'cosine', 'count'\] only in the target"),
  case("other-parameter-names", lambda: {"params": {"v": jnp.zeros(3)}},
       lambda: ogv.to_bytes({"params": {"w": jnp.zeros(3)}}),
       ValueError, r"leaves \['params/w'\] are only in the bytes, leaves \['params/v'\] only in "
                   r"the target"),
]
# fmt: on


@pytest.mark.parametrize(("target", "saved", "error", "match"), CHECKPOINT_CASES)
def test_checkpoint_must_match_its_target(target, saved, error, match):
  with pytest.raises(error, match=match):
    ogv.from_bytes(target(), saved())


# 8. Logging.

# fmt: off
SUMMARY_CASES = [
  case("no-gradvac-state", lambda s: ogv.similarity_summary(optax.adam(1.0).init(PARAMS), PARAMS),
       ValueError, r"similarity_summary: no GradVacState \(nor any other Gram-based method.s "
                   r"state\) in the optimizer state"),
  case("other-granularity", lambda s: ogv.similarity_summary(s, PARAMS, "tensor"),
       ValueError, r"similarity_summary: params form 3 groups under granularity 'tensor' but the "
                   r"state has 2"),
  case("granularity-typo", lambda s: ogv.similarity_summary(s, PARAMS, "layers"),
       ValueError, r"Unknown granularity 'layers'"),
  case("other-params", lambda s: ogv.similarity_summary(s, {"w": jnp.zeros(3)}),
       ValueError, r"params form 1 groups under granularity 'layer' but the state has 2"),
  case("too-few-task-names", lambda s: ogv.similarity_summary(s, PARAMS, task_names=["en", "fr"]),
       ValueError, r"similarity_summary: 2 task names for 3 tasks"),
  case("task-names-str", lambda s: ogv.similarity_summary(s, PARAMS, task_names="abc"),
       TypeError, r"task_names must be a list of names, one per task, got str 'abc'"),
  case("task-names-repeated",
       lambda s: ogv.similarity_summary(s, PARAMS, task_names=["en", "fr", "en"]),
       ValueError, r"task_names repeats \['en'\]; every task needs its own name"),
  case("task-names-unhashable",
       lambda s: ogv.similarity_summary(s, PARAMS, task_names=[["en"], "fr", "de"]),
       TypeError, r"task name \['en'\] is not hashable"),
  case("task-names-set",
       lambda s: ogv.similarity_summary(s, PARAMS, task_names={"en", "fr", "de"}),
       TypeError, r"task_names must be a list of names.*got set"),
]
# fmt: on


@pytest.mark.parametrize(("summarise", "error", "match"), SUMMARY_CASES)
def test_similarity_summary_arguments(summarise, error, match):
  state = optax.chain(ogv.gradvac(NUM_TASKS), optax.sgd(1.0)).init(PARAMS)
  with pytest.raises(error, match=match):
    summarise(state)


# 9. The pure functions.

ORDER = ogv.visiting_order(None, 1, NUM_TASKS, shuffle=False)[0]
EYE, ZEROS = jnp.eye(NUM_TASKS), jnp.zeros((NUM_TASKS, NUM_TASKS))

# fmt: off
PURE_CASES = [
  case("cosine-non-square", lambda: ogv.pairwise_cosine(jnp.ones((3, 2))),
       ValueError, r"pairwise_cosine: gram has shape \(3, 2\), expected \[..., T, T\]"),
  case("cosine-vector", lambda: ogv.pairwise_cosine(jnp.ones(3)),
       ValueError, r"pairwise_cosine: gram has shape \(3,\)"),
  case("coefficients-batched-gram",
       lambda: ogv.gradvac_coefficients(jnp.stack([EYE, EYE]), ZEROS, ORDER, 0.1),
       ValueError, r"gradvac_coefficients: gram has shape \(2, 3, 3\), expected \[T, T\] for one "
                   r"parameter group \(jax.vmap over groups\)"),
  case("coefficients-non-square",
       lambda: ogv.gradvac_coefficients(jnp.ones((3, 2)), ZEROS, ORDER, 0.1),
       ValueError, r"gram has shape \(3, 2\), expected \[T, T\]"),
  case("coefficients-batched-targets",
       lambda: ogv.gradvac_coefficients(EYE, ZEROS[None], ORDER, 0.1),
       ValueError, r"targets has shape \(1, 3, 3\) but gram has \(3, 3\): expected \(3, 3\)"),
  case("coefficients-batched-order",
       lambda: ogv.gradvac_coefficients(EYE, ZEROS, ORDER[None], 0.1),
       ValueError, r"order has shape \(1, 3, 2\) but gram has \(3, 3\): expected \(3, 2\)"),
  case("coefficients-square-order",
       lambda: ogv.gradvac_coefficients(EYE, ZEROS, jnp.zeros((3, 3), jnp.int32), 0.1),
       ValueError, r"order has shape \(3, 3\).*expected \(3, 2\)"),
  case("coefficients-float-order",
       lambda: ogv.gradvac_coefficients(EYE, ZEROS, ORDER.astype(float), 0.1),
       TypeError, r"order has dtype float32, expected integer task indices"),
  case("coefficients-beta", lambda: ogv.gradvac_coefficients(EYE, ZEROS, ORDER, 2.0),
       ValueError, r"gradvac_coefficients: beta must be in \[0, 1\], got 2.0"),
  case("coefficients-eps", lambda: ogv.gradvac_coefficients(EYE, ZEROS, ORDER, 0.1, eps=0.0),
       ValueError, r"gradvac_coefficients: eps must be positive and finite, got 0.0"),
  case("coefficients-vector-beta",
       lambda: ogv.gradvac_coefficients(EYE, ZEROS, ORDER, jnp.zeros(3)),
       ValueError, r"beta must be a scalar, got float32 array of shape \(3,\)"),
]
# fmt: on


@pytest.mark.parametrize(("call", "error", "match"), PURE_CASES)
def test_pure_function_arguments(call, error, match):
  with pytest.raises(error, match=match):
    call()


# 10. Unusual but valid input: the checks must let it through.


def _plain_sum(grads):
  return jax.tree.map(lambda g: np.asarray(g).sum(0), grads)


def _frozen_params():
  tx = ogv.sum_tasks(NUM_TASKS)
  updates, _ = tx.update(GRADS, tx.init(PARAMS), flax.core.FrozenDict(PARAMS))
  _assert_same(updates, _plain_sum(GRADS))


def _numpy_num_tasks():
  tx = ogv.gradvac(np.int64(NUM_TASKS), 0.0, shuffle=False)
  updates, state = tx.update(GRADS, tx.init(PARAMS), PARAMS)
  reference = ogv.gradvac(NUM_TASKS, 0.0, shuffle=False)
  _assert_same((updates, state), reference.update(GRADS, reference.init(PARAMS), PARAMS))


def _array_beta_and_int_eps():
  tx = ogv.gradvac(NUM_TASKS, jnp.asarray(0.5), eps=1, shuffle=False)
  reference = ogv.gradvac(NUM_TASKS, 0.5, eps=1.0, shuffle=False)
  _assert_same(
    tx.update(GRADS, tx.init(PARAMS), PARAMS),
    reference.update(GRADS, reference.init(PARAMS), PARAMS),
  )


def _integer_labels():
  labels = {"dense": {"kernel": 0, "bias": 0}, "head": {"kernel": 1}}
  assert ogv.group_names(PARAMS, lambda tree: labels) == ("0", "1")


def _labels_for_frozen_params():
  # A FrozenDict of params and a dict of labels name the same leaves.
  labels = lambda tree: {"dense": {"kernel": "a", "bias": "a"}, "head": {"kernel": "b"}}  # noqa: E731
  assert ogv.group_names(flax.core.FrozenDict(PARAMS), labels) == ("a", "b")


def _unsigned_and_wide_task_ids():
  value_and_grad = ogv.segment_value_and_grad(_vector_loss, NUM_TASKS)
  reference = value_and_grad(W, IDS, X, Y)
  for dtype in (jnp.uint8, jnp.int16):
    _assert_same(value_and_grad(W, IDS.astype(dtype), X, Y), reference)


def _numpy_task_ids():
  value_and_grad = ogv.segment_value_and_grad(_vector_loss, NUM_TASKS)
  _assert_same(value_and_grad(W, np.asarray(IDS), X, Y), value_and_grad(W, IDS, X, Y))


def _batch_with_none_and_nested_leaves():
  value_and_grad = ogv.task_value_and_grad(lambda p, b, mask: _loss(p, b["x"], b["y"]))
  losses, _ = value_and_grad(W, {"x": XS, "y": YS}, None)
  np.testing.assert_allclose(losses, np.full(NUM_TASKS, 4.0))


def _numpy_array_of_task_names():
  state = ogv.gradvac(NUM_TASKS).init(PARAMS)
  summary = ogv.similarity_summary(state, PARAMS, task_names=np.array(["en", "fr", "de"]))
  assert list(summary["task_cosine"]) == ["en", "fr", "de"]


def _params_none():
  tx = ogv.pcgrad(NUM_TASKS)
  updates, _ = tx.update(GRADS, tx.init(PARAMS))
  assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, PARAMS)


def _one_task():
  tx = ogv.gradvac(1)
  grads = _stacked(PARAMS, num_tasks=1)
  updates, _ = tx.update(grads, tx.init(PARAMS), PARAMS)
  _assert_same(updates, _plain_sum(grads))


def _visiting_order_int_seed():
  np.testing.assert_array_equal(
    ogv.visiting_order(7, 2, 4), ogv.visiting_order(jax.random.key(7), 2, 4)
  )


def _restore_abstract_target():
  state = optax.chain(ogv.gradvac(NUM_TASKS, key=3), optax.adam(1.0)).init(PARAMS)
  target = jax.eval_shape(optax.chain(ogv.gradvac(NUM_TASKS), optax.adam(1.0)).init, PARAMS)
  restored = ogv.from_bytes(target, ogv.to_bytes(state))
  np.testing.assert_array_equal(jax.random.key_data(restored[0].key), [0, 3])
  _assert_same(restored[1], state[1])


VALID = {
  "frozen-dict-params": _frozen_params,
  "numpy-num_tasks": _numpy_num_tasks,
  "array-beta-and-int-eps": _array_beta_and_int_eps,
  "integer-labels": _integer_labels,
  "dict-labels-for-frozen-params": _labels_for_frozen_params,
  "uint8-and-int16-task-ids": _unsigned_and_wide_task_ids,
  "numpy-task-ids": _numpy_task_ids,
  "none-and-nested-batch-leaves": _batch_with_none_and_nested_leaves,
  "numpy-array-of-task-names": _numpy_array_of_task_names,
  "params-none": _params_none,
  "one-task": _one_task,
  "visiting-order-int-seed": _visiting_order_int_seed,
  "restore-into-abstract-target": _restore_abstract_target,
}


@pytest.mark.parametrize("check", VALID.values(), ids=VALID)
def test_valid_unusual_input_passes(check):
  check()


# 11. Groups that cannot follow the model: stacks of unrolled layers, one group for many leaves.

_BLOCK = {"dense": {"kernel": jnp.zeros((4, 4)), "bias": jnp.zeros(4)}}
UNROLLED = {
  # A Python list of blocks, an nnx list (int keys) and a dict keyed by paths.
  "list": ({"blocks": [_BLOCK, _BLOCK, _BLOCK], "head": {"w": jnp.zeros(4)}}, "blocks", 3),
  "int-keys": ({"encoder": {0: _BLOCK, 1: _BLOCK}}, "encoder", 2),
  "path-keys": (
    {"blocks/0/kernel": jnp.zeros((4, 4)), "blocks/1/kernel": jnp.zeros((4, 4))},
    "blocks",
    2,
  ),
}


@pytest.mark.parametrize(
  ("run", "params", "prefix", "count"),
  [
    pytest.param(run, *UNROLLED[name], id=f"{name}-{run}")
    for name in UNROLLED
    for run in ("eager", "jit")
  ],
)
def test_stacked_layers_reject_unrolled_blocks(run, params, prefix, count):
  tx = ogv.gradvac(NUM_TASKS, granularity=ogv.StackedLayers(prefix))
  match = (
    rf"StackedLayers: the subtree under '{prefix}' is a sequence of {count} subtrees "
    rf"\('{prefix}/0', '{prefix}/1'.*an unrolled model.*Use granularity='layer'"
  )
  with pytest.raises(ValueError, match=match):
    _call(run, tx.init, params)
  with pytest.raises(ValueError, match=match):
    ogv.group_names(params, ogv.StackedLayers(prefix))


def test_stacked_layers_accept_stacks_named_by_their_elements():
  # A stack whose blocks are a tuple of stacked sublayers: each element is named.
  stack = {"blocks": ({"w": jnp.zeros((2, 4))}, {"w": jnp.zeros((2, 3))})}
  assert ogv.group_names(stack, ogv.StackedLayers("blocks/0", "blocks/1")) == (
    "blocks/0/0",
    "blocks/0/1",
    "blocks/1/0",
    "blocks/1/1",
  )


ONE_GROUP = r"granularity 'layer' puts all 3 leaves in one group, 'params', as 'model' would"


def test_one_group_for_many_leaves_warns_at_init_and_trace_time():
  # linen variables, not params: the parameters of the top-level module under one parent
  variables = {"params": {"w": jnp.zeros(3), "b": jnp.zeros(3), "scale": jnp.zeros(())}}
  tx = ogv.gradvac(NUM_TASKS)
  with pytest.warns(UserWarning, match=ONE_GROUP + r".*variables\['params'\].*'model'"):
    state = tx.init(variables)
  with pytest.warns(UserWarning, match=ONE_GROUP):
    jax.eval_shape(tx.update, _stacked(variables), state, variables)
  with pytest.warns(UserWarning, match=ONE_GROUP):
    assert ogv.group_names(variables, "layer") == ("params",)


def test_groups_that_follow_the_model_do_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    assert ogv.group_names({"w": jnp.zeros(3), "b": jnp.zeros(3)}, "layer") == ("b", "w")
    assert ogv.group_names({"params": {"w": jnp.zeros(3)}}, "layer") == ("params",)
    one_layer = {"dense": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
    assert ogv.group_names(one_layer, "layer") == ("dense",)
    assert ogv.group_names({"params": {"w": jnp.zeros(3), "b": jnp.zeros(3)}}, "model")
    assert ogv.group_names(jnp.zeros(3), "layer") == ("<root>",)


def test_low_memory_path_on_stacked_layers_warns():
  params = {"blocks": {"w": jnp.ones((2, 3))}, "head": {"w": jnp.ones(3)}}
  tx = ogv.gradvac(NUM_TASKS, granularity=ogv.StackedLayers("blocks"))

  def task_grads_fn(params):
    return jnp.zeros(NUM_TASKS), _stacked(params)

  match = (
    r"gradvac: task_grads_fn with granularity StackedLayers\(.*\): the low-memory path "
    r"recomputes the scanned stack's per-task gradients and holds them whole; use the "
    r"stacked path"
  )
  with pytest.warns(UserWarning, match=match):
    jax.eval_shape(
      functools.partial(tx.update, task_grads_fn=task_grads_fn), None, tx.init(params), params
    )
