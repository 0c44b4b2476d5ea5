"""One pipeline for every Gram-based method.

A method is a pure function from the ``[num_groups, T, T]`` Gram matrices of the
per-task gradients (and its state) to ``[num_groups, T]`` task weights: the update
of group ``g`` is ``sum_t weights[g, t] grad_t``. Everything else lives here once:
the input checks, the parameter groups, the Gram pass, non-finite and overflowing
gradients, the state fields every method logs, and the weighted sum.
"""

import warnings
import weakref
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
    weigh: ``(gram [G, T, T], state, **inputs) -> (weights [G, T], state)``: the task
      weights of every group, and the method's own fields of the new state (the
      pipeline fills in ``count``, ``cosine`` and ``weights``). It is called on
      consecutive chunks of the groups, with the state's fields that have a
      groups axis sliced alike (see :func:`_pytree.stream_chunks`): a group's
      weights and state may depend on its own Gram matrix and state only, and
      the fields without a groups axis (a key) must come out of every call alike.
    fallback: the weight of every task of a group whose gradients are not finite.
    homogeneous: whether the method's update is homogeneous of degree 1 in the
      gradients (``c g`` gives ``c`` times the update); otherwise of degree 0.
      A method of another degree takes ``"scale"`` among its ``inputs`` and
      corrects its weights itself.
    inputs: what ``weigh`` also needs, passed to it as keyword arguments of
      these names: ``"scale"``, the ``[G]`` powers of two that the Gram matrices
      were divided by (see :func:`_pytree.scaled_gram_matrices`; 1 unless they
      overflowed), ``"groups"``, the :class:`Groups` of the call, or the
      name of an extra keyword argument of ``update`` (such as ``"losses"``;
      ``None`` when the caller did not pass it).
  """

  name: str
  init: Callable[[int, int, jnp.dtype], State]
  weigh: Callable[..., tuple[jax.Array, State]]
  fallback: float = 1.0
  homogeneous: bool = True
  inputs: tuple[str, ...] = ()


class Groups(NamedTuple):
  """The groups a call of ``weigh`` is given: their indices among ``total``.

  ``index`` may be traced (a scanned layer's groups, see :func:`tap`).
  """

  index: jax.Array  # [G] int32
  total: int


def per_group_fields(method: Method, num_tasks: int) -> Any:
  """The state's structure, with True at the leaves that have a leading groups axis."""
  one, two = (
    jax.eval_shape(lambda size=size: method.init(size, num_tasks, jnp.dtype(jnp.float32)))
    for size in (1, 2)
  )
  return jax.tree.map(lambda a, b: a.shape != b.shape, one, two)


def _shifted(group: _pytree.Group, start: int) -> _pytree.Group:
  """``group``, numbered from ``start`` (the first group of its chunk)."""
  if isinstance(group, tuple):
    return tuple(member - start for member in group)
  return group - start


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


def after(tree: Any, dependency: Any) -> Any:
  """``tree``, equal but computed from ``dependency``: what follows waits for it.

  Without this, the second call of the same gradient function on the same
  parameters is a copy of the first that XLA merges into it (common
  subexpression elimination), which keeps every gradient alive until the
  weighted sum; and XLA:CPU's scheduler may run what reads ``tree`` before
  ``dependency`` is done. An optimization barrier alone is not enough: XLA:CPU
  removes barriers. So the floating-point leaves are also multiplied by a one
  that XLA cannot prove to be one: ``1 + min(|s|, 0)`` with ``s`` a sum of
  ``dependency`` (a NaN ``s`` mapped to 0). Multiplying by one changes no value.
  """
  leaves, treedef = jax.tree.flatten(tree)
  floating = [i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating)]
  kept, dependency = jax.lax.optimization_barrier(([leaves[i] for i in floating], dependency))
  total = sum(jnp.sum(leaf.astype(jnp.float32)) for leaf in jax.tree.leaves(dependency))
  one = 1 + jnp.where(jnp.isnan(total), 0, jnp.minimum(jnp.abs(total), 0))
  for i, leaf in zip(floating, kept, strict=True):
    leaves[i] = leaf * one.astype(leaf.dtype)
  return jax.tree.unflatten(treedef, leaves)


