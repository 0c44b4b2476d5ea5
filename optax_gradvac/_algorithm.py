"""GradVac's Algorithm 1 on the Gram matrix of one parameter group.

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

from typing import NamedTuple

import jax
import jax.numpy as jnp

from optax_gradvac import _checks


class Surgery(NamedTuple):
  """Result of :func:`gradvac_coefficients` for one parameter group."""

  coefficients: jax.Array  # [T, T]: g_i' = sum_k coefficients[i, k] g_k.
  targets: jax.Array  # [T, T]: the EMA similarity goals after this step.
  corrected: jax.Array  # [T, T] bool: whether g_i was corrected towards g_j.


def _normalise(gram: jax.Array) -> jax.Array:
  """Divides a Gram matrix by its largest diagonal entry.

  Every quantity the algorithm uses is a ratio of Gram entries, so this changes
  no result; it keeps products of squared norms far from overflow and underflow
  whatever the gradients' scale.
  """
  scale = jnp.max(jnp.diagonal(gram))
  return gram / jnp.where(scale > 0, scale, 1)


def _cosine(dot: jax.Array, sq_norm_a: jax.Array, sq_norm_b: jax.Array) -> jax.Array:
  """Cosine from a dot product and two squared norms; 0 where a norm is 0.

  ``dot / sqrt(|a|^2 |b|^2)`` rather than ``dot / (|a| |b|)``: for identical
  vectors the former is exactly 1 in floating point, so a task never corrects
  its own copy because of a rounding error.
  """
  denominator = sq_norm_a * sq_norm_b
  positive = denominator > 0
  cosine = dot / jnp.sqrt(jnp.where(positive, denominator, 1))
  return jnp.where(positive, jnp.clip(cosine, -1, 1), 0)


def pairwise_cosine(gram: jax.typing.ArrayLike) -> jax.Array:
  """Cosine similarity of every pair of vectors from their Gram matrix.

  Args:
    gram: ``[..., T, T]`` Gram matrix, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[..., T, T]`` cosines in ``[-1, 1]``; 0 in the rows and columns of zero
    vectors.
  """
  gram = jnp.asarray(gram)
  _checks.check_gram("pairwise_cosine", gram)
  gram = jax.vmap(_normalise)(gram.reshape(-1, *gram.shape[-2:])).reshape(gram.shape)
  sq_norms = jnp.diagonal(gram, axis1=-2, axis2=-1)
  return _cosine(gram, sq_norms[..., :, None], sq_norms[..., None, :])


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
  gram = _normalise(gram)
  sq_norms = jnp.diagonal(gram)
  present = sq_norms > 0
  rows = jnp.arange(num_tasks)

  def visit(carry, partner):
    coefficients, coefficients_gram, new_targets, corrected = carry
    sq_norm_current = jnp.maximum(jnp.sum(coefficients * coefficients_gram, axis=1), 0)
    phi = _cosine(coefficients_gram[rows, partner], sq_norm_current, sq_norms[partner])
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
