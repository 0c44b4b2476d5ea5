"""Float64 references for the methods whose weights solve a convex program.

Written from the papers on the task gradients themselves (``[T, P]`` numpy
arrays, no Gram-matrix reformulation, nothing shared with the library), with
exhaustive searches over supports (and scipy's SLSQP for CAGrad's primal).
"""

import itertools

import numpy as np
import scipy.optimize


def present_tasks(grads: np.ndarray) -> np.ndarray:
  """Indices of the tasks whose gradient is not exactly zero."""
  return np.flatnonzero(np.any(grads != 0, axis=1))


def min_norm_weights(grads: np.ndarray) -> np.ndarray:
  """argmin over the simplex of |sum_t w_t g_t|^2, by trying every support.

  For each support S, the minimiser over the affine hull of {g_t : t in S}
  solves the KKT system [[G_SS, 1], [1^T, 0]] [w; -nu] = [0; 1] (least squares
  where it is singular); the best feasible one over all supports is the
  optimum. Exhaustive: for T <= 8 or so.
  """
  grads = np.asarray(grads, np.float64)
  gram = grads @ grads.T
  num_tasks = len(grads)
  best, best_value = None, np.inf
  for size in range(1, num_tasks + 1):
    for support in map(list, itertools.combinations(range(num_tasks), size)):
      kkt = np.zeros((size + 1, size + 1))
      kkt[:size, :size] = gram[np.ix_(support, support)]
      kkt[:size, size] = kkt[size, :size] = 1
      solution = np.linalg.lstsq(kkt, np.r_[np.zeros(size), 1.0], rcond=None)[0]
      weights = np.zeros(num_tasks)
      weights[support] = solution[:size]
      if weights.min() < -1e-12 or abs(weights.sum() - 1) > 1e-9:
        continue
      value = weights @ gram @ weights
      if value < best_value - 1e-15 * max(1.0, gram.max()):
        best, best_value = np.clip(weights, 0, None), value
  return best / best.sum()


def mgda(grads: np.ndarray) -> np.ndarray:
  """MGDA's update: the min-norm point of the hull of the present tasks' gradients."""
  grads = np.asarray(grads, np.float64)
  present = present_tasks(grads)
  if not len(present):
    return np.zeros(grads.shape[1])
  return min_norm_weights(grads[present]) @ grads[present]


def nonnegative_least_squares(matrix: np.ndarray, target: np.ndarray) -> np.ndarray:
  """argmin over x >= 0 of |matrix @ x - target|, by trying every support.

  The optimum's residual is unique, and by Caratheodory it is reached on a
  support of linearly independent columns, where it is the unconstrained least
  squares solution: so the best non-negative least squares solution over all
  supports (the empty one included) is optimal. Exhaustive: for up to 8 or so
  columns. (scipy's ``nnls`` stops with "maximum number of iterations" on some
  rank-deficient problems since scipy 1.15.)
  """
  matrix, target = np.asarray(matrix, np.float64), np.asarray(target, np.float64)
  num_vars = matrix.shape[1]
  best, best_value = np.zeros(num_vars), float(target @ target)
  for size in range(1, num_vars + 1):
    for support in map(list, itertools.combinations(range(num_vars), size)):
      solution = np.linalg.lstsq(matrix[:, support], target, rcond=None)[0]
      if solution.min() < -1e-12 * max(1.0, np.abs(solution).max()):
        continue
      x = np.zeros(num_vars)
      x[support] = np.clip(solution, 0, None)
      residual = matrix @ x - target
      if residual @ residual < best_value:
        best, best_value = x, float(residual @ residual)
  return best


def dual_cone_projection(grads: np.ndarray, vector: np.ndarray) -> np.ndarray:
  """The projection of ``vector`` onto {x : <g_t, x> >= 0 for every t}.

  By Moreau's decomposition it is ``vector + J^T lam`` with ``lam >= 0``
  minimising ``|vector + J^T lam|``: non-negative least squares on ``J^T``.
  """
  lam = nonnegative_least_squares(grads.T, -vector)
  return vector + grads.T @ lam


def upgrad(grads: np.ndarray) -> np.ndarray:
  """UPGrad's update: the mean of every present gradient projected onto the dual cone."""
  grads = np.asarray(grads, np.float64)
  present = present_tasks(grads)
  if not len(present):
    return np.zeros(grads.shape[1])
  rows = grads[present]
  return np.mean([dual_cone_projection(rows, row) for row in rows], axis=0)


def dualproj(grads: np.ndarray) -> np.ndarray:
  """DualProj's update: the mean of the present gradients projected onto the dual cone."""
  grads = np.asarray(grads, np.float64)
  present = present_tasks(grads)
  if not len(present):
    return np.zeros(grads.shape[1])
  rows = grads[present]
  return dual_cone_projection(rows, rows.mean(axis=0))


