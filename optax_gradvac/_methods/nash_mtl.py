r"""Nash-MTL: the Nash bargaining solution, by Newton's method warm-started from the state.

With :math:`u_t = g_t / |g_t|`, :math:`C` their cosine matrix and
:math:`\beta_t = \alpha_t |g_t|`, the bargaining equation :math:`G \alpha = 1 / \alpha`
is :math:`C \beta = 1 / \beta`: the optimality condition of the strictly convex
:math:`\min_{\beta > 0} \tfrac12 \beta^\top C \beta - \sum_t \log \beta_t`, to which a
penalty :math:`\sum_t (\beta_t / M)^8 / 8` is added (see :func:`nash_mtl_weights`).
Newton's method on it, in the variables :math:`\beta_t (1 + x_t)`, has gradient
:math:`r = \beta \odot C \beta - 1 + (\beta / M)^8` and Hessian
:math:`B C B + I + 7 \operatorname{diag}(\beta / M)^8` (:math:`B =
\operatorname{diag}(\beta)`; every eigenvalue is at least 1). A step damped by
:math:`1 / (1 + \lambda)`, :math:`\lambda` the Newton decrement, keeps
:math:`\beta > 0` and decreases the objective from any start; each iteration
takes the best of that step and of the lengths 1, 1/2, ..., 1/128, evaluated
together (no sequential line search), and the full step once
:math:`\lambda < 1/2`, where it converges quadratically.
"""

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _gram, _pipeline, _pytree

_HIGHEST = jax.lax.Precision.HIGHEST


class NashMTLSolution(NamedTuple):
  """Result of :func:`nash_mtl_weights` for one parameter group."""

  weights: jax.Array  # [T]: alpha > 0 with G alpha = 1 / alpha (0 for zero gradients).
  iterate: jax.Array  # [T]: beta = alpha * norm(g), the weights of the unit gradients.
  residual: jax.Array  # shape=(): max_t abs(beta_t (C beta)_t - 1) + penalty gradient.
  iterations: jax.Array  # shape=(), dtype=int32: Newton steps taken.


_POWER = 8  # of the penalty on beta / max_weight


def _objective(cosine: jax.Array, beta: jax.Array, max_weight: jax.Array) -> jax.Array:
  quadratic = beta @ jnp.matmul(cosine, beta, precision=_HIGHEST)
  penalty = jnp.sum((beta / max_weight) ** _POWER) / _POWER
  return quadratic / 2 - jnp.sum(jnp.log(beta)) + penalty


def _best_on_ray(cosine: jax.Array, beta: jax.Array, max_weight: jax.Array) -> jax.Array:
  """``c * beta`` with ``c^2 beta^T C beta = T`` (the best multiple without the penalty)."""
  quadratic = beta @ jnp.matmul(cosine, beta, precision=_HIGHEST)
  scaled = beta * jnp.sqrt(beta.shape[-1] / jnp.maximum(quadratic, 1 / max_weight**2))
  return jnp.minimum(scaled, max_weight)


