"""One pipeline for every Gram-based method.

A method is a pure function from the ``[num_groups, T, T]`` Gram matrices of the
per-task gradients (and its state) to ``[num_groups, T]`` task weights: the update
of group ``g`` is ``sum_t weights[g, t] grad_t``. Everything else lives here once:
the input checks, the parameter groups, the Gram pass, non-finite and overflowing
gradients, the state fields every method logs, and the weighted sum.
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pytree
from optax_gradvac._gram import pairwise_cosine

State = Any  # a NamedTuple with at least the fields of GramState.


class GramState(NamedTuple):
  """State of a Gram-based method that keeps nothing between steps but what it logs."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  weights: jax.Array  # [num_groups, T]: the task weights of the last step.


LOGGED_FIELDS = GramState._fields


def is_gram_state(node: Any) -> bool:
  """Whether ``node`` is the state of a Gram-based method (it has every logged field)."""
  return isinstance(node, tuple) and set(LOGGED_FIELDS) <= set(getattr(node, "_fields", ()))


class Method(NamedTuple):
  """What the pipeline needs to know about a Gram-based method.

  Attributes:
    name: the public name, used in error messages.
    init: ``(num_groups, num_tasks, dtype) -> state``; the state is a NamedTuple
      with (at least) the fields of :class:`GramState`.
    weigh: ``(gram [G, T, T], state) -> (weights [G, T], state)``: the task
      weights of every group, and the method's own fields of the new state (the
      pipeline fills in ``count``, ``cosine`` and ``weights``).
    fallback: the weight of every task when a gradient is not finite.
    homogeneous: whether the method's update is homogeneous of degree 1 in the
      gradients (``c g`` gives ``c`` times the update); otherwise of degree 0.
  """

  name: str
  init: Callable[[int, int, jnp.dtype], State]
  weigh: Callable[[jax.Array, State], tuple[jax.Array, State]]
  fallback: float = 1.0
  homogeneous: bool = True


def gram_state(num_groups: int, num_tasks: int, dtype: jnp.dtype) -> GramState:
  """The logged fields at initialisation, each in a buffer of its own (donation-safe)."""
  return GramState(
    count=jnp.zeros([], jnp.int32),
    cosine=jnp.zeros((num_groups, num_tasks, num_tasks), dtype),
    weights=jnp.zeros((num_groups, num_tasks), dtype),
  )


def stateless(name: str, group_weights: Callable[[jax.Array], jax.Array], **options: Any) -> Method:
  """A :class:`Method` whose weights are a pure function of one group's ``[T, T]`` Gram."""

  def weigh(gram: jax.Array, state: GramState) -> tuple[jax.Array, GramState]:
    return jax.vmap(group_weights)(gram), state

  return Method(name, gram_state, weigh, **options)


def gram_transformation(
  method: Method, num_tasks: int, granularity: _pytree.Granularity
) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of a Gram-based method.

  ``update`` checks the stacked per-task gradients, reduces every group to its
  ``[T, T]`` Gram matrix (one pass over the gradients), asks the method for the
  task weights and forms the update (a second pass). If any gradient entry is
  NaN or inf, the update is ``method.fallback`` times the sum and the state is
  unchanged; finite gradients whose squares overflow are rescaled by a power of
  two first, which changes no result.
  """
  _checks.check_num_tasks(method.name, num_tasks)
  _pytree.check_granularity(granularity)

  def init_fn(params: optax.Params) -> State:
    _checks.check_arrays(method.name, "parameter", params)
    names, _ = _pytree.leaf_groups(params, granularity)
    floating = [
      leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)
    ]
    return method.init(len(names), num_tasks, _pytree.compute_dtype(floating))

  def update_fn(
    updates: optax.Updates,
    state: State,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, State]:
    del extra_args
    leaves, _ = _pytree.check_task_axis(method.name, updates, params, num_tasks)
    expected = jax.eval_shape(lambda: method.init(1, num_tasks, jnp.dtype(jnp.float32)))
    _checks.check_state(method.name, state, expected)
    names, groups = _pytree.leaf_groups(updates, granularity, task_axis=True)
    if len(names) != state.cosine.shape[0]:
      raise ValueError(
        f"{method.name}: the gradients form {len(names)} groups under granularity "
        f"{granularity!r} but the state was initialised with {state.cosine.shape[0]}: "
        "init and update must see trees with the same paths."
      )
    if not leaves:
      return updates, state

    dtype = _pytree.compute_dtype([*leaves, state.cosine])
    gram, scale = _pytree.scaled_gram_matrices(leaves, groups, len(names), dtype)
    weights, new_state = method.weigh(gram, state)
    if not method.homogeneous:
      # The weights are those of the gradients divided by `scale`.
      weights = weights / scale
    # A NaN or inf entry makes its task's squared norm non-finite: one check on
    # the Gram diagonal, no extra pass over the gradients.
    finite = jnp.all(jnp.isfinite(jnp.diagonal(gram, axis1=1, axis2=2)))
    weights = jnp.where(finite, weights, jnp.asarray(method.fallback, weights.dtype))
    new_state = new_state._replace(
      count=optax.safe_increment(state.count),
      cosine=pairwise_cosine(gram).astype(state.cosine.dtype),
      weights=weights.astype(state.weights.dtype),
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    reduced = [
      _pytree.weighted_sum(leaf, weights, group) for leaf, group in zip(leaves, groups, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(updates), reduced), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