def conflict_averse_weights(rows: np.ndarray, radius: float) -> np.ndarray | None:
  """argmin over the simplex of <g_w, g_0> + radius |g_w|, by trying every support.

  On a support S where the minimum has g_w != 0, stationarity reads
  b_S + mu G_SS w_S = nu 1 with b = J g_0 and mu = radius / |g_w|; with
  A = G_SS^+, alpha = 1^T A 1, beta = 1^T A b_S and gamma = b_S^T A b_S this
  gives mu^2 = alpha (radius^2 - gamma) + beta^2, nu = (mu + beta) / alpha and
  w_S = (nu A 1 - A b_S) / mu. The minimiser is the candidate that is
  non-negative and satisfies b_j + mu (G w)_j >= nu off the support. None if
  the minimum is at g_w = 0.
  """
  gram = rows @ rows.T
  anchor = gram.mean(axis=1)  # <g_i, g_0>
  num_tasks = len(rows)
  candidates = []
  for size in range(1, num_tasks + 1):
    for support in map(list, itertools.combinations(range(num_tasks), size)):
      inverse = np.linalg.pinv(gram[np.ix_(support, support)])
      ones = np.ones(size)
      alpha, beta = ones @ inverse @ ones, ones @ inverse @ anchor[support]
      gamma = anchor[support] @ inverse @ anchor[support]
      sq_mu = alpha * (radius**2 - gamma) + beta**2
      if alpha <= 0 or sq_mu <= 0:
        continue
      mu = np.sqrt(sq_mu)
      nu = (mu + beta) / alpha
      weights = np.zeros(num_tasks)
      weights[support] = (nu * inverse @ ones - inverse @ anchor[support]) / mu
      gradient = anchor + mu * gram @ weights
      scale = np.abs(gradient).max() + abs(nu)
      if (
        weights.min() >= -1e-10
        and abs(weights.sum() - 1) < 1e-8
        and gradient.min() >= nu - 1e-9 * scale
        and np.abs(gradient[support] - nu).max() <= 1e-9 * scale
      ):
        weights = np.clip(weights, 0, None)
        candidates.append((anchor @ weights + radius * np.sqrt(weights @ gram @ weights), weights))
  if not candidates:
    return None
  return min(candidates, key=lambda candidate: candidate[0])[1]


def cagrad(grads: np.ndarray, c: float, rescale: bool = True) -> np.ndarray:
  """CAGrad's update d = g_0 + radius g_w / |g_w| from the dual minimiser w.

  When the minimum is at g_w = 0, the primal max_d min_i <g_i, d> over the
  ball |d - g_0| <= radius has the value 0 on the whole intersection of the
  ball with the dual cone: the update is then the point of that set closest
  to g_0, the projection of g_0 onto the cone. ``rescale`` divides by 1 + c^2
  as the official code does.
  """
  grads = np.asarray(grads, np.float64)
  present = present_tasks(grads)
  if not len(present):
    return np.zeros(grads.shape[1])
  rows = grads[present]
  mean = rows.mean(axis=0)
  radius = c * np.linalg.norm(mean)
  weights = conflict_averse_weights(rows, radius) if radius > 0 else None
  if radius == 0:
    update = mean
  elif weights is None:
    update = dual_cone_projection(rows, mean)
    assert np.linalg.norm(update - mean) <= radius * (1 + 1e-9)
  else:
    direction = weights @ rows
    update = mean + radius * direction / np.linalg.norm(direction)
  return update / (1 + c**2) if rescale else update


def worst_improvement(grads: np.ndarray, update: np.ndarray) -> float:
  """The primal objective of CAGrad: min_i <g_i, d> over the present tasks."""
  grads = np.asarray(grads, np.float64)
  return float(np.min(grads[present_tasks(grads)] @ update))


def cagrad_primal(grads: np.ndarray, c: float) -> np.ndarray:
  """CAGrad's primal solved as it is stated: max_d min_i <g_i, d> s.t. |d - g_0| <= c |g_0|.

  SLSQP over (d, t): maximise t subject to <g_i, d> >= t and the ball. Less
  precise than :func:`cagrad` (about 1e-7), but it checks the dual's algebra.
  """
  rows = np.asarray(grads, np.float64)
  mean = rows.mean(axis=0)
  radius = c * np.linalg.norm(mean)
  scale = np.abs(rows).max()
  rows, mean, radius = rows / scale, mean / scale, radius / scale
  constraints = [
    {
      "type": "ineq",
      "fun": lambda z: rows @ z[:-1] - z[-1],
      "jac": lambda z: np.c_[rows, -np.ones(len(rows))],
    },
    {
      "type": "ineq",
      "fun": lambda z: radius**2 - np.sum((z[:-1] - mean) ** 2),
      "jac": lambda z: np.r_[-2 * (z[:-1] - mean), 0.0][None],
    },
  ]
  result = scipy.optimize.minimize(
    lambda z: -z[-1],
    np.r_[mean, (rows @ mean).min()],
    jac=lambda z: np.r_[np.zeros(len(mean)), -1.0],
    constraints=constraints,
    method="SLSQP",
    options={"ftol": 1e-14, "maxiter": 1000},
  )
  assert result.status in (0, 8), result.message  # 8: stopped at float64 precision
  return result.x[:-1] * scale
