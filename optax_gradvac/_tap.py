"""The surgery inside the backward pass: taps on the parameters, scanned stacks included.

A tap broadcasts some parameters to one copy per task for a task-vmapped
forward pass (``tapped_vmap`` runs a layer over the tasks on one copy and makes
the per-task gradients in its own backward rule). The backward rule receives
their ``[T, ...]`` per-task gradients, reduces them to the groups' Gram
matrices, weights and weighted sums at once, and returns the update as the
parameters' gradient: the per-task gradients of a tapped layer exist only
while its own backward step runs. Each group's new state leaves as the
gradient of a *carrier*, a state input that travels with the parameters
(through a scan too), one per parameter leaf.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pipeline, _pytree
from optax_gradvac._gram import pairwise_cosine

# The per-group flag that a tap's backward rule sets: whether the group's
# gradients were finite. Carried like the state's per-group fields.
_FINITE = "finite"


@dataclasses.dataclass(eq=False)
class _Spec:
  """The static side of one traced step: the method, the model's groups, the taps seen.

  Compared by identity, as pytree metadata: every carrier of a step shares it.
  """

  method: _pipeline.Method
  num_tasks: int
  total: int  # the model's number of groups
  fields: tuple[str, ...]  # the state's per-group fields, then _FINITE
  dtype: jnp.dtype  # of the carried rows and of the similarity math
  seen: set[str] = dataclasses.field(default_factory=set)  # groups whose tap ran backwards


@jax.tree_util.register_pytree_node_class
class Carrier:
  """The state of one parameter leaf's group, carried through the forward pass.

  Made by :func:`tapped_value_and_grad` and given to ``loss_fn``; pass it to
  :func:`tap` with its parameter. The leaves of a scanned stack have carriers
  with the same leading layer axis, so a scan carries them along.
  """

  # `spec` is a private _Spec, typed Any here so that the public API names no private type.
  def __init__(self, index: Any, rows: Any, others: Any, spec: Any, group: str, size: int):
    self.index = index  # the group's index among the model's groups
    self.rows = rows  # the group's rows of the per-group state fields, and _FINITE
    self.others = others  # the state's fields without a groups axis (a key)
    self.spec = spec
    self.group = group  # the group's name (of its first layer, in a stack)
    self.size = size  # how many leaves the group has (in each layer)

  def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, str, int]]:
    return (self.index, self.rows, self.others), (self.spec, self.group, self.size)

  @classmethod
  def tree_unflatten(cls, aux: tuple[Any, str, int], children: tuple[Any, ...]) -> "Carrier":
    return cls(*children, *aux)

  def __repr__(self) -> str:
    return f"Carrier(group={self.group!r}, index={self.index!r})"


def _carriers_of(params: Any, carriers: Any) -> tuple[list[jax.Array], Any, list[Carrier]]:
  """The leaves of ``params``, their treedef, and the carrier of each (checked)."""
  leaves, treedef = jax.tree.flatten(params)
  try:
    matched = treedef.flatten_up_to(carriers)
  except (ValueError, TypeError) as error:
    raise ValueError(
      "tap: the carriers must have the structure of the parameters, one Carrier per "
      f"parameter leaf (pass the carriers' subtree that matches params): {error}"
    ) from None
  for (path, _), carrier in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], matched, strict=True
  ):
    if not isinstance(carrier, Carrier):
      raise TypeError(
        f"tap: the carrier of parameter leaf {_pytree.path_name(path)!r} is "
        f"{'an array' if hasattr(carrier, 'shape') else type(carrier).__name__}, not a "
        "Carrier: pass the carriers that "
        "tapped_value_and_grad gives loss_fn, sliced like the parameters."
      )
    if jnp.ndim(carrier.index) != 0:
      raise ValueError(
        f"tap: parameter leaf {_pytree.path_name(path)!r} is tapped with the carrier of "
        f"{jnp.shape(carrier.index)[0]} stacked layers: tap one layer at a time, inside "
        "the scan over the stack, scanning the carriers alongside the parameters."
      )
  specs = {id(carrier.spec) for carrier in matched}
  if len(specs) > 1:
    raise ValueError("tap: the carriers come from different tapped_value_and_grad steps.")
  return leaves, treedef, matched


def tap(params: Any, carriers: Any) -> Any:
  r"""The parameters, one copy per task; their gradient is the method's update.

  Call it on a layer's parameters where the forward pass uses them, and run
  the layer on the result with ``jax.vmap`` over the task axis: the forward
  pass is that of the per-task losses. In the backward pass, the tap receives
  this layer's per-task gradients ``[T, ...]``, computes its groups' Gram
  matrices, task weights and new state at once, and passes on :math:`\sum_t
  w_t g_t` as the gradient of ``params``: so each layer's per-task gradients
  are reduced as soon as the backward pass has made them, inside a scan too.
  The result is that of the method on the stacked per-task gradients, for the
  same groups (``StackedLayers`` for a scanned stack).

  Every group must be tapped whole, in one call (a layer's kernel with its
  bias); every parameter must be tapped, once.

  Args:
    params: a subtree of the parameters (in a scan body, one layer's slice).
    carriers: the matching subtree of the carriers that
      :func:`tapped_value_and_grad` passes to the loss (sliced alike).

  Returns:
    ``params`` with a leading task axis on every leaf, ``[T, *param.shape]``.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> params = {"dense": {"w": jnp.ones((2, 2))}}
    >>> tx = ogv.mgda(3, granularity="layer")
    >>> def losses(params, carriers, x):  # x: [3, 2], one input per task
    ...   w = ogv.tap(params["dense"], carriers["dense"])["w"]  # [3, 2, 2]
    ...   return jnp.sum(jax.vmap(jnp.dot)(x, w) ** 2, axis=1)
    >>> step = ogv.tapped_value_and_grad(losses, tx)
    >>> _, updates, state = step(params, tx.init(params), jnp.eye(3, 2))
    >>> print(updates["dense"]["w"].shape, state.weights.shape)
    (2, 2) (1, 3)
  """
  leaves, treedef, matched = _carriers_of(params, carriers)
  if not leaves:
    return params
  spec = matched[0].spec
  names = list(dict.fromkeys(carrier.group for carrier in matched))
  local = [names.index(carrier.group) for carrier in matched]
  for position, name in enumerate(names):
    count = local.count(position)
    size = next(carrier.size for carrier in matched if carrier.group == name)
    if count != size:
      raise ValueError(
        f"tap: group {name!r} has {size} parameter leaves but this tap is given "
        f"{count} of them: tap each group whole, in one call (e.g. a layer's kernel "
        "with its bias)."
      )
  first = [local.index(position) for position in range(len(names))]
  for leaf, carrier in zip(leaves, matched, strict=True):
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise TypeError(
        f"tap: group {carrier.group!r} has a parameter of dtype {jnp.result_type(leaf)}; "
        "tapped parameters must be floating point."
      )
  index = jnp.stack([matched[position].index for position in first])
  rows = [matched[position].rows for position in first]
  others = matched[0].others
  broadcast = _broadcast(spec, tuple(names), tuple(local))
  return jax.tree.unflatten(treedef, broadcast(list(leaves), (index, others), rows))


def tapped_vmap(fn: Callable[..., Any]) -> Callable[..., Any]:
  r"""``fn`` over the task axis on one copy of its parameters, with a tap's backward pass.

  ``tapped_vmap(fn)(params, carriers, *args)`` equals
  ``jax.vmap(fn)(tap(params, carriers), *args)`` (every leaf of ``args`` has
  the leading task axis; ``fn`` is one task's computation), values and
  gradients, but its forward pass runs on ``params`` itself and saves only its
  inputs: no ``[T, ...]`` copy of the parameters is made, so none is kept for
  the backward pass, with or without ``jax.checkpoint``. The backward pass runs
  ``fn`` again (vectorised over the tasks) for its per-task gradients, reduces
  those of ``params`` as :func:`tap` does, and passes on those of ``args``;
  arrays ``fn`` closes over get their gradient summed over the tasks. The
  price is ``fn``'s forward pass once more, as under ``jax.checkpoint``.

  Use it for a layer (or a block) whose parameters are all tapped here: in a
  scan over a stack it needs no ``jax.checkpoint`` to hold one layer's per-task
  gradients at a time. The gradients of ``args`` are computed from the update,
  so the layers that made ``args`` start their backward pass only once this
  layer's per-task gradients are reduced: a Python loop over layers holds one
  layer's at a time too (see the scaling guide).

  Args:
    fn: ``fn(params, *args)`` for one task: ``params`` as given (one layer's),
      ``args`` without their task axis.

  Returns:
    ``f(params, carriers, *args)``: ``fn`` of every task, stacked on a leading
    task axis. ``carriers`` as for :func:`tap`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> params = {"blocks": {"w": jnp.ones((3, 2, 2)) / 2}}  # 3 layers, scanned
    >>> tx = ogv.pcgrad(2, granularity=ogv.StackedLayers("blocks"))
    >>> dense = ogv.tapped_vmap(lambda p, h: h @ p["w"])
    >>> def losses(params, carriers, x):  # x: [T, B, 2]
    ...   layer = lambda h, slices: (dense(*slices, h), None)
    ...   h, _ = jax.lax.scan(layer, x, (params["blocks"], carriers["blocks"]))
    ...   return jnp.sum(h**2, axis=(1, 2))
    >>> x = jnp.array([[[1.0, 0.0]], [[-1.0, 1.0]]])
    >>> step = jax.jit(ogv.tapped_value_and_grad(losses, tx))
    >>> task_losses, updates, state = step(params, tx.init(params), x)
    >>> print(task_losses.shape, updates["blocks"]["w"].shape)
    (2,) (3, 2, 2)
  """

  def call(params: Any, carriers: Any, *args: Any) -> Any:
    _, _, matched = _carriers_of(params, carriers)
    if not matched:
      return jax.vmap(fn, in_axes=(None, *[0] * len(args)))(params, *args)
    _check_task_axis(args, matched[0].spec.num_tasks)
    # Closed-over arrays become inputs, with cotangents of their own.
    one_task = jax.tree.map(lambda arg: arg[0], args)
    converted, consts = jax.closure_convert(fn, params, *one_task)
    count = len(args)

    def forward_all(params: Any, consts: list[Any], args: tuple[Any, ...]) -> Any:
      axes = (None, *[0] * count, *[None] * len(consts))
      return jax.vmap(converted, in_axes=axes)(params, *args, *consts)

    @jax.custom_vjp
    def apply(params: Any, consts: list[Any], carriers: Any, args: tuple[Any, ...]) -> Any:
      del carriers
      return forward_all(params, consts, args)

    def forward(params: Any, consts: list[Any], carriers: Any, args: tuple[Any, ...]) -> Any:
      return forward_all(params, consts, args), (params, consts, carriers, args)

    def backward(saved: Any, cotangent: Any) -> tuple[Any, Any, Any, Any]:
      params, consts, carriers, args = saved

      def one(task_args: tuple[Any, ...], task_cotangent: Any) -> tuple[Any, ...]:
        _, pullback = jax.vjp(converted, params, *task_args, *consts)
        return pullback(task_cotangent)

      grads = jax.vmap(one)(args, cotangent)
      task_grads, arg_grads, const_grads = grads[0], grads[1 : 1 + count], grads[1 + count :]
      _, surgery = jax.vjp(tap, params, carriers)
      update, carried = surgery(task_grads)
      summed = [jax.tree.map(lambda grad: jnp.sum(grad, axis=0), grad) for grad in const_grads]
      # The inputs' gradients wait for the update, so the layers before this one make
      # their per-task gradients only once this layer's are reduced (XLA:CPU would
      # otherwise run several layers' backward steps ahead, each holding T x M).
      arg_grads = _pipeline.after(tuple(arg_grads), update)
      return update, summed, carried, arg_grads

    apply.defvjp(forward, backward)
    return apply(params, consts, carriers, args)

  return call


def _check_task_axis(args: tuple[Any, ...], num_tasks: int) -> None:
  """Every array in ``args`` has the leading task axis."""
  leaves = jax.tree_util.tree_flatten_with_path(args)[0]
  if not leaves:
    raise ValueError("tapped_vmap: give fn at least one per-task argument (e.g. the inputs).")
  for path, leaf in leaves:
    if jnp.shape(leaf)[:1] != (num_tasks,):
      raise ValueError(
        f"tapped_vmap: args{jax.tree_util.keystr(path)} has shape {jnp.shape(leaf)}: "
        f"every argument after the carriers needs the leading task axis ({num_tasks})."
      )


def _broadcast(spec: _Spec, names: tuple[str, ...], local: tuple[int, ...]) -> Callable[..., Any]:
  """The tap's custom-gradient broadcast, for a call with these groups."""
  num_tasks, num_groups = spec.num_tasks, len(names)

  @jax.custom_vjp
  def broadcast(leaves: list[jax.Array], given: Any, rows: list[Any]) -> list[jax.Array]:
    del given, rows
    return [jnp.broadcast_to(leaf, (num_tasks, *jnp.shape(leaf))) for leaf in leaves]

  def forward(leaves: list[jax.Array], given: Any, rows: list[Any]) -> tuple[Any, Any]:
    return broadcast(leaves, given, rows), (given, rows)

  def backward(saved: Any, task_grads: list[jax.Array]) -> tuple[Any, None, list[Any]]:
    (index, others), rows = saved
    spec.seen.update(names)
    gram, scale, finite = _pytree.scaled_gram_matrices(
      lambda dependency: task_grads, list(local), num_groups, spec.dtype
    )
    per_group = spec.fields[:-1]
    state = spec.method.init(num_groups, num_tasks, spec.dtype)
    fields = {
      field: jnp.stack([row[position] for row in rows]) for position, field in enumerate(per_group)
    }
    fields = {field: value.astype(getattr(state, field).dtype) for field, value in fields.items()}
    state = state._replace(**fields, **others)
    groups = _pipeline.Groups(index, spec.total)
    weights, new_state = _pipeline.weigh_groups(spec.method, gram, scale, finite, state, groups, {})
    new_state = new_state._replace(
      cosine=pairwise_cosine(gram).astype(state.cosine.dtype),
      weights=weights.astype(state.weights.dtype),
    )
    new_rows = [
      [
        getattr(new_state, field)[position].astype(row[index_].dtype)
        for index_, field in enumerate(per_group)
      ]
      + [finite[position].astype(row[-1].dtype)]
      for position, row in enumerate(rows)
    ]
    updates = [
      _pytree.weighted_sum(grad, weights, group)
      for grad, group in zip(task_grads, local, strict=True)
    ]
    return updates, None, [tuple(row) for row in new_rows]

  broadcast.defvjp(forward, backward)
  return broadcast


def _carriers(
  spec: _Spec, params: Any, state: Any, granularity: _pytree.Granularity, per_group: Any
) -> Any:
  """One carrier per parameter leaf, holding its group's rows of ``state``."""
  names, groups = _pytree.leaf_groups(params, granularity)
  per_group_fields = [field for field in state._fields if getattr(per_group, field)]
  other_fields = {
    field: getattr(state, field) for field in state._fields if not getattr(per_group, field)
  }
  del other_fields["count"]
  sizes: dict[Any, int] = {}
  for group in groups:
    sizes[group] = sizes.get(group, 0) + 1

  def carrier(group: _pytree.Group) -> Carrier:
    index = jnp.asarray(group, jnp.int32)
    # Bool fields travel as 0 or 1: a carrier's gradient is floating point.
    rows = tuple(getattr(state, field)[index].astype(spec.dtype) for field in per_group_fields)
    rows += (jnp.zeros(index.shape, spec.dtype),)
    others = {
      field: jnp.broadcast_to(value, (*index.shape, *jnp.shape(value))) if index.shape else value
      for field, value in other_fields.items()
    }
    name = names[group[0] if isinstance(group, tuple) else group]
    return Carrier(index, rows, others, spec, name, sizes[group])

  return jax.tree.unflatten(jax.tree.structure(params), [carrier(group) for group in groups])


def tapped_value_and_grad(
  loss_fn: Callable[..., Any],
  tx: optax.GradientTransformation,
  *,
  has_aux: bool = False,
  summed_argnums: int | Sequence[int] = (),
) -> Callable[..., tuple[Any, Any, Any]]:
  """The per-task losses, the method's update and its new state, in one backward pass.

  ``loss_fn(params, carriers, *args)`` returns the ``[T]`` per-task losses
  of a forward pass that runs every layer over the task axis, through
  :func:`tapped_vmap` or on parameters given by :func:`tap` (``jax.vmap`` over
  the tasks' batches): ``carriers`` has the structure of ``params``, and each
  layer's parameters are tapped with their own carriers (in a scan body, one
  layer's slice of both). The gradient of the summed losses is then ``tx``'s
  update, computed layer by layer inside the backward pass: equal to
  ``tx.update`` of the stacked per-task gradients (to float rounding). The step then holds about one
  layer's per-task gradients at a time, not the whole stack's: with the
  layers run by :func:`tapped_vmap`, in a scan or a Python loop; with
  :func:`tap`, in a scan whose body is under ``jax.checkpoint`` (in a Python
  loop XLA keeps every layer's ``[T, ...]`` copies; see the scaling guide).

  Args:
    loss_fn: ``loss_fn(params, carriers, *args) -> losses`` (``[T]``), or
      ``(losses, aux)`` with ``has_aux``.
    tx: a Gram-based transformation of this library (e.g. :func:`gradvac`,
      :func:`mgda`), not wrapped; its granularity sets the groups
      (:class:`StackedLayers` for a scanned stack). Not :func:`gradnorm`, whose
      weights need the losses within the backward pass.
    has_aux: whether ``loss_fn`` returns auxiliary data.
    summed_argnums: positions in ``args`` of arguments whose plain gradient of
      the summed losses is returned too (no surgery, no per-task gradients):
      for parameters kept out of the surgery, such as a huge embedding used
      untapped (the scaling guide's "Huge embedding and output layers").

  Returns:
    ``f(params, state, *args) -> (losses, updates, state)`` (``((losses, aux),
    updates, state)`` with ``has_aux``), with ``state`` from ``tx.init(params)``:
    ``updates`` is shaped like ``params``, to pass on to an optimizer (``tx``
    itself is not applied again). A group with a NaN or inf gradient passes its
    plain sum and the whole state is kept, as with ``tx.update``. With
    ``summed_argnums``, ``updates`` is the tuple ``(updates, *grads)`` of the
    update and the gradients of those arguments.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> params = {"blocks": {"w": jnp.ones((3, 2, 2)) / 2}}  # 3 layers, scanned
    >>> tx = ogv.gradvac(2, granularity=ogv.StackedLayers("blocks"))
    >>> def losses(params, carriers, x):  # x: [T, B, 2]
    ...   def layer(h, slices):
    ...     w = ogv.tap(*slices)  # [T, 2, 2]: one copy per task
    ...     return jax.vmap(jnp.dot)(h, w["w"]), None
    ...   h, _ = jax.lax.scan(layer, x, (params["blocks"], carriers["blocks"]))
    ...   return jnp.sum(h**2, axis=(1, 2))
    >>> x = jnp.array([[[1.0, 0.0]], [[-1.0, 1.0]]])
    >>> step = jax.jit(ogv.tapped_value_and_grad(losses, tx))
    >>> task_losses, updates, state = step(params, tx.init(params), x)
    >>> print(updates["blocks"]["w"].shape, state.targets.shape)
    (3, 2, 2) (3, 2, 2)
  """
  found = _pipeline.registered(tx)
  if found is None:
    raise TypeError(
      "tapped_value_and_grad: tx must be a Gram-based transformation of optax_gradvac "
      "(gradvac, pcgrad, mgda, ...) as its factory returned it, not wrapped in a chain "
      f"or inject_hyperparams; got {tx!r:.80}."
    )
  method, num_tasks, granularity = found
  if "losses" in method.inputs:
    raise ValueError(
      f"tapped_value_and_grad: {method.name} needs the losses within the backward pass; "
      "use it on stacked per-task gradients (task_value_and_grad)."
    )
  per_group = _pipeline.per_group_fields(method, num_tasks)
  summed = (summed_argnums,) if isinstance(summed_argnums, int) else tuple(summed_argnums)

  def value_and_update(params: Any, state: Any, *args: Any) -> tuple[Any, Any, Any]:
    _checks.check_arrays(method.name, "parameter", params)
    expected = jax.eval_shape(lambda: method.init(1, num_tasks, jnp.dtype(jnp.float32)))
    _checks.check_state(method.name, state, expected)
    names, groups = _pytree.leaf_groups(params, granularity)
    if len(names) != state.cosine.shape[0]:
      raise ValueError(
        f"{method.name}: the parameters form {len(names)} groups under granularity "
        f"{granularity!r} but the state was initialised with {state.cosine.shape[0]}."
      )
    fields = tuple(field for field in state._fields if getattr(per_group, field))
    dtype = _pytree.compute_dtype([*jax.tree.leaves(params), state.cosine])
    spec = _Spec(method, num_tasks, len(names), (*fields, _FINITE), dtype)
    carriers = _carriers(spec, params, state, granularity, per_group)

    for position in summed:
      if not 0 <= position < len(args):
        raise ValueError(
          f"tapped_value_and_grad: summed_argnums has {position}, but the step was given "
          f"{len(args)} argument(s) after params and state."
        )

    def total(params: Any, carriers: Any, *args: Any) -> tuple[jax.Array, Any]:
      out = loss_fn(params, carriers, *args)
      losses, aux = out if has_aux else (out, None)
      if jnp.shape(losses) != (num_tasks,):
        raise ValueError(
          f"tapped_value_and_grad: loss_fn must return the [{num_tasks}] per-task losses, "
          f"got shape {jnp.shape(losses)}."
        )
      return jnp.sum(losses), (losses, aux)

    argnums = (0, 1, *(2 + position for position in summed))
    (_, (losses, aux)), (updates, carried, *grads) = jax.value_and_grad(
      total, argnums=argnums, has_aux=True, allow_int=True
    )(params, carriers, *args)
    missing = [
      name
      for name in dict.fromkeys(
        c.group for c in jax.tree.leaves(carriers, is_leaf=lambda node: isinstance(node, Carrier))
      )
      if name not in spec.seen
    ]
    if missing:
      raise ValueError(
        f"tapped_value_and_grad: the parameters of group(s) {missing} were not tapped (or "
        "their tapped copies not used): pass every parameter through ogv.tap with its "
        "carriers, and run the layers on its output."
      )
    new_state = _new_state(spec, method, state, groups, carried, per_group)
    value = (losses, aux) if has_aux else losses
    return value, ((updates, *grads) if summed else updates), new_state

  return value_and_update


def _new_state(
  spec: _Spec,
  method: _pipeline.Method,
  state: Any,
  groups: Sequence[_pytree.Group],
  carried: Any,
  per_group: Any,
) -> Any:
  """The state from the carriers' gradients: each group's rows, summed over its leaves."""
  leaves = jax.tree.leaves(carried, is_leaf=lambda node: isinstance(node, Carrier))
  rows = [[] for _ in range(spec.total)]
  for group, carrier in zip(groups, leaves, strict=True):
    if isinstance(group, tuple):
      for layer, member in enumerate(group):
        rows[member].append([row[layer] for row in carrier.rows])
    else:
      rows[group].append(list(carrier.rows))
  summed = [[sum(values) for values in zip(*group_rows, strict=True)] for group_rows in rows]
  columns = [jnp.stack(column) for column in zip(*summed, strict=True)]
  finite = columns[-1] > 0.5
  fields = {
    field: _from_row(column, getattr(state, field).dtype)
    for field, column in zip(spec.fields[:-1], columns[:-1], strict=True)
  }
  # The fields without a groups axis (a key), as every call of weigh gives them.
  empty = jax.tree.map(lambda field, grouped: field[:0] if grouped else field, state, per_group)
  _, others = _pipeline.weigh_groups(
    method,
    jnp.zeros((0, spec.num_tasks, spec.num_tasks), spec.dtype),
    jnp.ones((0,), spec.dtype),
    jnp.ones((0,), bool),
    empty,
    _pipeline.Groups(jnp.zeros((0,), jnp.int32), spec.total),
    {},
  )
  others = {
    field: getattr(others, field)
    for field in state._fields
    if not getattr(per_group, field) and field != "count"
  }
  new_state = state._replace(**others, **fields, count=optax.safe_increment(state.count))
  ok = jnp.all(finite)
  return jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)


def _from_row(column: jax.Array, dtype: jnp.dtype) -> jax.Array:
  """Carried rows back in the state field's ``dtype`` (a bool from 0 or 1)."""
  if dtype == jnp.bool_:
    return column > 0.5
  return column.astype(dtype)
