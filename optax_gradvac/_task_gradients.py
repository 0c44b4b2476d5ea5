"""Per-task losses and gradients, stacked on a leading task axis."""

from collections.abc import Callable
from typing import Any

import jax


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
  value_and_grad = jax.value_and_grad(loss_fn, has_aux=has_aux)

  def per_task(params: Any, *task_batches: Any) -> tuple[Any, Any]:
    in_axes = (None, *([0] * len(task_batches)))
    return jax.vmap(value_and_grad, in_axes=in_axes)(params, *task_batches)

  return per_task
