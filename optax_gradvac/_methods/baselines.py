"""The plain baselines: the sum and the mean of the per-task gradients."""

from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pipeline, _pytree


def _reduce_tasks(
  num_tasks: int | None, reduction: str, name: str
) -> optax.GradientTransformationExtraArgs:
  """The plain baselines: sum or mean over the task axis, with the shape checks."""
  if num_tasks is not None:
    _checks.check_num_tasks(name, num_tasks)

  def init_fn(params: optax.Params) -> optax.EmptyState:
    del params
    return optax.EmptyState()

  def update_fn(
    updates: optax.Updates,
    state: optax.EmptyState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.EmptyState]:
    task_grads_fn = extra_args.get(_pipeline.TASK_GRADS_FN)
    if task_grads_fn is not None:
      # One pass: each leaf's per-task gradients are summed as soon as they exist.
      _checks.check_task_grads_call(name, updates, params, task_grads_fn)
      updates = _checks.check_task_grads_output(name, task_grads_fn(params))
    leaves, tasks = _pytree.check_task_axis(name, updates, params, num_tasks)
    if not leaves:
      return updates, state
    weight = 1.0 if reduction == "sum" else 1.0 / tasks
    weights = jnp.full((1, tasks), weight, _pytree.compute_dtype(leaves))
    reduced = [_pytree.weighted_sum(leaf, weights, 0) for leaf in leaves]
    return jax.tree.unflatten(jax.tree.structure(updates), reduced), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sum_tasks(num_tasks: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Sums per-task gradients over their leading task axis: the plain baseline.

  Same input contract and shape checks as :func:`gradvac`, so an experiment
  swaps methods by changing one line.

  Args:
    num_tasks: number of tasks ``T``; ``None`` takes it from the first leaf
      (the other leaves must agree).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.sum_tasks()
    >>> grads = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # 2 tasks
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> print(updates["w"])
    [4. 6.]
  """
  return _reduce_tasks(num_tasks, "sum", "sum_tasks")


def mean_tasks(num_tasks: int | None = None) -> optax.GradientTransformationExtraArgs:
  """Averages per-task gradients over their leading task axis.

  Args:
    num_tasks: number of tasks ``T``; ``None`` takes it from the first leaf.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.mean_tasks()
    >>> grads = {"w": jnp.array([[1.0, 2.0], [3.0, 4.0]])}  # 2 tasks
    >>> updates, _ = tx.update(grads, tx.init({"w": jnp.zeros(2)}))
    >>> print(updates["w"])
    [2. 3.]
  """
  return _reduce_tasks(num_tasks, "mean", "mean_tasks")
