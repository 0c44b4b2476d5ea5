"""Small convex solvers on ``T`` variables, for the weightings that solve a program.

Every function here is pure array code on ``[T, T]`` matrices: ``jit``-,
``vmap``- and sharding-friendly, with no host callback and a fixed cap on every
loop (``lax.while_loop`` stops early once converged; under ``vmap`` a batch
runs until its slowest member has converged or hit the cap). They never see the
gradients, only Gram-like matrices, so their cost does not depend on the number
of parameters.

The workhorse is :func:`nonnegative_qp`, a convex quadratic program over the
non-negative orthant; :func:`min_norm_weights` (MGDA's problem, the min-norm
point of a convex hull) reduces to it.
"""

import jax
import jax.numpy as jnp

_PRECISION = jax.lax.Precision.HIGHEST


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_PRECISION)


def _natural_residual(
  quadratic: jax.Array, linear: jax.Array, x: jax.Array, free: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """``|min(x, gradient)|`` per variable (0 at an optimum), and its rounding level."""
  gradient = _matmul(x, quadratic) + linear
  residual = jnp.where(free, jnp.abs(jnp.minimum(x, gradient)), 0)
  rounding = _matmul(jnp.abs(x), jnp.abs(quadratic)) + jnp.abs(linear)
  return residual, rounding


def nonnegative_qp(
  quadratic: jax.typing.ArrayLike,
  linear: jax.typing.ArrayLike,
  *,
  mask: jax.typing.ArrayLike | None = None,
  max_iterations: int = 500,
  polish_steps: int = 2,
  tolerance: float = 1.0,
) -> jax.Array:
  r"""Minimises a convex quadratic over the non-negative orthant.

  .. math::
    x^\star = \operatorname*{argmin}_{x \ge 0} \tfrac12 x^\top Q x + q^\top x

  for every row ``q`` of ``linear`` (several problems that share ``Q`` are
  solved together, as one matrix product per iteration). ``Q`` must be
  symmetric positive semi-definite; a variable whose diagonal entry ``Q[j, j]``
  is 0 (or whose ``mask`` entry is false) is held at 0.

  The solver rescales the variables so that ``Q`` has a unit diagonal (Jacobi
  preconditioning: the orthant is unchanged, tasks of very different gradient
  norms become equally easy), runs accelerated projected gradient (FISTA with
  adaptive restarts, step ``1 / L`` with ``L`` the Gershgorin bound on the
  largest eigenvalue), then up to ``polish_steps`` primal-dual active-set
  steps: solve ``Q_FF x_F = -q_F`` on the variables ``F`` that the current
  point leaves free, keep the result where it lowers the residual. Each phase
  stops as soon as every problem is converged: the natural residual
  :math:`|\min(x, Qx + q)|` of every variable is within ``tolerance`` rounding
  units of ``|Q| |x| + |q|``.

  Tolerance: on problems whose optimal free set has a well-conditioned
  ``Q_FF``, the polish step makes the result exact up to float32 rounding of
  ``Q`` (relative error ~1e-6 in ``Q x``). On degenerate problems (a singular
  ``Q_FF``, e.g. more variables in play than the rank of ``Q``) the result is
  that of accelerated projected gradient after ``max_iterations`` iterations,
  whose objective is within :math:`O(L |x_0 - x^\star|^2 / k^2)` of optimal.

  Args:
    quadratic: ``[T, T]`` symmetric positive semi-definite matrix ``Q``.
    linear: ``[T]`` vector ``q``, or ``[K, T]``: ``K`` problems sharing ``Q``.
    mask: optional boolean array broadcastable to ``linear``: the variables
      allowed to be positive; the others are fixed at 0.
    max_iterations: cap on the projected-gradient iterations (a Python int).
    polish_steps: cap on the active-set steps (a Python int); each solves a
      ``[T, T]`` linear system per problem.
    tolerance: the convergence test in units of rounding: a variable is
      converged when its natural residual is below ``tolerance * eps`` times
      the magnitude of the terms of its gradient.

  Returns:
    The minimisers, shaped like ``linear``, in the dtype of ``Q`` and ``q``
    (at least float32).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from optax_gradvac._solvers import nonnegative_qp
    >>> quadratic = jnp.array([[2.0, 1.0], [1.0, 2.0]])
    >>> print(np.asarray(nonnegative_qp(quadratic, jnp.array([-2.0, 1.0]))).round(4))
    [1. 0.]
  """
  quadratic, linear = jnp.asarray(quadratic), jnp.asarray(linear)
  dtype = jnp.result_type(jnp.float32, quadratic.dtype, linear.dtype)
  quadratic, linear = quadratic.astype(dtype), linear.astype(dtype)
  single = linear.ndim == 1
  linear = jnp.atleast_2d(linear)
  num_vars = quadratic.shape[-1]
  diagonal = jnp.diagonal(quadratic)
  free = jnp.broadcast_to(diagonal > 0, linear.shape)
  if mask is not None:
    free = free & jnp.broadcast_to(jnp.asarray(mask, bool), linear.shape)
  scale = jnp.where(diagonal > 0, jax.lax.rsqrt(jnp.where(diagonal > 0, diagonal, 1)), 0)
  quadratic = quadratic * scale[:, None] * scale[None, :]
  linear = jnp.where(free, linear * scale, 0)
  eps = jnp.finfo(dtype).eps

  def converged(x: jax.Array) -> jax.Array:
    residual, rounding = _natural_residual(quadratic, linear, x, free)
    return jnp.all(residual <= tolerance * eps * rounding)

  # Accelerated projected gradient, in chunks between convergence checks.
  lipschitz = jnp.max(jnp.sum(jnp.abs(quadratic), axis=-1))
  step = 1 / jnp.where(lipschitz > 0, lipschitz, 1)
  chunk = 10

  def apg_step(_, carry):
    x, y, momentum = carry
    gradient = _matmul(y, quadratic) + linear
    new_x = jnp.where(free, jnp.maximum(y - step * gradient, 0), 0)
    new_momentum = (1 + jnp.sqrt(1 + 4 * momentum**2)) / 2
    # Restart the momentum of a problem whose step goes uphill (O'Donoghue and
    # Candes, 2015): FISTA then converges linearly on strongly convex problems.
    restart = jnp.sum(gradient * (new_x - x), axis=-1, keepdims=True) > 0
    new_momentum = jnp.where(restart, 1, new_momentum)
    extrapolation = jnp.where(restart, 0, (momentum - 1) / new_momentum)
    return new_x, new_x + extrapolation * (new_x - x), new_momentum

  def apg_chunk(carry):
    iteration, x, y, momentum, _ = carry
    x, y, momentum = jax.lax.fori_loop(0, chunk, apg_step, (x, y, momentum))
    return iteration + chunk, x, y, momentum, converged(x)

  zeros = jnp.zeros_like(linear)
  init = (0, zeros, zeros, jnp.ones((linear.shape[0], 1), dtype), converged(zeros))
  _, x, *_ = jax.lax.while_loop(
    lambda carry: (carry[0] < max_iterations) & ~carry[-1], apg_chunk, init
  )

  # Primal-dual active-set polish: one Newton step on the current free set.
  identity = jnp.eye(num_vars, dtype=dtype)

  def polish(carry):
    step_index, x, best, _ = carry
    gradient = _matmul(x, quadratic) + linear
    support = free & (x - gradient > 0)
    # Q_FF padded with the identity. LU rather than Cholesky: on a nearly
    # singular Q_FF (nearly parallel gradients) it still gives a usable step.
    system = jnp.where(support[:, :, None] & support[:, None, :], quadratic, identity)
    rhs = jnp.where(support, -linear, 0)[..., None]
    solution = jnp.linalg.solve(system, rhs)[..., 0]
    solution = jnp.where(support & jnp.isfinite(solution), solution, 0)
    candidate = jnp.maximum(solution, 0)
    # f(candidate) - f(best) from their difference: accurate where the two
    # objective values themselves agree to more digits than float32 holds.
    change = candidate - best
    best_gradient = _matmul(best, quadratic) + linear
    decrease = jnp.sum(change * (best_gradient + _matmul(change, quadratic) / 2), axis=-1)
    best = jnp.where(decrease[:, None] < 0, candidate, best)
    return step_index + 1, solution, best, converged(best)

  init = (0, x, x, converged(x))
  _, _, x, _ = jax.lax.while_loop(
    lambda carry: (carry[0] < polish_steps) & ~carry[-1], polish, init
  )
  x = x * scale
  return x[0] if single else x


def dual_cone_projection(
  gram: jax.typing.ArrayLike, weights: jax.typing.ArrayLike, **solver_options
) -> jax.Array:
  r"""The weights of the projection of :math:`\sum_t u_t g_t` onto the dual cone of the vectors.

  The dual cone of vectors :math:`g_1, \dots, g_T` is :math:`\{x : \langle g_t,
  x \rangle \ge 0 \ \forall t\}`. The projection of :math:`J^\top u` onto it
  (``J`` the matrix whose rows are the vectors) is :math:`J^\top v` with
  (Proposition 1 of Quinton and Rey, 2024)

  .. math::
    v = \operatorname*{argmin}_{v \ge u} v^\top G v,

  solved by :func:`nonnegative_qp` in :math:`x = v - u \ge 0`: the quadratic
  :math:`G`, the linear term :math:`G u`. Several ``u`` (the rows of ``weights``)
  are projected together. A vector of norm 0 keeps its weight (:math:`v_t = u_t`).

  Args:
    gram: ``[T, T]`` Gram matrix of the vectors.
    weights: ``[T]`` weights :math:`u` of the vector to project, or ``[K, T]``.
    **solver_options: passed to :func:`nonnegative_qp`.

  Returns:
    ``[T]`` (or ``[K, T]``) weights :math:`v` of the projections.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> from optax_gradvac._solvers import dual_cone_projection
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])
    >>> v = jax.jit(dual_cone_projection)(g @ g.T, jnp.array([1.0, 0.0]))  # project g_0
    >>> print(np.asarray(v).round(4), np.asarray(v @ g).round(4))
    [1.  0.5] [0.5 0.5]
  """
  gram, weights = jnp.asarray(gram), jnp.asarray(weights)
  excess = nonnegative_qp(gram, _matmul(weights, gram), **solver_options)
  return weights + excess


def min_norm_weights(
  gram: jax.typing.ArrayLike, mask: jax.typing.ArrayLike | None = None, **solver_options
) -> jax.Array:
  r"""The weights of the min-norm point of the convex hull of ``T`` vectors.

  .. math::
    w^\star = \operatorname*{argmin}_{w \ge 0, \ \sum_t w_t = 1} w^\top G w

  (MGDA's problem, with ``G`` the Gram matrix of the vectors). It is solved as
  the non-negative least-squares problem :math:`\min_{u \ge 0} u^\top G u +
  \kappa (1^\top u - 1)^2` (a least-distance program, Lawson and Hanson 1974,
  ch. 23), whose solution is :math:`u^\star = \frac{\kappa}{\kappa + m}
  w^\star` with :math:`m = w^{\star\top} G w^\star`: :math:`w^\star = u^\star /
  1^\top u^\star`. ``kappa`` is the smallest squared norm in play, so that the
  sum constraint weighs like the vectors themselves.

  Args:
    gram: ``[T, T]`` Gram matrix of the vectors.
    mask: optional ``[T]`` booleans: the vectors in the hull. By default, every
      vector of non-zero norm (a zero vector would make the min-norm point 0).
    **solver_options: passed to :func:`nonnegative_qp`.

  Returns:
    ``[T]`` weights on the simplex, 0 outside the hull; all 0 when no vector
    is in play.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> from optax_gradvac._solvers import min_norm_weights
    >>> g = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> print(np.asarray(min_norm_weights(g @ g.T)).round(4))  # the point (0.8, 0.4)
    [0.8 0.2]
  """
  gram = jnp.asarray(gram)
  sq_norms = jnp.diagonal(gram)
  in_hull = sq_norms > 0 if mask is None else jnp.asarray(mask, bool)
  kappa = jnp.min(jnp.where(in_hull & (sq_norms > 0), sq_norms, jnp.inf))
  kappa = jnp.where(jnp.isfinite(kappa), kappa, 1)
  ones = jnp.ones_like(sq_norms)
  quadratic = gram + kappa * ones[:, None] * ones[None, :]
  u = nonnegative_qp(quadratic, -kappa * ones, mask=in_hull, **solver_options)
  total = jnp.sum(u)
  return jnp.where(total > 0, u / jnp.where(total > 0, total, 1), 0)
