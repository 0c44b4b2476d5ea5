"""GradVac, PCGrad and the plain baselines as optax transformations."""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _algorithm, _checks, _pytree

_REDUCTIONS = ("sum", "mean")


class GradVacState(NamedTuple):
  """State of :func:`gradvac` and :func:`pcgrad`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  key: jax.Array  # typed PRNG key for the visiting orders.
  targets: jax.Array  # [num_groups, T, T]: EMA similarity goals, the paper's phi-hat.
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  corrected: jax.Array  # [num_groups, T, T] bool: pairs (i, j) corrected at the last step.


def _check_reduction(reduction: str, name: str) -> None:
  if reduction not in _REDUCTIONS:
    raise ValueError(f"{name}: reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


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
    del extra_args
    leaves, tasks = _pytree.check_task_axis(name, updates, params, num_tasks)
    if not leaves:
      return updates, state
    weight = 1.0 if reduction == "sum" else 1.0 / tasks
    weights = jnp.full((tasks,), weight, _pytree.compute_dtype(leaves))
    reduced = [_pytree.weighted_sum(leaf, weights) for leaf in leaves]
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


def gradvac(
  num_tasks: int,
  beta: jax.typing.ArrayLike = 1e-2,
  *,
  granularity: _pytree.Granularity = "layer",
  key: jax.Array | int = 0,
  shuffle: bool = True,
  reduction: str = "sum",
  eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""Gradient Vaccine: aligns conflicting task gradients towards learned targets.

  ``update`` takes per-task gradients stacked on a leading task axis (every
  leaf ``[num_tasks, *param.shape]``, as ``jax.vmap`` of a gradient produces
  them) and returns one update shaped like the parameters.

  For each parameter group independently (Algorithm 1 of the paper), each task
  ``i`` visits the other tasks ``j`` in a random order; with :math:`\phi` the
  cosine between its current gradient :math:`g_i'` and the original
  :math:`g_j`, and :math:`\hat\phi_{ij}` the target:

  .. math::
    \text{if } \phi < \hat\phi_{ij}: \quad g_i' \mathrel{+}=
      \frac{|g_i'| \, (\hat\phi_{ij} \sqrt{1 - \phi^2} - \phi \sqrt{1 - \hat\phi_{ij}^2})}
           {|g_j| \sqrt{1 - \hat\phi_{ij}^2}} \, g_j, \qquad
    \hat\phi_{ij} \leftarrow (1 - \beta) \, \hat\phi_{ij} + \beta \, \phi

  so that afterwards :math:`\cos(g_i', g_j) = \hat\phi_{ij}`. The targets start
  at 0 and follow an EMA of the observed cosines (horizon about ``1 / beta``
  steps); the update is :math:`\sum_i g_i'`.

  Cost: two passes over the gradients (their Gram matrices, then one weighted
  sum); the sequential part runs on ``[num_groups, T, T]`` arrays in a
  ``lax.scan`` of ``T - 1`` rounds. Compatible with ``jit``, ``vmap``,
  sharding and ``optax.inject_hyperparams(gradvac, static_args=("num_tasks",))``.

  Special inputs: a task whose gradient is exactly zero in a group (e.g. a task
  absent from the batch) takes no part in that group's surgery and keeps its
  targets. If any gradient entry is NaN or inf, the update is the plain sum
  (so a later ``optax.apply_if_finite`` can skip the step) and the state is
  returned unchanged.

  .. warning::
    The input has a task axis that the output does not, so ``gradvac`` must
    come first in a chain; every leaf's shape is checked. ``optax.MultiSteps``
    cannot wrap it unchanged (its accumulator is shaped like the parameters):
    use :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    beta: EMA rate of the targets in ``[0, 1]``; ``0`` keeps them at 0 (PCGrad).
    granularity: the parameter groups, each with its own targets:
      ``"layer"`` (default; the paper's finer-grained setting: leaves grouped
      by their parent path, so a ``Dense`` kernel and bias share a group),
      ``"model"`` (one group), ``"tensor"`` (one group per leaf), or a
      callable ``params -> pytree of labels`` (leaves with equal labels share a
      group; derive labels from paths, not shapes: the callable sees the
      parameters at ``init`` and the stacked gradients at ``update``). See
      :func:`group_names` for the order of the groups.
    key: PRNG key (typed, or a raw ``jax.random.PRNGKey``) or integer seed for
      the random visiting orders; the state keeps a typed key.
    shuffle: visit the other tasks in a random order drawn per (group, task)
      each step, as in the paper; ``False`` visits them in ascending order.
    reduction: ``"sum"`` (the paper) or ``"mean"`` of the corrected gradients.
    eps: floor of :math:`1 - \hat\phi^2` under its square root; a pure division
      guard that never meets a norm, so results do not depend on the
      gradients' scale.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GradVacState`.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_gradvac as ogv
    >>> params = {"w": jnp.zeros(2)}
    >>> tx = optax.chain(ogv.gradvac(num_tasks=2, beta=0.5), optax.sgd(1.0))
    >>> state = tx.init(params)
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting
    >>> updates, state = jax.jit(tx.update)(task_grads, state, params)
    >>> print(updates["w"])
    [-0.5 -1.5]
    >>> print(optax.tree.get(state, "targets")[0])  # EMA of the cosines
    [[ 0.         -0.35355338]
     [-0.35355338  0.        ]]

  References:
    Wang et al, `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, 2021
  """
  _checks.check_num_tasks("gradvac", num_tasks)
  _pytree.check_granularity(granularity)
  _check_reduction(reduction, "gradvac")
  _checks.check_rate("gradvac", "beta", beta)
  _checks.check_positive("gradvac", "eps", eps)
  _checks.check_key("gradvac", key)
  _checks.check_flag("gradvac", "shuffle", shuffle)

  def init_fn(params: optax.Params) -> GradVacState:
    _checks.check_arrays("gradvac", "parameter", params)
    names, _ = _pytree.leaf_groups(params, granularity)
    dtype = _pytree.compute_dtype(
      [leaf for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    )
    shape = (len(names), num_tasks, num_tasks)
    # A buffer per field, so that the state can be donated to a jitted step.
    return GradVacState(
      count=jnp.zeros([], jnp.int32),
      key=_checks.canonicalize_key("gradvac", key),
      targets=jnp.zeros(shape, dtype),
      cosine=jnp.zeros(shape, dtype),
      corrected=jnp.zeros(shape, bool),
    )

  def update_fn(
    updates: optax.Updates,
    state: GradVacState,
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, GradVacState]:
    del extra_args
    leaves, _ = _pytree.check_task_axis("gradvac", updates, params, num_tasks)
    _checks.check_state("gradvac", state, GradVacState, num_tasks)
    names, groups = _pytree.leaf_groups(updates, granularity)
    if len(names) != state.targets.shape[0]:
      raise ValueError(
        f"gradvac: the gradients form {len(names)} groups under granularity "
        f"{granularity!r} but the state was initialised with {state.targets.shape[0]}: "
        "init and update must see trees with the same paths."
      )
    if not leaves:
      return updates, state

    dtype = _pytree.compute_dtype([*leaves, state.targets])
    gram = _pytree.gram_matrices(leaves, groups, len(names), dtype)
    key, order_key = jax.random.split(state.key)
    order = _algorithm.visiting_order(order_key, len(names), num_tasks, shuffle=shuffle)
    surgery = jax.vmap(functools.partial(_algorithm.gradvac_coefficients, beta=beta, eps=eps))(
      gram, state.targets, order
    )
    weights = surgery.coefficients.sum(axis=1)  # [groups, T]: sum over the rows i
    if reduction == "mean":
      weights = weights / num_tasks

    # A NaN or inf entry makes its task's squared norm non-finite: one check on
    # the Gram diagonal, no extra pass over the gradients.
    finite = jnp.all(jnp.isfinite(jnp.diagonal(gram, axis1=1, axis2=2)))
    plain = 1.0 if reduction == "sum" else 1.0 / num_tasks
    weights = jnp.where(finite, weights, plain)
    new_state = GradVacState(
      count=optax.safe_increment(state.count),
      key=key,
      targets=surgery.targets,
      cosine=_algorithm.pairwise_cosine(gram).astype(state.cosine.dtype),
      corrected=surgery.corrected,
    )
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)

    reduced = [
      _pytree.weighted_sum(leaf, weights[group]) for leaf, group in zip(leaves, groups, strict=True)
    ]
    return jax.tree.unflatten(jax.tree.structure(updates), reduced), new_state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def pcgrad(
  num_tasks: int,
  *,
  granularity: _pytree.Granularity = "model",
  key: jax.Array | int = 0,
  shuffle: bool = True,
  reduction: str = "sum",
  eps: jax.typing.ArrayLike = 1e-8,
) -> optax.GradientTransformationExtraArgs:
  r"""PCGrad: projects each task gradient off the others it conflicts with.

  For each task ``i`` and each other task ``j`` in a random order, if
  :math:`\langle g_i', g_j \rangle < 0` then
  :math:`g_i' \mathrel{-}= \frac{\langle g_i', g_j \rangle}{|g_j|^2} g_j`;
  the update is :math:`\sum_i g_i'`. This is exactly :func:`gradvac` with its
  targets held at 0 (``beta=0``), and shares its input contract, special
  cases and state (:class:`GradVacState`, whose ``targets`` stay 0 and whose
  ``cosine`` and ``corrected`` fields are useful for logging).

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, as in the paper), ``"layer"``,
      ``"tensor"`` or a callable; see :func:`gradvac`.
    key: PRNG key (typed or raw) or integer seed for the random visiting orders.
    shuffle: random visiting order per (group, task) each step, as in the
      paper; ``False`` visits the others in ascending order.
    reduction: ``"sum"`` (the paper) or ``"mean"``.
    eps: see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.pcgrad(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting
    >>> updates, _ = tx.update(task_grads, tx.init(params), params)
    >>> print(updates["w"])
    [0.5 1.5]

  References:
    Yu et al, `Gradient Surgery for Multi-Task Learning
    <https://arxiv.org/abs/2001.06782>`_, 2020
  """
  return gradvac(
    num_tasks,
    beta=0.0,
    granularity=granularity,
    key=key,
    shuffle=shuffle,
    reduction=reduction,
    eps=eps,
  )