def nash_mtl_weights(
  gram: jax.typing.ArrayLike,
  start: jax.typing.ArrayLike | None = None,
  *,
  max_weight: jax.typing.ArrayLike = 100.0,
  max_iterations: jax.typing.ArrayLike = 20,
) -> NashMTLSolution:
  r"""Nash-MTL's task weights for one parameter group: :math:`G \alpha = 1 / \alpha`.

  The update :math:`d = \sum_t \alpha_t g_t` is the Nash bargaining solution of
  the tasks (Theorem 3.1 of the paper): every task's weight times its
  directional derivative is the same, :math:`\alpha_t \langle g_t, d \rangle = 1`.
  The paper reaches it by a sequence of convex programs (cvxpy); here damped
  Newton on the equivalent :math:`C \beta = 1 / \beta`, :math:`\beta_t = \alpha_t |g_t|`
  (see the module docstring), runs in a ``lax.while_loop`` that stops when every
  :math:`|\beta_t (C\beta)_t - 1 + (\beta_t / M)^8| \le 100\,\epsilon` (1.2e-5 in float32) or after
  ``max_iterations`` steps. It starts from the better (lower objective) of
  ``start`` and of all-ones, each first rescaled along its ray to its best multiple.

  The solution exists only if no nonnegative, nonzero combination of the
  gradients is zero (two opposite tasks have none: no update helps both); as
  that nears, :math:`\beta` grows without bound. A penalty
  :math:`\sum_t (\beta_t / M)^8 / 8`, :math:`M` = ``max_weight``, keeps every
  :math:`\beta_t` near or below :math:`M`: it moves the solution by a relative
  :math:`(\beta_t / M)^8` (1e-8 at :math:`\beta_t = M / 10`), and
  :math:`\beta_t` is large only when the update is nearly orthogonal to
  :math:`g_t` (cosine :math:`1 / (\beta_t \sqrt{T})`). Two opposite tasks then
  cancel to a near-zero update. A zero gradient is left out (weight 0).

  Pure array code: jit- and vmap-compatible.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.
    start: ``[T]`` positive warm start for :math:`\beta` (the ``iterate`` of a
      previous solution); ``None`` starts from ones.
    max_weight: soft bound :math:`M` on :math:`\beta_t = \alpha_t |g_t|`.
    max_iterations: cap on the Newton steps.

  Returns:
    A :class:`NashMTLSolution`. The update depends only on the unit gradients:
    scaling a task's gradient by ``c`` divides its weight by ``c``, and
    :math:`|d| = \sqrt{T}` (:math:`\beta^\top C \beta = T`) up to the penalty.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # orthogonal: alpha_t = 1 / |g_t|
    >>> solution = ogv.nash_mtl_weights(g @ g.T)
    >>> print(solution.weights, solution.weights @ g)
    [0.5 1. ] [1. 1.]

  References:
    Navon et al, `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022
  """
  gram = jnp.asarray(gram)
  num_tasks, dtype = gram.shape[-1], gram.dtype
  max_weight = jnp.asarray(max_weight, dtype)
  norms = jnp.sqrt(jnp.diagonal(_gram.normalise(gram)))
  present = norms > 0
  # An absent task gets an identity row and column: beta_t = 1, decoupled.
  identity = jnp.eye(num_tasks, dtype=dtype)
  cosine = jnp.where(present[:, None] & present[None, :], _gram.pairwise_cosine(gram), identity)
  ones = jnp.ones(num_tasks, dtype)
  beta = _best_on_ray(cosine, ones, max_weight)
  if start is not None:
    start = jnp.asarray(start, dtype)
    start = jnp.where(jnp.all((start > 0) & jnp.isfinite(start)), start, ones)
    warm = _best_on_ray(cosine, start, max_weight)
    beta = jnp.where(
      _objective(cosine, warm, max_weight) < _objective(cosine, beta, max_weight), warm, beta
    )
  tolerance = 100 * jnp.finfo(dtype).eps

  def gradient(beta: jax.Array) -> jax.Array:
    """The gradient in the variables beta_t (1 + x_t), at x = 0."""
    return beta * jnp.matmul(cosine, beta, precision=_HIGHEST) - 1 + (beta / max_weight) ** _POWER

  def unconverged(carry: tuple) -> jax.Array:
    iteration, _, error = carry
    return (iteration < max_iterations) & (jnp.max(jnp.abs(error)) > tolerance)

  def newton_step(carry: tuple) -> tuple:
    iteration, beta, error = carry
    penalty = (_POWER - 1) * (beta / max_weight) ** _POWER
    hessian = cosine * beta[:, None] * beta[None, :] + identity + jnp.diag(penalty)
    # The Hessian is at least the identity, and its rounding errors (about
    # beta^2 T eps) stay far below 1 for beta near max_weight = 100: Cholesky is
    # safe. Were it not (a much larger max_weight), a diagonal step stands in.
    step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), error)
    step = jnp.where(jnp.all(jnp.isfinite(step)), step, -error / jnp.diagonal(hessian))
    decrement = jnp.sqrt(jnp.maximum(-(error @ step), 0))
    # Step lengths 1, 1/2, ..., 1/128 and the damped 1 / (1 + decrement) (which
    # decreases the objective from anywhere), tried together: the best is taken.
    # Near the solution (decrement below 1/2) the full step, which then
    # decreases it too and converges quadratically.
    lengths = jnp.append(0.5 ** jnp.arange(8, dtype=dtype), 1 / (1 + decrement))
    trials = beta * (1 + lengths[:, None] * step)
    feasible = jnp.all(trials > 0, axis=1)
    objective = jax.vmap(_objective, (None, 0, None))
    values = objective(cosine, jnp.where(feasible[:, None], trials, 1), max_weight)
    best = jnp.argmin(jnp.where(feasible, values, jnp.inf))
    beta = trials[jnp.where(decrement < 0.5, 0, best)]
    return iteration + 1, beta, gradient(beta)

  init = (jnp.zeros([], jnp.int32), beta, gradient(beta))
  iterations, beta, error = jax.lax.while_loop(unconverged, newton_step, init)
  weights = jnp.where(present, beta / jnp.where(present, norms, 1), 0)
  # The weights of the gradients themselves: the norms above are of the Gram
  # divided by its largest diagonal entry.
  largest = jnp.max(jnp.diagonal(gram))
  weights = weights / jnp.sqrt(jnp.where(largest > 0, largest, 1))
  return NashMTLSolution(weights, beta, jnp.max(jnp.abs(error)), iterations)