def _like_params(updates: optax.Updates, params: optax.Params | None) -> optax.Updates:
  """``updates`` in the sharding of ``params`` where their Explicit shardings differ.

  Gradients may be split differently from their parameters (reduce-scattered
  over a data-parallel axis by ``task_value_and_grad(..., batch_axis=...)``);
  ``optax.apply_updates`` then needs the update in the parameter's sharding.
  """
  if params is None:
    return updates

  def like(update: jax.Array, param: Any) -> jax.Array:
    if not isinstance(param, jax.Array) or not jax.typeof(param).sharding.mesh.explicit_axes:
      return update
    spec = jax.typeof(param).sharding.spec
    if jax.typeof(update).sharding.spec == spec:
      return update
    return jax.sharding.reshard(update, spec)

  return jax.tree.map(like, updates, params)


class Registered(NamedTuple):
  """What :func:`gram_transformation` was built from, found again from its ``update``."""

  method: Method
  num_tasks: int
  granularity: _pytree.Granularity


_REGISTERED: "weakref.WeakKeyDictionary[Callable[..., Any], Registered]" = (
  weakref.WeakKeyDictionary()
)


def registered(tx: Any) -> Registered | None:
  """The method behind ``tx``, if ``tx`` is a Gram-based transformation of this library."""
  update = getattr(tx, "update", None)
  try:
    return _REGISTERED.get(update)
  except TypeError:  # not weakly referenceable: not ours
    return None


TASK_GRADS_FN = "task_grads_fn"  # the extra argument of update that selects the low-memory path


def _warn_if_scanned(name: str, granularity: _pytree.Granularity) -> None:
  """Warns that the low-memory path does not stream the gradients of stacked layers.

  A scan's backward pass produces the per-task gradients of the whole stack at
  once, in each of the two passes (linen ``nn.scan``, T = 8: 327 P of scratch
  against 116 P on the stacked path).
  """
  if isinstance(granularity, _pytree.StackedLayers):
    warnings.warn(
      f"{name}: task_grads_fn with granularity {granularity!r}: the low-memory path "
      "recomputes the scanned stack's per-task gradients and holds them whole; use the "
      "stacked path (pass the stacked per-task gradients to update).",
      stacklevel=1,
    )


def weigh_groups(
  method: Method,
  gram: jax.Array,
  scale: jax.Array,
  finite: jax.Array,
  state: State,
  groups: Groups,
  extra_args: dict[str, Any],
) -> tuple[jax.Array, State]:
  """The weights of some groups from their (scaled) Gram matrices, and their new state.

  ``state`` holds these groups' rows of the per-group fields. A group whose
  gradients are not finite takes ``method.fallback`` as every task's weight.
  """
  available = {**extra_args, "scale": scale, "groups": groups}
  inputs = {name: available.get(name) for name in method.inputs}
  weights, new_state = method.weigh(gram, state, **inputs)
  if not method.homogeneous:
    # The weights are those of the gradients divided by `scale` (per group).
    weights = weights / scale[:, None]
  return jnp.where(finite[:, None], weights, jnp.asarray(method.fallback, weights.dtype)), new_state


