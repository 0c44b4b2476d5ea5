"""Per-task losses and gradients, stacked on a leading task axis."""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from optax_gradvac import _checks


def task_value_and_grad(
  loss_fn: Callable[..., Any],
  *,
  has_aux: bool = False,
  batch_axis: str | Sequence[str] | None = None,
) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients from task-separated batches.

  Every batch argument carries a leading task axis (``[T, B, ...]``); the
  parameters are shared. The returned function is
  ``jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, ...))``: the per-task
  weight gradients become batched matmuls over the same data, so the cost is
  close to one backward pass over all ``T * B`` examples, not ``T`` passes.

  With ``batch_axis`` (data parallelism or FSDP: the batch axis ``B`` of every
  batch argument split over mesh axes), each device computes the per-task
  losses and gradients of its own examples, inside :func:`jax.shard_map` over
  the current mesh (``jax.set_mesh``), and the gradients are reduce-scattered
  rather than all-reduced: every device keeps only its share of each stacked
  gradient, which :func:`gradvac` (stacked or low-memory path) reduces in place.
  Each gradient leaf is split along the last parameter axis that the number of
  shards divides, preferring one that the parameter already shards over
  ``batch_axis`` (so FSDP gradients match their parameters), then one that it
  does not shard at all; a leaf with no such axis is all-reduced, and so is,
  under Explicit axes, one whose parameter is sharded over another mesh axis
  (jax 0.10's ``psum_scatter`` rejects it). Under Explicit axes the updates of
  :func:`gradvac` come back in the parameters' sharding.

  The sharded function equals the unsharded one (to float rounding) when the
  loss of a task is a mean over its examples (any per-example loss, averaged),
  as ``jnp.mean`` of squared errors or of cross-entropies is: every shard holds
  ``B / S`` examples (``S`` shards; an indivisible ``B`` is an error), so the
  loss and the gradient of the whole batch are the means of the shards'. A loss
  that sums over examples comes out ``S`` times too small; one that couples
  examples (batch norm, contrastive losses) sees only its shard's. ``loss_fn``
  runs on one device's shard with the parameters whole (FSDP parameters are
  gathered on entry) and must not name ``batch_axis`` in sharding annotations:
  those axes are manual there.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``) for one task's batch.
    has_aux: whether ``loss_fn`` returns auxiliary data.
    batch_axis: ``None`` (no mesh needed), or the name of the mesh axis (or a
      sequence of names) over which axis 1, ``B``, of every batch leaf is
      split. Needs a mesh set with ``jax.set_mesh``, Auto or Explicit axes.

  Returns:
    ``f(params, *task_batches) -> (losses, grads)`` (``((losses, aux), grads)``
    with ``has_aux``): ``losses`` is ``[T]`` and every gradient leaf is
    ``[T, *param.shape]``, ready for :func:`gradvac`. With ``batch_axis``,
    every aux leaf gains an axis of the ``S`` shards' values after the task
    axis, ``[T, S, ...]`` (average it, if it is a mean over examples).

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> def loss(params, x, y):
    ...   return jnp.mean((x @ params["w"] - y) ** 2)
    >>> params = {"w": jnp.ones(3)}
    >>> xs, ys = jnp.ones((4, 8, 3)), jnp.zeros((4, 8))  # 4 tasks of 8 examples
    >>> losses, grads = ogv.task_value_and_grad(loss)(params, xs, ys)
    >>> print(losses.shape, grads["w"].shape)
    (4,) (4, 3)

    Data parallelism: on a mesh whose axis ``"data"`` splits the batches'
    axis 1 (here of one device), the same losses and gradients, each device
    holding a slice of every gradient leaf:

    >>> import jax
    >>> with jax.set_mesh(jax.make_mesh((1,), ("data",))):
    ...   per_task = ogv.task_value_and_grad(loss, batch_axis="data")
    ...   sharded_losses, sharded_grads = jax.jit(per_task)(params, xs, ys)
    >>> print(sharded_losses.shape, sharded_grads["w"].shape)
    (4,) (4, 3)

    Without a mesh it says so:

    >>> ogv.task_value_and_grad(loss, batch_axis="data")(params, xs, ys)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    ValueError: task_value_and_grad: batch_axis=('data',) ... but no mesh is set; ...
  """
  name = "task_value_and_grad"
  _checks.check_flag(name, "has_aux", has_aux)
  axes = _checks.check_batch_axis(name, batch_axis)
  checked_loss = _checks.scalar_loss(name, loss_fn, has_aux)
  value_and_grad = jax.value_and_grad(checked_loss, has_aux=has_aux)

  def per_task(params: Any, *task_batches: Any) -> tuple[Any, Any]:
    _checks.check_arrays(name, "parameter", params)
    _checks.check_task_batches(name, task_batches)
    in_axes = (None, *([0] * len(task_batches)))
    vectorised = jax.vmap(value_and_grad, in_axes=in_axes)
    if axes is None:
      return vectorised(params, *task_batches)
    return _reduce_scattered(vectorised, axes, has_aux)(params, *task_batches)

  return per_task


def _explicit_spec(leaf: Any) -> tuple[Any, ...] | None:
  """The sharding spec of ``leaf`` (one entry per axis) under Explicit axes, else ``None``."""
  if not isinstance(leaf, jax.Array):
    return None
  sharding = jax.typeof(leaf).sharding
  if not sharding.mesh.explicit_axes:
    return None
  return tuple(sharding.spec) + (None,) * (leaf.ndim - len(sharding.spec))


def _names(entry: Any) -> tuple[str, ...]:
  """The mesh axes of one spec entry (``None``, a name, or a tuple of names)."""
  if entry is None:
    return ()
  return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _entry(names: Sequence[str]) -> Any:
  """A spec entry for ``names``: ``None``, one name, or a tuple of names."""
  return None if not names else names[0] if len(names) == 1 else tuple(names)


def _scatter_axis(param: Any, axes: tuple[str, ...], shards: int) -> int | None:
  """The parameter axis along which ``param``'s gradient is split over ``axes``.

  The last axis that ``shards`` divides and that the parameter already splits
  over ``axes`` (FSDP: the gradient lands on its parameter's shards), else the
  last divisible axis that it does not split at all, else ``None``. Under Auto
  axes the parameters' shardings are not visible: the last divisible axis.
  """
  shape = np.shape(param)
  spec = _explicit_spec(param) or (None,) * len(shape)
  if any(set(_names(entry)) - set(axes) for entry in spec):
    # jax 0.10's psum_scatter fails on a leaf with an Explicit sharding over
    # another mesh axis: all-reduce it (it is split over that axis already).
    return None
  divisible = [dim for dim in reversed(range(len(shape))) if shape[dim] % shards == 0]
  for dim in divisible:
    if set(_names(spec[dim])) & set(axes):
      return dim
  return next((dim for dim in divisible if spec[dim] is None), None)


def _local(leaf: Any, axes: tuple[str, ...], batch: bool) -> Any:
  """``leaf`` resharded as ``jax.shard_map`` over Explicit ``axes`` takes it.

  The parameters whole over ``axes`` (FSDP ones gathered), the batches split
  along axis 1; sharding over other mesh axes is kept. A leaf placed outside
  the mesh counts as replicated.
  """
  spec = _explicit_spec(leaf) or (None,) * np.ndim(leaf)
  local = [_entry([name for name in _names(entry) if name not in axes]) for entry in spec]
  if batch:
    local[1] = _entry(axes)
  if tuple(local) == spec:
    return leaf
  return jax.sharding.reshard(leaf, PartitionSpec(*local))


def _varying(tree: Any, axes: tuple[str, ...]) -> Any:
  """``tree`` marked as varying over ``axes`` inside ``shard_map``.

  ``jax.lax.pcast(..., to="varying")`` from jax 0.8; ``jax.lax.pvary`` before.
  """
  if hasattr(jax.lax, "pcast"):
    return jax.lax.pcast(tree, axes, to="varying")
  return jax.lax.pvary(tree, axes)


def _reduce_scattered(
  vectorised: Callable[..., tuple[Any, Any]], axes: tuple[str, ...], has_aux: bool
) -> Callable[..., tuple[Any, Any]]:
  """``vectorised`` on each device's batch shard, gradients reduce-scattered over ``axes``."""
  name = "task_value_and_grad"
  entry = _entry(axes)

  def sharded(params: Any, *task_batches: Any) -> tuple[Any, Any]:
    mesh = jax.sharding.get_abstract_mesh()
    shards = _checks.check_batch_mesh(name, mesh, axes)
    _checks.check_sharded_batches(name, task_batches, axes, shards)
    param_leaves, structure = jax.tree.flatten(params)
    dims = [_scatter_axis(param, axes, shards) for param in param_leaves]
    if set(axes) & set(mesh.explicit_axes):
      # shard_map takes Explicit inputs only in the sharding its in_specs name.
      params = jax.tree.map(lambda leaf: _local(leaf, axes, batch=False), params)
      task_batches = jax.tree.map(lambda leaf: _local(leaf, axes, batch=True), task_batches)

    def reduce(grad: jax.Array, dim: int | None) -> jax.Array:
      # The gradient of a mean over B examples is the mean of the S shards'.
      if dim is None:
        return jax.lax.psum(grad, axes) / shards
      return jax.lax.psum_scatter(grad, axes, scatter_dimension=1 + dim, tiled=True) / shards

    def local(params: Any, *task_batches: Any) -> tuple[Any, Any]:
      # Differentiate with respect to this device's copy of the parameters: the
      # gradient of its own examples, reduced below, not all-reduced by shard_map.
      params = _varying(params, axes)
      value, grads = vectorised(params, *task_batches)
      losses, aux = value if has_aux else (value, None)
      losses = jax.lax.psum(losses, axes) / shards
      grads = [reduce(grad, dim) for grad, dim in zip(jax.tree.leaves(grads), dims, strict=True)]
      grads = jax.tree.unflatten(structure, grads)
      if has_aux:
        aux = jax.tree.map(lambda leaf: jnp.expand_dims(leaf, 1), aux)
        return (losses, aux), grads
      return losses, grads

    grad_specs = jax.tree.unflatten(
      structure,
      [
        PartitionSpec() if dim is None else PartitionSpec(*([None] * (1 + dim)), entry)
        for dim in dims
      ],
    )
    value_specs = (PartitionSpec(), PartitionSpec(None, entry)) if has_aux else PartitionSpec()
    in_specs = (
      jax.tree.map(lambda _: PartitionSpec(), params),
      *(jax.tree.map(lambda _: PartitionSpec(None, entry), batch) for batch in task_batches),
    )
    return jax.shard_map(
      local, in_specs=in_specs, out_specs=(value_specs, grad_specs), axis_names=set(axes)
    )(params, *task_batches)

  return sharded


def segment_value_and_grad(
  loss_fn: Callable[..., Any], num_tasks: int, *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients from a mixed batch with a task id per example.

  The batch holds examples of several tasks (as multilingual batches usually
  do) and ``task_ids[b]`` names the task of example ``b``. The loss of task
  ``t`` is the mean of its examples' losses; a task with no example in the
  batch gets loss 0 and an exactly-zero gradient, which :func:`gradvac` treats
  as absent (it corrects nobody, is corrected by nobody and keeps its targets).
  Examples whose id lies outside ``[0, num_tasks)`` are ignored (e.g. ``-1``
  for padding).

  One forward pass computes all the losses; the gradients are ``num_tasks``
  vector-Jacobian products of it, vectorised with ``jax.vmap``. Each of them
  runs a backward pass over the whole batch, so the backward cost (and the
  memory for cotangents) is about ``num_tasks`` times that of one backward
  pass: when the data can be laid out by task, :func:`task_value_and_grad` is
  cheaper. Compatible with ``jit``; ``num_tasks`` is static.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> losses`` with one loss per example,
      shape ``[B]`` (or ``(losses, aux)`` with ``has_aux``).
    num_tasks: number of tasks ``T`` (a Python int).
    has_aux: whether ``loss_fn`` returns auxiliary data.

  Returns:
    ``f(params, task_ids, *batch) -> (losses, grads)`` (``((losses, aux),
    grads)`` with ``has_aux``), with ``task_ids`` an integer array ``[B]``:
    ``losses`` is ``[T]`` and every gradient leaf is ``[T, *param.shape]``,
    ready for :func:`gradvac`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> def loss(params, x, y):  # one loss per example
    ...   return (x @ params["w"] - y) ** 2
    >>> params = {"w": jnp.ones(2)}
    >>> x, y = jnp.ones((4, 2)), jnp.array([0.0, 1.0, 2.0, 3.0])
    >>> task_ids = jnp.array([0, 0, 2, 2])  # task 1 is absent from the batch
    >>> losses, grads = ogv.segment_value_and_grad(loss, 3)(params, task_ids, x, y)
    >>> print(losses)
    [2.5 0.  0.5]
    >>> print(grads["w"])
    [[ 3.  3.]
     [ 0.  0.]
     [-1. -1.]]
  """
  _checks.check_num_tasks("segment_value_and_grad", num_tasks)
  _checks.check_flag("segment_value_and_grad", "has_aux", has_aux)

  def per_task(params: Any, task_ids: jax.Array, *batch: Any) -> tuple[Any, Any]:
    _checks.check_arrays("segment_value_and_grad", "parameter", params)
    _checks.check_task_ids("segment_value_and_grad", task_ids)

    def task_losses(params: Any) -> tuple[jax.Array, Any]:
      output = loss_fn(params, *batch)
      _checks.check_loss_output("segment_value_and_grad", output, has_aux)
      example_losses, aux = output if has_aux else (output, None)
      _checks.check_example_losses("segment_value_and_grad", example_losses, task_ids)
      totals = jax.ops.segment_sum(example_losses, task_ids, num_segments=num_tasks)
      counts = jax.ops.segment_sum(jnp.ones_like(example_losses), task_ids, num_segments=num_tasks)
      # An absent task divides 0 by 1: its loss is 0 and its cotangent reaches
      # no example, so its gradient is exactly zero.
      return totals / jnp.maximum(counts, 1), aux

    losses, vjp_fn, aux = jax.vjp(task_losses, params, has_aux=True)
    (grads,) = jax.vmap(vjp_fn)(jnp.eye(num_tasks, dtype=losses.dtype))
    return ((losses, aux), grads) if has_aux else (losses, grads)

  return per_task