class NashMTLState(NamedTuple):
  """State of :func:`nash_mtl`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  iterate: jax.Array  # [num_groups, T]: last beta = alpha * norm(g) (the warm start).
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  weights: jax.Array  # [num_groups, T]: the task weights alpha of the last step.


def nash_mtl(
  num_tasks: int,
  *,
  granularity: _pytree.Granularity = "model",
  max_weight: jax.typing.ArrayLike = 100.0,
  max_iterations: jax.typing.ArrayLike = 20,
) -> optax.GradientTransformationExtraArgs:
  r"""Nash-MTL: the tasks' Nash bargaining solution as the update direction.

  ``update`` takes per-task gradients stacked on a leading task axis (every
  leaf ``[num_tasks, *param.shape]``) and returns one update shaped like the
  parameters: for each parameter group, :math:`\sum_t \alpha_t g_t` with
  :math:`\alpha > 0` solving :math:`G \alpha = 1 / \alpha`
  (:func:`nash_mtl_weights`). Each step's solve starts from the previous
  step's solution, kept in the state.

  The update depends only on the directions of the task gradients (scaling
  one task's gradient divides its weight by the same factor; degree 0 in all
  of them: ``c g`` gives the same update) and has norm about :math:`\sqrt{T}`
  per group: choose the learning rate accordingly. The official code also clips the update's norm to
  1 (``max_norm``); chain ``optax.clip_by_global_norm(1.0)`` after it for that.
  The official code can reuse the weights for several steps
  (``update_weights_every``) to save the per-task backward passes; here the
  per-task gradients are the input and the solve costs microseconds, so every
  step solves.

  Cost: two passes over the gradients (the Gram matrices, one weighted sum) and
  a few ``[T, T]`` Cholesky solves per group: one per Newton step,
  typically 0 to 3 warm-started and 3 to 7 cold, at most ``max_iterations``.
  Special inputs as :func:`gradvac`: a zero gradient is left out of its group;
  a NaN or inf gives its group's plain sum and leaves the state unchanged.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, the paper's: one problem over all shared
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.
    max_weight: soft bound on each task's weight times its gradient norm (see
      :func:`nash_mtl_weights`): keeps the solution finite when tasks conflict
      completely, and changes no other solution measurably.
    max_iterations: cap on the Newton steps per solve (the official code's
      ``optim_niter`` is 20 convex programs).

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`NashMTLState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.nash_mtl(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(task_grads, tx.init(params), params)
    >>> print(updates["w"], state.weights)
    [1. 1.] [[0.5 1. ]]

  References:
    Navon et al, `Multi-Task Learning as a Bargaining Game
    <https://arxiv.org/abs/2202.01017>`_, ICML 2022
  """
  _checks.check_positive("nash_mtl", "max_weight", max_weight)
  if isinstance(max_iterations, numbers.Real) and not max_iterations >= 1:
    raise ValueError(f"nash_mtl: max_iterations must be at least 1, got {max_iterations}.")

  def init(num_groups: int, num_tasks: int, dtype: jnp.dtype) -> NashMTLState:
    logged = _pipeline.gram_state(num_groups, num_tasks, dtype)
    return NashMTLState(
      count=logged.count,
      iterate=jnp.ones((num_groups, num_tasks), dtype),
      cosine=logged.cosine,
      weights=logged.weights,
    )

  def weigh(gram: jax.Array, state: NashMTLState) -> tuple[jax.Array, NashMTLState]:
    def solve(gram: jax.Array, start: jax.Array) -> NashMTLSolution:
      return nash_mtl_weights(gram, start, max_weight=max_weight, max_iterations=max_iterations)

    solution = jax.vmap(solve)(gram, state.iterate)
    return solution.weights, state._replace(iterate=solution.iterate.astype(state.iterate.dtype))

  method = _pipeline.Method("nash_mtl", init, weigh, homogeneous=False)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
