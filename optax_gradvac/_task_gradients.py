"""Per-task losses and gradients, stacked on a leading task axis."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from optax_gradvac import _checks


def task_value_and_grad(
  loss_fn: Callable[..., Any], *, has_aux: bool = False
) -> Callable[..., tuple[Any, Any]]:
  """Per-task losses and gradients from task-separated batches.

  Every batch argument carries a leading task axis (``[T, B, ...]``); the
  parameters are shared. The returned function is
  ``jax.vmap(jax.value_and_grad(loss_fn), in_axes=(None, 0, ...))``: the per-task
  weight gradients become batched matmuls over the same data, so the cost is
  close to one backward pass over all ``T * B`` examples, not ``T`` passes.

  Args:
    loss_fn: ``loss_fn(params, *batch) -> loss`` (or ``(loss, aux)`` with
      ``has_aux``) for one task's batch.
    has_aux: whether ``loss_fn`` returns auxiliary data.

  Returns:
    ``f(params, *task_batches) -> (losses, grads)`` (``((losses, aux), grads)``
    with ``has_aux``): ``losses`` is ``[T]`` and every gradient leaf is
    ``[T, *param.shape]``, ready for :func:`gradvac`.

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
  """
  _checks.check_flag("task_value_and_grad", "has_aux", has_aux)
  checked_loss = _checks.scalar_loss("task_value_and_grad", loss_fn, has_aux)
  value_and_grad = jax.value_and_grad(checked_loss, has_aux=has_aux)

  def per_task(params: Any, *task_batches: Any) -> tuple[Any, Any]:
    _checks.check_task_batches("task_value_and_grad", task_batches)
    in_axes = (None, *([0] * len(task_batches)))
    return jax.vmap(value_and_grad, in_axes=in_axes)(params, *task_batches)

  return per_task


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
