"""CAGrad: the average gradient, moved within a ball to help the worst-off task."""

import numbers

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree, _solvers

_MAX_SEARCH_STEPS = 40


def _conflict_averse_weights(
  gram: jax.Array, mean: jax.Array, radius: jax.Array, present: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""``argmin_{w in simplex} <g_w, g_0> + radius |g_w|`` on a normalised Gram matrix.

  For ``u > 0`` let ``w(u)`` be the min-norm point of the hull of the shifted
  gradients ``g_i + g_0 / sqrt(u)``: it minimises ``<g_w, g_0> + sqrt(u)
  |g_w|^2 / 2``, whose optimality conditions are those of the problem above
  exactly when ``sqrt(u) |g_{w(u)}| = radius``. On each face of the simplex
  ``u |g_{w(u)}|^2`` is affine in ``u`` (the face's solution is affine in
  ``1 / sqrt(u)``, its two parts orthogonal) and it does not decrease, so
  ``excess(u) = u |g_{w(u)}|^2 - radius^2`` changes sign once on ``[radius^2,
  radius^2 / m^2]`` (``|g_w| <= 1``; ``m`` is the min-norm point's norm, a
  lower bound of ``|g_w|``): regula falsi with the Illinois modification finds
  the root, exactly once both ends of the bracket lie on the optimal face.

  Returns:
    ``(w, |g_w|^2, degenerate)``; ``degenerate`` when the minimum is at
    ``g_w = 0`` (within float resolution: ``m^2`` below ``64 eps``).
  """
  anchor = gram @ mean  # <g_i, g_0>
  sq_norm_mean = mean @ anchor

  def evaluate(u: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    shifted = gram + jax.lax.rsqrt(u) * (anchor[:, None] + anchor[None, :]) + sq_norm_mean / u
    weights = _solvers.min_norm_weights(shifted, present)
    sq_norm = jnp.maximum(weights @ gram @ weights, 0)
    return u * sq_norm - radius**2, weights, sq_norm

  eps = jnp.finfo(gram.dtype).eps
  searching = radius > 0
  sq_radius = jnp.where(searching, radius**2, 1)
  min_norm = _solvers.min_norm_weights(gram, present)
  sq_min_norm = min_norm @ gram @ min_norm
  resolved = sq_min_norm > 64 * eps
  low, high = sq_radius, sq_radius / jnp.where(resolved, sq_min_norm, 64 * eps)
  low_excess = evaluate(low)[0]
  # excess(high) >= 0 when m is resolved (then a rounded-down excess means the
  # root is at `high`); otherwise a non-positive excess means no root above.
  high_excess, weights, sq_norm = evaluate(high)
  degenerate = searching & ~resolved & (high_excess <= 0)

  def step(carry):
    count, low, low_excess, high, high_excess, side, _, _, _ = carry
    gap = high_excess - low_excess
    secant = (low * high_excess - high * low_excess) / jnp.where(gap > 0, gap, 1)
    point = jnp.clip(jnp.where(gap > 0, secant, (low + high) / 2), low, high)
    excess, weights, sq_norm = evaluate(point)
    above = excess > 0
    # Illinois: halve the stale end's value when the same end moves twice.
    low_excess = jnp.where(above & (side > 0), low_excess / 2, low_excess)
    high_excess = jnp.where(~above & (side < 0), high_excess / 2, high_excess)
    high, high_excess = jnp.where(above, point, high), jnp.where(above, excess, high_excess)
    low, low_excess = jnp.where(above, low, point), jnp.where(above, low_excess, excess)
    settled = jnp.abs(excess) <= 16 * eps * (point * sq_norm + radius**2)
    settled = settled | (high - low <= 16 * eps * high)
    side = jnp.where(above, 1, -1)
    return count + 1, low, low_excess, high, high_excess, side, weights, sq_norm, settled

  done = ~searching | (high_excess <= 0)
  init = (0, low, low_excess, high, high_excess, 0, weights, sq_norm, done)
  *_, weights, sq_norm, _ = jax.lax.while_loop(
    lambda carry: (carry[0] < _MAX_SEARCH_STEPS) & ~carry[-1], step, init
  )
  return weights, sq_norm, degenerate


def cagrad_weights(
  gram: jax.typing.ArrayLike, c: jax.typing.ArrayLike = 0.5, *, rescale: bool = True
) -> jax.Array:
  r"""CAGrad's task weights for one parameter group, from its Gram matrix.

  With :math:`g_0` the average gradient and :math:`g_w = \sum_i w_i g_i`,
  CAGrad solves (the dual of its Eq. 4, all on the Gram matrix)

  .. math::
    w^\star = \operatorname*{argmin}_{w \in \Delta} g_w^\top g_0 + \sqrt\phi \, |g_w|,
    \qquad \sqrt\phi = c \, |g_0|,

  and updates along :math:`d = g_0 + \frac{\sqrt\phi}{|g_{w^\star}|} g_{w^\star}`:
  the direction within distance :math:`c |g_0|` of the average gradient that
  maximises the worst task's improvement :math:`\min_i \langle g_i, d \rangle`.
  ``c = 0`` gives the average gradient; as ``c`` grows, the update tends to
  MGDA's. With ``rescale`` (the default, as in the official code's
  experiments), the update is divided by :math:`1 + c^2`; ``rescale=False``
  gives the paper's Algorithm 1 and torchjd's ``CAGrad``.

  A task whose gradient is zero in this group is left out (weight 0; ``g_0`` is
  the mean of the present tasks); with none left the weights are all 0. If
  the minimum is at :math:`g_{w^\star} = 0` (0 is in the hull of the
  gradients and ``c`` is large enough), the best worst-case improvement is 0,
  reached by every direction of the dual cone :math:`\{x : \langle g_i, x
  \rangle \ge 0\}` within the ball; ``d`` is then the one closest to
  :math:`g_0`, its projection onto that cone (torchjd returns 0 there, the
  official code :math:`g_0`).

  Solver: the program is solved exactly by a one-dimensional search on
  min-norm problems (MGDA on the gradients shifted by a multiple of ``g_0``;
  see ``_conflict_averse_weights``), each solved by
  ``optax_gradvac._solvers.min_norm_weights``: on well-conditioned problems
  the update is exact to float32 rounding (~1e-6 relative to the largest
  gradient). The official code runs scipy's SLSQP; torchjd, cvxpy with Clarabel
  in float64 on a float32 SVD of the Gram matrix.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.
    c: the radius of the ball around the average gradient, relative to its
      norm (``c >= 0``; the paper uses 0.4-0.5 in supervised learning).
    rescale: divide the update by :math:`1 + c^2` (the official code).

  Returns:
    ``[T]`` task weights (0 for absent tasks).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two conflicting tasks
    >>> w = ogv.cagrad_weights(g @ g.T, 0.5, rescale=False)
    >>> print(np.asarray(w).round(4), np.asarray(w @ g).round(4))
    [0.75 0.5 ] [0.25 0.5 ]

  References:
    Liu et al, `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_, 2021
  """
  gram = _gram.normalise(jnp.asarray(gram))
  present = jnp.diagonal(gram) > 0
  mean = present.astype(gram.dtype) / jnp.maximum(jnp.sum(present), 1).astype(gram.dtype)
  c = jnp.asarray(c, gram.dtype)
  radius = c * jnp.sqrt(jnp.maximum(mean @ gram @ mean, 0))
  weights, sq_norm, degenerate = _conflict_averse_weights(gram, mean, radius, present)
  # At a minimum with g_w = 0 every direction of the dual cone within the ball
  # is optimal: take the one closest to g_0, its projection g_0 + J^T lam
  # (lam >= 0) onto the cone.
  coefficient = jnp.where(sq_norm > 0, radius / jnp.sqrt(jnp.where(sq_norm > 0, sq_norm, 1)), 0)
  projection = _solvers.nonnegative_qp(gram, gram @ mean)
  weights = mean + jnp.where(degenerate, projection, coefficient * weights)
  return weights / (1 + c**2) if rescale else weights


def cagrad(
  num_tasks: int,
  c: jax.typing.ArrayLike = 0.5,
  *,
  granularity: _pytree.Granularity = "model",
  rescale: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""CAGrad: the average gradient, moved within a ball to help the worst-off task.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns, for each parameter group,

  .. math::
    d = \operatorname*{argmax}_{|d - g_0| \le c |g_0|} \ \min_i \langle g_i, d \rangle

  (divided by :math:`1 + c^2` with ``rescale``), with :math:`g_0` the average
  gradient: weights from :func:`cagrad_weights`. CAGrad converges to a
  minimum of the average loss for ``c < 1`` while avoiding steps that hurt
  the worst task; ``c = 0`` is plain gradient descent on the average loss.
  The update is scale-equivariant (gradients times ``k`` give the update
  times ``k``).

  Same input contract, checks, special inputs (an absent task is left out of
  its group; a NaN or inf gives its group's plain sum and keeps the state) and
  ``granularity`` options as :func:`gradvac`; the state
  (:class:`GramState`) logs each group's cosines and task weights. ``c`` may
  be a schedule or an array under ``optax.inject_hyperparams(cagrad,
  static_args=("num_tasks", "granularity", "rescale"))``.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    c: radius of the ball relative to the average gradient's norm, ``>= 0``.
      The paper uses 0.4 on NYUv2, 0.5 on CityScapes (its default here).
    granularity: ``"model"`` (default, as in the paper), ``"layer"``,
      ``"tensor"`` or a callable; see :func:`gradvac`.
    rescale: divide the update by :math:`1 + c^2`, as the official code does
      in its experiments; ``False`` gives the paper's Algorithm 1 (and
      torchjd's ``CAGrad``).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> tx = ogv.cagrad(num_tasks=2, c=0.5)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting
    >>> updates, _ = tx.update(task_grads, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(4))
    [0.2 0.4]

  References:
    Liu et al, `Conflict-Averse Gradient Descent for Multi-task Learning
    <https://arxiv.org/abs/2110.14048>`_, 2021
  """
  if isinstance(c, numbers.Real) and not c >= 0:
    raise ValueError(f"cagrad: c must be non-negative, got {c}.")

  def group_weights(gram: jax.Array) -> jax.Array:
    return cagrad_weights(gram, c, rescale=rescale)

  method = _pipeline.stateless("cagrad", group_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
