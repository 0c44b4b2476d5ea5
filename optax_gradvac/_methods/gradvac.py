"""Gradient Vaccine and PCGrad: Algorithm 1 on each group's Gram matrix.

Every corrected gradient is a linear combination of the original task gradients,
``g_i' = sum_k coefficients[i, k] g_k``, so the whole algorithm runs on the
``[T, T]`` Gram matrix ``gram[i, j] = <g_i, g_j>`` and never touches the
gradients themselves:

* ``<g_i', g_j> = (coefficients @ gram)[i, j]``,
* ``|g_i'|^2 = coefficients[i] . (coefficients @ gram)[i]``,
* a correction ``g_i' += w g_j`` is ``coefficients[i, j] += w``.

Rows (tasks ``i``) are independent, so the ``T - 1`` corrections of every row
run together: round ``r`` of a ``lax.scan`` pairs each row ``i`` with its
``r``-th partner ``order[i, r]``.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _gram, _pipeline, _pytree


class Surgery(NamedTuple):
  """Result of :func:`gradvac_coefficients` for one parameter group."""

  coefficients: jax.Array  # [T, T]: g_i' = sum_k coefficients[i, k] g_k.
  targets: jax.Array  # [T, T]: the EMA similarity goals after this step.
  corrected: jax.Array  # [T, T] bool: whether g_i was corrected towards g_j.


def visiting_order(
  key: jax.Array, num_groups: int, num_tasks: int, *, shuffle: bool = True
) -> jax.Array:
  """The order in which every task visits the others, per parameter group.

  Args:
    key: a PRNG key (typed or raw) or an integer seed; unused when ``shuffle``
      is false.
    num_groups: number of parameter groups.
    num_tasks: number of tasks ``T``.
    shuffle: draw an independent random permutation of the other tasks for
      every (group, task); otherwise task ``i`` visits the others in ascending
      order.

  Returns:
    ``[num_groups, T, T - 1]`` int32 array: task ``i`` of group ``k`` visits
    ``order[k, i, 0]``, then ``order[k, i, 1]``, ...
  """
  _checks.check_size("visiting_order", "num_groups", num_groups, 0)
  _checks.check_num_tasks("visiting_order", num_tasks)
  _checks.check_flag("visiting_order", "shuffle", shuffle)
  tasks = jnp.arange(num_tasks)
  if shuffle:
    key = _checks.canonicalize_key("visiting_order", key)
    # Uniforms in [0, 1) with the diagonal set to 2: sorting puts task i last
    # in its own row and the others in a uniformly random order before it.
    priority = jax.random.uniform(key, (num_groups, num_tasks, num_tasks))
    priority = jnp.where(tasks[:, None] == tasks[None, :], 2.0, priority)
  else:
    priority = jnp.where(tasks[:, None] == tasks[None, :], num_tasks, tasks[None, :])
    priority = jnp.broadcast_to(priority, (num_groups, num_tasks, num_tasks))
  return jnp.argsort(priority, axis=-1)[..., :-1].astype(jnp.int32)


def gradvac_coefficients(
  gram: jax.typing.ArrayLike,
  targets: jax.typing.ArrayLike,
  order: jax.typing.ArrayLike,
  beta: jax.typing.ArrayLike,
  *,
  eps: jax.typing.ArrayLike = 1e-8,
) -> Surgery:
  r"""Runs GradVac's Algorithm 1 for one parameter group on its Gram matrix.

  For every task ``i`` and, in turn, every other task ``j = order[i, r]``, with
  ``phi`` the cosine between the current ``g_i'`` and the original ``g_j`` and
  ``t = targets[i, j]``:

  .. math::
    \text{if } \phi < t: \quad g_i' \mathrel{+}= \frac{|g_i'| \, (t \sqrt{1 - \phi^2}
      - \phi \sqrt{1 - t^2})}{|g_j| \sqrt{1 - t^2}} \, g_j, \qquad
    t \leftarrow (1 - \beta) \, t + \beta \, \phi

  The EMA update always happens, with the cosine measured before the correction.
  A task whose gradient is zero in this group (e.g. absent from the batch)
  corrects nobody, is corrected by nobody and keeps its targets. With
  ``beta = 0`` and zero targets this is PCGrad.

  Pure array code: jit-, vmap- and grad-compatible; ``vmap`` it over groups.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.
    targets: ``[T, T]`` EMA similarity goals (the paper's :math:`\hat\phi`).
    order: ``[T, T - 1]`` integer visiting order (see :func:`visiting_order`).
    beta: EMA rate of the targets, in ``[0, 1]``.
    eps: floor of ``1 - t^2`` under the square root, so that targets of exactly
      +-1 give finite corrections. It never meets a norm, so results do not
      depend on the gradients' scale.

  Returns:
    A :class:`Surgery` with the coefficients, the new targets and which pairs
    were corrected. The group's update is ``coefficients.sum(0) @ g``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two conflicting tasks
    >>> order = ogv.visiting_order(None, 1, 2, shuffle=False)[0]
    >>> surgery = ogv.gradvac_coefficients(g @ g.T, jnp.zeros((2, 2)), order, 0.0)
    >>> print(surgery.coefficients.round(4))  # g_0' = g_0 + g_1 / 2, g_1' = g_1 + g_0
    [[1.  0.5]
     [1.  1. ]]

  References:
    Wang et al, `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, 2021
  """
  gram, targets, order = jnp.asarray(gram), jnp.asarray(targets), jnp.asarray(order)
  _checks.check_surgery_inputs("gradvac_coefficients", gram, targets, order)
  _checks.check_rate("gradvac_coefficients", "beta", beta)
  _checks.check_positive("gradvac_coefficients", "eps", eps)
  num_tasks = gram.shape[-1]
  gram = _gram.normalise(gram)
  sq_norms = jnp.diagonal(gram)
  present = sq_norms > 0
  rows = jnp.arange(num_tasks)

  def visit(carry, partner):
    coefficients, coefficients_gram, new_targets, corrected = carry
    sq_norm_current = jnp.maximum(jnp.sum(coefficients * coefficients_gram, axis=1), 0)
    phi = _gram.cosine(coefficients_gram[rows, partner], sq_norm_current, sq_norms[partner])
    target = targets[rows, partner]
    active = present & present[partner]
    correct = active & (phi < target)
    sin_target = jnp.sqrt(jnp.maximum(1 - target**2, eps))
    sin_phi = jnp.sqrt(jnp.maximum(1 - phi**2, 0))
    # |g_i'| / |g_j| as sqrt of a ratio of squares: the partner is present
    # wherever the weight is used, so the division is safe.
    norm_ratio = jnp.sqrt(sq_norm_current / jnp.where(active, sq_norms[partner], 1))
    weight = norm_ratio * (target * sin_phi - phi * sin_target) / sin_target
    weight = jnp.where(correct, weight, 0)
    coefficients = coefficients.at[rows, partner].add(weight)
    coefficients_gram = coefficients_gram + weight[:, None] * gram[partner]
    ema = (1 - beta) * target + beta * phi
    new_targets = new_targets.at[rows, partner].set(jnp.where(active, ema, target))
    corrected = corrected.at[rows, partner].set(correct)
    return (coefficients, coefficients_gram, new_targets, corrected), None

  identity = jnp.eye(num_tasks, dtype=gram.dtype)
  init = (identity, gram, targets.astype(gram.dtype), jnp.zeros(gram.shape, bool))
  (coefficients, _, new_targets, corrected), _ = jax.lax.scan(visit, init, order.T)
  return Surgery(coefficients, new_targets.astype(targets.dtype), corrected)


class GradVacState(NamedTuple):
  """State of :func:`gradvac` and :func:`pcgrad`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  key: jax.Array  # typed PRNG key for the visiting orders.
  targets: jax.Array  # [num_groups, T, T]: EMA similarity goals, the paper's phi-hat.
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  corrected: jax.Array  # [num_groups, T, T] bool: pairs (i, j) corrected at the last step.
  weights: jax.Array  # [num_groups, T]: weight of each original gradient, last step.


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

  Low memory: ``update(None, state, params, task_grads_fn=fn)``, with
  ``fn(params) -> (losses, stacked per-task gradients)`` (e.g. ``lambda p:
  task_value_and_grad(loss)(p, xs, ys)``), computes the gradients itself, twice:
  each leaf's ``[T, ...]`` gradients are reduced to their Gram matrix, then
  (second pass) to the update, as soon as they exist. Same updates and states
  as the stacked input; about ``T x`` the largest leaf of memory instead of
  ``T x`` all parameters, for two backward passes instead of one. Every
  Gram-based transformation of the library takes it; ``optax.chain`` and
  ``nnx.Optimizer.update`` pass it on.

  Special inputs: a task whose gradient is exactly zero in a group (e.g. a task
  absent from the batch) takes no part in that group's surgery and keeps its
  targets. A group with a NaN or inf gradient entry passes its plain sum (so
  the update is not finite, and a later ``optax.apply_if_finite`` can skip the
  step; the other groups' updates do not wait for its gradients), and then the
  whole state is returned unchanged.

  .. warning::
    The input has a task axis that the output does not, so ``gradvac`` must
    come first in a chain. Every leaf is checked against ``[num_tasks,
    *param.shape]``, which catches gradients without a task axis and a second
    per-task transform after the first, but not an element-wise transform such
    as ``adam`` placed before ``gradvac``: its moments would silently gain a
    task axis. ``optax.MultiSteps``
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

    The low-memory path computes the per-task gradients itself:

    >>> def loss(params, x):
    ...   return jnp.sum(params["w"] * x)
    >>> xs = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # one row per task
    >>> task_grads_fn = lambda p: ogv.task_value_and_grad(loss)(p, xs)
    >>> tx = ogv.gradvac(num_tasks=2, beta=0.5)
    >>> @jax.jit
    ... def step(state, params):
    ...   return tx.update(None, state, params, task_grads_fn=task_grads_fn)
    >>> updates, _ = step(tx.init(params), params)
    >>> print(updates["w"])  # the same gradients as above
    [0.5 1.5]

  References:
    Wang et al, `Gradient Vaccine: Investigating and Improving Multi-task
    Optimization in Massively Multilingual Models
    <https://arxiv.org/abs/2010.05874>`_, 2021
  """
  return _surgery("gradvac", num_tasks, beta, granularity, key, shuffle, reduction, eps)


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
  return _surgery("pcgrad", num_tasks, 0.0, granularity, key, shuffle, reduction, eps)


def _surgery(
  name: str,
  num_tasks: int,
  beta: jax.typing.ArrayLike,
  granularity: _pytree.Granularity,
  key: jax.Array | int,
  shuffle: bool,
  reduction: str,
  eps: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """GradVac (PCGrad with ``beta=0``) under the public name ``name``."""
  _checks.check_num_tasks(name, num_tasks)
  _checks.check_reduction(name, reduction)
  _checks.check_rate(name, "beta", beta)
  _checks.check_positive(name, "eps", eps)
  _checks.check_key(name, key)
  _checks.check_flag(name, "shuffle", shuffle)
  scale = 1.0 if reduction == "sum" else 1.0 / num_tasks

  def init(num_groups: int, num_tasks: int, dtype: jnp.dtype) -> GradVacState:
    logged = _pipeline.gram_state(num_groups, num_tasks, dtype)
    return GradVacState(
      count=logged.count,
      key=_checks.canonicalize_key(name, key),
      targets=jnp.zeros(logged.cosine.shape, dtype),
      cosine=logged.cosine,
      corrected=jnp.zeros(logged.cosine.shape, bool),
      weights=logged.weights,
    )

  def weigh(
    gram: jax.Array, state: GradVacState, *, groups: _pipeline.Groups
  ) -> tuple[jax.Array, GradVacState]:
    new_key, order_key = jax.random.split(state.key)
    # Every group's order, whichever groups this call is given.
    order = visiting_order(order_key, groups.total, num_tasks, shuffle=shuffle)[groups.index]
    surgery = jax.vmap(functools.partial(gradvac_coefficients, beta=beta, eps=eps))(
      gram, state.targets, order
    )
    weights = scale * surgery.coefficients.sum(axis=1)  # [groups, T]: sum over the rows i
    return weights, state._replace(
      key=new_key, targets=surgery.targets, corrected=surgery.corrected
    )

  method = _pipeline.Method(name, init, weigh, fallback=scale, inputs=("groups",))
  return _pipeline.gram_transformation(method, num_tasks, granularity)
