"""What to log from a Gram-based method's state: similarities, weights and corrections."""

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_gradvac import _checks, _pipeline, _pytree


def _find_state(opt_state: Any) -> Any:
  for node in jax.tree.leaves(opt_state, is_leaf=_pipeline.is_gram_state):
    if _pipeline.is_gram_state(node):
      return node
  raise ValueError(
    "similarity_summary: no GradVacState (nor any other Gram-based method's state) in "
    "the optimizer state; it needs the state of a transformation such as gradvac or pcgrad."
  )


def _array(field: Any) -> jax.Array:
  # nnx.Optimizer wraps every state array in a Variable, a pytree node whose
  # only leaf is the array; a plain array is its own only leaf.
  (array,) = jax.tree.leaves(field)
  return jnp.asarray(array)


def _mean(values: jax.Array, mask: jax.Array, axis: Any = None) -> jax.Array:
  total = jnp.sum(jnp.where(mask, values, 0), axis=axis)
  return total / jnp.maximum(jnp.sum(mask, axis=axis), 1)


def similarity_summary(
  opt_state: Any,
  params: Any,
  granularity: _pytree.Granularity = "layer",
  *,
  task_names: Sequence[str] | None = None,
) -> dict[str, Any]:
  """Gradient cosines, task weights, similarity targets and corrections, ready to log.

  Finds the first state of a Gram-based method (:class:`GradVacState`,
  :class:`GramState`, ...) anywhere in ``opt_state`` (inside
  ``optax.chain``, ``optax.named_chain``, ``optax.partition``,
  ``optax.inject_hyperparams``, :func:`multi_steps` or ``nnx.Optimizer``) and
  names its groups with :func:`group_names`. Pure array code with a static
  structure: call it inside or outside ``jit``.

  Scalars average over groups and over the off-diagonal pairs ``(i, j)``;
  ``mean_cosine``, ``corrected_fraction`` and ``task_cosine`` use only the
  pairs of tasks that were present (had a non-zero gradient) in the group at
  the last step.

  Args:
    opt_state: an optimizer state containing the state of a Gram-based method.
    params: the parameters, or any tree with the paths the transformation saw
      (under ``optax.partition``, only the partition that holds ``gradvac``,
      e.g. ``{"trunk": params["trunk"]}``).
    granularity: the transformation's granularity (``gradvac``'s default is
      ``"layer"``, every other method's ``"model"``).
    task_names: a name per task for ``task_cosine``; ``task_0``, ``task_1``,
      ... by default.

  Returns:
    A dict with

    * ``"cosine"``: ``{group name: [T, T] cosines}`` of the original gradients
      at the last step,
    * ``"weights"``: ``{group name: [T] weights}``, the weight of each task's
      original gradient in the group's last update,
    * ``"mean_cosine"``: the off-diagonal mean of the cosines,
    * ``"group_mean_cosine"``: the same per group, ``{group name: scalar}`` (a
      global mean hides a layer whose tasks conflict behind layers whose
      gradients are orthogonal by construction),
    * ``"task_cosine"``: ``{task name: mean cosine with the other tasks}``,
    * ``"count"``: the number of steps taken;

    and for :func:`gradvac` and :func:`pcgrad` also

    * ``"targets"``: ``{group name: [T, T] targets}`` (the EMA similarity goals),
    * ``"mean_target"``: their off-diagonal mean,
    * ``"corrected_fraction"``: the fraction of pairs corrected at the last step,
    * ``"group_corrected_fraction"``: the same per group.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import optax_gradvac as ogv
    >>> params = {"dense": {"kernel": jnp.zeros(2)}}
    >>> tx = optax.chain(ogv.gradvac(num_tasks=2, beta=0.5), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> task_grads = {"dense": {"kernel": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}}
    >>> _, state = tx.update(task_grads, state, params)
    >>> summary = ogv.similarity_summary(state, params, task_names=["en", "fr"])
    >>> print(summary["cosine"]["dense"])
    [[ 1.         -0.70710677]
     [-0.70710677  1.        ]]
    >>> print(summary["mean_cosine"], summary["corrected_fraction"])
    -0.70710677 1.0
  """
  state = _find_state(opt_state)
  cosine, weights = _array(state.cosine), _array(state.weights)
  num_groups, num_tasks = cosine.shape[0], cosine.shape[-1]
  names = _pytree.group_names(params, granularity)
  if len(names) != num_groups:
    raise ValueError(
      f"similarity_summary: params form {len(names)} groups under granularity "
      f"{granularity!r} but the state has {num_groups}. Pass the granularity the "
      "transformation was built with and the tree it was initialised with."
    )
  if task_names is None:
    task_names = [f"task_{task}" for task in range(num_tasks)]
  _checks.check_task_names("similarity_summary", task_names)
  if len(task_names) != num_tasks:
    raise ValueError(f"similarity_summary: {len(task_names)} task names for {num_tasks} tasks.")

  off_diagonal = ~jnp.eye(num_tasks, dtype=bool)
  # A task absent from a group has cosine 0 with itself, 1 otherwise.
  present = jnp.diagonal(cosine, axis1=1, axis2=2) > 0.5  # [G, T]
  pairs = off_diagonal & present[:, :, None] & present[:, None, :]  # [G, T, T]
  summary = {
    "cosine": dict(zip(names, cosine, strict=True)),
    "weights": dict(zip(names, weights, strict=True)),
    "mean_cosine": _mean(cosine, pairs),
    "group_mean_cosine": dict(zip(names, _mean(cosine, pairs, axis=(1, 2)), strict=True)),
    "task_cosine": dict(zip(task_names, _mean(cosine, pairs, axis=(0, 2)), strict=True)),
    "count": _array(state.count),
  }
  if hasattr(state, "targets"):
    targets = _array(state.targets)
    summary["targets"] = dict(zip(names, targets, strict=True))
    summary["mean_target"] = _mean(targets, jnp.broadcast_to(off_diagonal, targets.shape))
  if hasattr(state, "corrected"):
    corrected = _array(state.corrected).astype(cosine.dtype)
    summary["corrected_fraction"] = _mean(corrected, pairs)
    summary["group_corrected_fraction"] = dict(
      zip(names, _mean(corrected, pairs, axis=(1, 2)), strict=True)
    )
  return summary
