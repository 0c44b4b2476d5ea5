"""Gradient accumulation over micro-batches for transforms of stacked per-task gradients."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pipeline, _pytree


def multi_steps(
  tx: optax.GradientTransformation,
  every_k_schedule: int | Callable[[jax.Array], jax.Array],
  *,
  num_tasks: int,
  use_grad_mean: bool = True,
  should_skip_update_fn: optax.ShouldSkipUpdateFunction | None = None,
  accumulator_dtype: jax.typing.DTypeLike = jnp.float32,
) -> optax.GradientTransformationExtraArgs:
  """Accumulates per-task gradients over micro-batches, then takes one step of ``tx``.

  :class:`optax.MultiSteps` with an accumulator shaped like the per-task
  gradients (``[num_tasks, *param.shape]``) rather than like the parameters:
  the stacked gradients of ``k`` micro-batches are averaged (or summed), and
  every ``k``-th call hands the average to ``tx`` (e.g.
  ``optax.chain(gradvac(...), optax.adam(...))``), whose state changes only
  then. The result is exactly one step of ``tx`` on the averaged per-task
  gradients, so GradVac measures its cosines and updates its targets once per
  full batch. The other calls return zero updates.

  ``optax.MultiSteps(chain(gradvac(...), adam))`` fails (its accumulator is
  shaped like the parameters). ``chain(gradvac(...), optax.MultiSteps(adam))``
  runs but means something else: surgery on every micro-batch (the targets'
  EMA advances once per micro-batch, on noisier gradients), then Adam on the
  average of the corrected updates.

  Args:
    tx: a transformation taking stacked per-task gradients, e.g. a chain that
      starts with :func:`gradvac`.
    every_k_schedule: number of micro-batches per step, an int or a function
      of the step count (as in :class:`optax.MultiSteps`).
    num_tasks: number of tasks ``T``, the size of the accumulator's leading axis.
    use_grad_mean: average the micro-batch gradients (default) or sum them.
    should_skip_update_fn: optional function deciding to drop a micro-batch, e.g.
      :func:`optax.skip_not_finite`; see :class:`optax.MultiSteps`.
    accumulator_dtype: dtype of the accumulator.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is an
    :class:`optax.MultiStepsState`.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradvac as ogv
    >>> tx = ogv.multi_steps(ogv.sum_tasks(), 2, num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> state = tx.init(params)
    >>> print(state.acc_grads["w"].shape)  # [num_tasks, *param.shape]
    (2, 2)
    >>> _, state = tx.update({"w": jnp.array([[1.0, 0.0], [0.0, 1.0]])}, state, params)
    >>> updates, state = tx.update({"w": jnp.array([[3.0, 0.0], [0.0, 3.0]])}, state, params)
    >>> print(updates["w"])  # the sum over tasks of the averaged gradients
    [2. 2.]
  """
  _checks.check_transformation("multi_steps", tx)
  _checks.check_every_k("multi_steps", every_k_schedule)
  _checks.check_num_tasks("multi_steps", num_tasks)
  _checks.check_flag("multi_steps", "use_grad_mean", use_grad_mean)
  _checks.check_float_dtype("multi_steps", "accumulator_dtype", accumulator_dtype)
  accumulator = optax.MultiSteps(
    tx,
    every_k_schedule,
    use_grad_mean=use_grad_mean,
    should_skip_update_fn=should_skip_update_fn,
    accumulator_dtype=accumulator_dtype,
  )

  def init_fn(params: optax.Params) -> optax.MultiStepsState:
    # MultiSteps' update works unchanged on a stacked accumulator; only its
    # init assumes gradients shaped like the parameters.
    acc_grads = jax.tree.map(
      lambda param: jnp.zeros((num_tasks, *jnp.shape(param)), accumulator_dtype), params
    )
    return accumulator.init(params)._replace(acc_grads=acc_grads)

  def update_fn(
    updates: optax.Updates,
    state: optax.MultiStepsState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, optax.MultiStepsState]:
    if extra_args.get(_pipeline.TASK_GRADS_FN) is not None:
      raise ValueError(
        "multi_steps: task_grads_fn (the low-memory path) does not apply: the accumulator "
        "holds the stacked per-task gradients (T x P numbers) anyway. Pass each "
        "micro-batch's stacked gradients to update."
      )
    # optax.MultiSteps would broadcast gradients without their task axis, or
    # with a task axis of 1, against the accumulator without a word.
    _pytree.check_task_axis("multi_steps", updates, params, num_tasks)
    _checks.check_accumulator("multi_steps", state, updates)
    return accumulator.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