def gram_transformation(
  method: Method, num_tasks: int, granularity: _pytree.Granularity
) -> optax.GradientTransformationExtraArgs:
  """The optax transformation of a Gram-based method.

  ``update`` checks the stacked per-task gradients, reduces every group to its
  ``[T, T]`` Gram matrix (one pass over the gradients), asks the method for the
  task weights and forms the update (a second pass). The groups' weights are
  computed chunk by chunk (:func:`_pytree.stream_chunks`), each from its own
  Gram matrices, so that within one jitted step XLA can reduce each chunk's
  gradients as soon as the backward pass has made them (how much it does is
  its scheduler's choice). A group with a NaN or inf gradient entry takes
  ``method.fallback`` times its sum (its update is not finite, so a later
  ``optax.apply_if_finite`` skips the step), and then the whole state is kept;
  finite gradients whose squares overflow are rescaled by a power of two first,
  which changes no result.

  With ``update(None, state, params, task_grads_fn=fn)``, the two passes each
  compute the gradients ``fn(params)[1]`` afresh (the low-memory path): the
  first reduces every leaf to its Gram matrix as soon as it exists, the second
  to its weighted sum, so the ``T x P`` stacked gradients never exist at once.
  The second pass reads ``params`` computed from the weights (:func:`after`), so
  XLA can neither start it early nor merge the two identical computations into
  one. sum_tasks and mean_tasks need one pass only.
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

  def task_gradients(
    updates: optax.Updates, params: optax.Params | None, task_grads_fn: Any
  ) -> tuple[Any, Callable[[Any], list[jax.Array]]]:
    """The gradient tree (for its structure), and ``leaves_after`` for the passes."""
    if task_grads_fn is None:
      leaves, _ = _pytree.check_task_axis(method.name, updates, params, num_tasks)
      return updates, lambda dependency: leaves
    _checks.check_task_grads_call(method.name, updates, params, task_grads_fn)
    _warn_if_scanned(method.name, granularity)

    def computed(dependency: Any) -> Any:
      inputs = params if dependency is None else after(params, dependency)
      grads = _checks.check_task_grads_output(method.name, task_grads_fn(inputs))
      _pytree.check_task_axis(method.name, grads, params, num_tasks)
      return grads

    grads = computed(None)
    first = jax.tree.leaves(grads)

    def leaves_after(dependency: Any) -> list[jax.Array]:
      return first if dependency is None else jax.tree.leaves(computed(dependency))

    return grads, leaves_after

  def update_fn(
    updates: optax.Updates,
    state: State,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, State]:
    tree, leaves_after = task_gradients(updates, params, extra_args.get(TASK_GRADS_FN))
    expected = jax.eval_shape(lambda: method.init(1, num_tasks, jnp.dtype(jnp.float32)))
    _checks.check_state(method.name, state, expected)
    leaves = leaves_after(None)
    names, groups = _pytree.leaf_groups(tree, granularity, task_axis=True)
    if len(names) != state.cosine.shape[0]:
      raise ValueError(
        f"{method.name}: the gradients form {len(names)} groups under granularity "
        f"{granularity!r} but the state was initialised with {state.cosine.shape[0]}: "
        "init and update must see trees with the same paths."
      )
    if not leaves:
      return tree, state

    dtype = _pytree.compute_dtype([*leaves, state.cosine])
    recomputed = extra_args.get(TASK_GRADS_FN) is not None
    if recomputed:  # every pass computes all the gradients: one chunk
      chunks = [_pytree.Chunk(0, len(names), list(range(len(leaves))))]
    else:
      chunks = _pytree.stream_chunks(leaves, groups)
    per_group = per_group_fields(method, num_tasks)
    reduced: list[Any] = [None] * len(leaves)
    parts = []
    for chunk in chunks:
      local = [_shifted(groups[index], chunk.start) for index in chunk.leaves]

      def chunk_leaves(dependency: Any, chunk: _pytree.Chunk = chunk) -> list[jax.Array]:
        computed = leaves_after(dependency)
        return [computed[index] for index in chunk.leaves]

      gram, scale, finite = _pytree.scaled_gram_matrices(
        chunk_leaves,
        local,
        chunk.stop - chunk.start,
        dtype,
        recomputed=recomputed,
        model_leaves=leaves,
      )
      chunk_groups = slice(chunk.start, chunk.stop)
      sliced = jax.tree.map(
        lambda field, grouped, part=chunk_groups: field[part] if grouped else field,
        state,
        per_group,
      )
      given = Groups(jnp.arange(chunk.start, chunk.stop), len(names))
      weights, new_state = weigh_groups(method, gram, scale, finite, sliced, given, extra_args)
      for index, leaf, group in zip(chunk.leaves, chunk_leaves(weights), local, strict=True):
        reduced[index] = _pytree.weighted_sum(leaf, weights, group)
      parts.append((gram, weights, new_state, finite))

    grams, weights, states, finite = zip(*parts, strict=True)
    gram, weights = jnp.concatenate(grams), jnp.concatenate(weights)
    new_state = jax.tree.map(
      lambda grouped, *fields: jnp.concatenate(fields) if grouped else fields[0],
      per_group,
      *states,
    )
    new_state = new_state._replace(
      count=optax.safe_increment(state.count),
      cosine=pairwise_cosine(gram).astype(state.cosine.dtype),
      weights=weights.astype(state.weights.dtype),
    )
    # Any non-finite gradient leaves the whole state as it was.
    finite = jnp.all(jnp.concatenate(finite))
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return _like_params(jax.tree.unflatten(jax.tree.structure(tree), reduced), params), new_state

  _REGISTERED[update_fn] = Registered(method, num_tasks, granularity)
  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
