"""Float64 references for IMTL-G, Aligned-MTL, Nash-MTL, FairGrad and ConFIG, from the papers.

Plain numpy (and scipy for the fixed points of Nash-MTL and FairGrad) on the flattened ``[T, P]``
gradients of one group: no Gram-matrix tricks shared with the library. Tasks
whose gradient is zero are dropped before the method runs and get weight 0.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize


def with_absent_tasks(method: Callable[[np.ndarray], np.ndarray]) -> Callable:
  """Runs ``method`` on the nonzero gradients only; zero gradients get weight 0."""

  def run(grads: np.ndarray, *args, **kwargs) -> np.ndarray:
    grads = np.asarray(grads, np.float64)
    present = np.any(grads != 0, axis=1)
    weights = np.zeros(len(grads))
    if present.any():
      weights[present] = method(grads[present], *args, **kwargs)
    return weights

  return run


@with_absent_tasks
def imtl_g(grads: np.ndarray) -> np.ndarray:
  """Liu et al. (2021), the closed form of Section 3.2 (IMTL-G).

  ``alpha_{2:T} = g_1 U^T (D U^T)^{-1}`` with ``D = g_1 - g_{2:T}`` and
  ``U = u_1 - u_{2:T}``, ``alpha_1 = 1 - sum(alpha_{2:T})``.
  """
  if np.linalg.matrix_rank(grads) < len(grads):  # D U^T is singular
    return _imtl_g_least_squares(grads)
  units = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  differences = grads[0] - grads[1:]
  unit_differences = units[0] - units[1:]
  rest = grads[0] @ unit_differences.T @ np.linalg.inv(differences @ unit_differences.T)
  return np.concatenate([[1 - rest.sum()], rest])


def _imtl_g_least_squares(grads: np.ndarray) -> np.ndarray:
  """IMTL-G's definition where the paper's system is singular, by SVD least squares.

  ``h`` is the minimum-norm vector with ``U h`` closest to ``1`` (``U``: the unit
  gradients); its minimum-norm coefficients ``beta`` on the unit gradients give
  ``alpha_t = (beta_t / |g_t|) / sum_s beta_s / |g_s|``. Zero when no such ``h``
  exists (``U h = 0``) or the coefficients sum to 0.
  """
  norms = np.linalg.norm(grads, axis=1)
  units = grads / norms[:, None]
  direction = np.linalg.lstsq(units, np.ones(len(grads)), rcond=None)[0]
  if np.linalg.norm(units @ direction) < 1e-6:
    return np.zeros(len(grads))
  unit_weights = np.linalg.lstsq(units.T, direction, rcond=None)[0]
  weights = unit_weights / norms
  if abs(weights.sum()) < 1e-9 * np.abs(weights).sum():
    return np.zeros(len(grads))
  return weights / weights.sum()


imtl_g_least_squares = with_absent_tasks(_imtl_g_least_squares)


def aligned_mtl(grads: np.ndarray, task_weights: np.ndarray | None = None) -> np.ndarray:
  """Senushkin et al. (2023), Algorithm 1, through the SVD of the gradient matrix.

  The aligned gradients are the rows of ``sigma_R U_R V_R^T`` (``grads = U S V^T``
  truncated to its rank R, ``sigma_R`` the smallest kept singular value): the
  closest matrix with orthonormal-times-``sigma_R`` rows. The update is
  ``w @ aligned``, and the weights ``alpha`` with ``alpha @ grads = w @ aligned``
  are ``U_R diag(sigma_R / S_R) U_R^T w``. Singular values at most
  ``sqrt(T * eps) * largest`` count as 0: eigenvalues of the Gram matrix at most
  ``T * eps * largest``, the official code's rule.
  """
  grads = np.asarray(grads, np.float64)
  num_tasks = len(grads)
  present = np.any(grads != 0, axis=1)
  task_weights = np.ones(num_tasks) if task_weights is None else np.asarray(task_weights)
  weights = np.zeros(num_tasks)
  if not present.any():
    return weights
  left, singular, _ = np.linalg.svd(grads[present], full_matrices=False)
  kept = singular > np.sqrt(num_tasks * np.finfo(np.float64).eps) * singular[0]
  left, singular = left[:, kept], singular[kept]
  balance = left @ np.diag(singular[-1] / singular) @ left.T
  weights[present] = balance @ task_weights[present]
  return weights


@with_absent_tasks
def nash_mtl(grads: np.ndarray, max_weight: float | None = None) -> np.ndarray:
  """Navon et al. (2022): the ``alpha > 0`` with ``G alpha = 1 / alpha`` (Theorem 3.1).

  The minimiser of the convex ``alpha^T G alpha / 2 - sum(log alpha)``, plus
  ``sum((alpha_t |g_t| / max_weight)^8) / 8`` when ``max_weight`` is given. Solved
  in log variables ``alpha = exp(x)``: BFGS on the objective, then scipy's root
  finder on its gradient ``alpha * (G alpha) - 1 (+ penalty)``, checked to 1e-10.
  """
  gram = grads @ grads.T
  largest = gram.diagonal().max()
  gram = gram / largest  # alpha scales by sqrt(largest)
  norms = np.sqrt(gram.diagonal())

  def objective(x: np.ndarray) -> tuple[float, np.ndarray]:
    alpha = np.exp(x)
    product = gram @ alpha
    value, gradient = alpha @ product / 2 - x.sum(), alpha * product - 1
    if max_weight is not None:
      value += np.sum((alpha * norms / max_weight) ** 8) / 8
      gradient += (alpha * norms / max_weight) ** 8
    return value, gradient

  start = scipy.optimize.minimize(objective, np.zeros(len(gram)), jac=True, method="BFGS").x
  solution = scipy.optimize.root(lambda x: objective(x)[1], start, tol=1e-14)
  residual = np.max(np.abs(objective(solution.x)[1]))
  assert residual < 1e-10, f"the reference did not converge: residual {residual}"
  return np.exp(solution.x) / np.sqrt(largest)


@with_absent_tasks
def fairgrad(grads: np.ndarray, alpha: float, max_weight: float | None = None) -> np.ndarray:
  """Ban and Ji (2024), Eq. 4: the ``w > 0`` with ``G w = w^(-1/alpha)``.

  The minimiser of the convex ``w^T G w / 2 - sum(h(w))``, ``h'(w) = w^(-1/alpha)``,
  plus a penalty whose derivative is ``w_t^(-1/alpha) (beta_t / max_weight)^8 / alpha``,
  ``beta_t = |g_t| w_t^(1/alpha)``, when ``max_weight`` is given, on the Gram matrix divided
  by its largest diagonal entry ``lambda`` (the weights of ``G`` are
  ``lambda^(-alpha / (alpha + 1))`` times those). scipy's exact-Hessian
  trust-region method in log variables ``w = exp(x)`` from ``x = 0``, then its
  root finder on the relative residual ``w^(1/alpha) (G w) - 1 (+ penalty)``,
  checked to 1e-9.
  """
  gram = grads @ grads.T
  largest = gram.diagonal().max()
  gram = gram / largest
  norms = np.sqrt(gram.diagonal())
  power = 1 - 1 / alpha
  bound = np.inf if max_weight is None else max_weight

  def parts(x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """The objective, its gradient and Hessian in w (the penalty's only with max_weight).

    The penalty P(w) = sum((sigma / M)^8 w^((7 + alpha) / alpha)) / (7 + alpha): its
    derivative is w^(-1/alpha) (beta / M)^8 / alpha, beta = sigma w^(1/alpha).
    """
    weights = np.exp(x)
    exponent = (7 + alpha) / alpha
    scaled = (norms / bound) ** 8 * weights**exponent
    utility = x if alpha == 1 else (weights**power - 1) / power
    value = weights @ gram @ weights / 2 - utility.sum() + scaled.sum() / (7 + alpha)
    gradient = gram @ weights - weights ** (-1 / alpha) + scaled / (alpha * weights)
    curvature = weights ** (-1 / alpha - 1) / alpha + (exponent - 1) * scaled / (alpha * weights**2)
    return value, gradient, gram + np.diag(curvature)

  def objective(x: np.ndarray) -> float:
    return parts(x)[0]

  def jacobian(x: np.ndarray) -> np.ndarray:
    return np.exp(x) * parts(x)[1]

  def hessian(x: np.ndarray) -> np.ndarray:
    weights = np.exp(x)
    _, gradient, curvature = parts(x)
    return weights[:, None] * curvature * weights[None, :] + np.diag(weights * gradient)

  def relative_residual(x: np.ndarray) -> np.ndarray:
    return parts(x)[1] * np.exp(x / alpha)

  start = scipy.optimize.minimize(
    objective, np.zeros(len(gram)), jac=jacobian, hess=hessian, method="trust-exact"
  ).x
  solution = scipy.optimize.root(relative_residual, start, tol=1e-14)
  residual = np.max(np.abs(relative_residual(solution.x)))
  assert residual < 1e-9, f"the reference did not converge: residual {residual}"
  return np.exp(solution.x) * largest ** (-alpha / (alpha + 1))


def config(grads: np.ndarray) -> np.ndarray:
  """Liu et al. (2025), Eq. 2 with equal weights and the projection length: the update.

  ``U`` has the unit gradients as rows (a zero gradient gives a zero row, as in
  the official code); the direction is ``pinv(U) 1`` normalised, its length
  the sum of the gradients' projections on it. 0 where ``pinv(U) 1`` is 0 (to
  rounding: the gradients' span holds no direction with equal positive cosines).
  """
  grads = np.asarray(grads, np.float64)
  norms = np.linalg.norm(grads, axis=1, keepdims=True)
  units = np.divide(grads, norms, out=np.zeros_like(grads), where=norms > 0)
  direction = np.linalg.pinv(units) @ (norms[:, 0] > 0)
  if np.linalg.norm(units @ direction) ** 2 <= len(grads) * 1e-12:
    return np.zeros(grads.shape[1])
  direction = direction / np.linalg.norm(direction)
  return np.sum(grads @ direction) * direction


def rlw_logits(key: int, num_tasks: int, steps: int) -> np.ndarray:
  """The standard normal draws of ``rlw(num_tasks, key=key)``, ``[steps, T]`` float32.

  jax's own draws: the transformation's key, split once per step (the second
  half draws, the first carries on).
  """
  key_array = jax.random.key(key)
  rows = []
  for _ in range(steps):
    key_array, draw = jax.random.split(key_array)
    rows.append(np.asarray(jax.random.normal(draw, (num_tasks,), jnp.float32)))
  return np.stack(rows)


def rlw_weights(key: int, num_tasks: int, steps: int) -> np.ndarray:
  """Lin et al. (2022): ``softmax(z)``, ``z ~ N(0, I)``, one draw per step: ``[steps, T]``.

  The draws are :func:`rlw_logits`, the softmax numpy's in float64.
  """
  logits = rlw_logits(key, num_tasks, steps).astype(np.float64)
  exponentials = np.exp(logits - logits.max(axis=1, keepdims=True))
  return exponentials / exponentials.sum(axis=1, keepdims=True)


class GradNorm:
  """Chen et al. (2018), Algorithm 1, for one parameter group, step by step in float64.

  ``step(grads, losses)`` returns the update ``sum_i w_i g_i`` with the current
  weights, then moves the weights: ``G_i = w_i |g_i|``, ``Gbar`` their mean,
  ``r_i = (L_i / L_i(0)) / mean_j (L_j / L_j(0))``, ``w_i -= lr * sign(G_i - Gbar
  r_i^alpha) |g_i|``, negative weights set to 0, renormalised to sum ``T``. Tasks
  with a zero gradient take no part (nor count in the means) and keep their
  weight; ``L_i(0)`` is each task's first positive loss.
  """

  def __init__(self, num_tasks: int, alpha: float, learning_rate: float) -> None:
    self.weights = np.ones(num_tasks)
    self.initial = np.zeros(num_tasks)
    self.alpha, self.learning_rate = alpha, learning_rate

  def step(self, grads: np.ndarray, losses: np.ndarray) -> np.ndarray:
    grads, losses = np.asarray(grads, np.float64), np.asarray(losses, np.float64)
    update = self.weights @ grads
    norms = np.linalg.norm(grads, axis=1)
    part = [i for i in range(len(grads)) if norms[i] > 0]
    if not part:
      return update
    for i in part:
      if self.initial[i] == 0 and losses[i] > 0:
        self.initial[i] = losses[i]
    ratios = {i: losses[i] / self.initial[i] if self.initial[i] > 0 else 1.0 for i in part}
    mean_ratio = np.mean(list(ratios.values()))
    mean_norm = np.mean([self.weights[i] * norms[i] for i in part])
    weights = self.weights.copy()
    for i in part:
      target = mean_norm * (ratios[i] / mean_ratio) ** self.alpha
      weights[i] -= self.learning_rate * np.sign(self.weights[i] * norms[i] - target) * norms[i]
    weights = np.maximum(weights, 0)
    self.weights = weights * len(weights) / weights.sum()
    return update


def group_weights(
  grads: dict[str, np.ndarray], groups: list[list[str]], method: Callable, *args, **kwargs
) -> np.ndarray:
  """``[num_groups, T]`` weights of ``method`` on each group's flattened gradients."""
  rows = []
  for group in groups:
    flat = np.concatenate([grads[name].reshape(len(grads[name]), -1) for name in group], axis=1)
    rows.append(method(flat, *args, **kwargs))
  return np.stack(rows)


def group_updates(
  grads: dict[str, np.ndarray], groups: list[list[str]], weights: np.ndarray
) -> dict[str, np.ndarray]:
  """Each leaf's update: its group's weighted sum of the task gradients."""
  updates = {}
  for group, group_weight in zip(groups, weights, strict=True):
    for name in group:
      updates[name] = np.einsum("t,t...->...", group_weight, np.asarray(grads[name], np.float64))
  return updates


SHAPES = {
  "dense_0/bias": (4,),
  "dense_0/kernel": (3, 4),
  "dense_1/bias": (2,),
  "dense_1/kernel": (4, 2),
  "scale": (3,),
}
GROUPS = {
  "model": [list(SHAPES)],
  "layer": [["dense_0/bias", "dense_0/kernel"], ["dense_1/bias", "dense_1/kernel"], ["scale"]],
}


def task_gradients(rng: np.random.Generator, num_tasks: int) -> dict[str, np.ndarray]:
  """Gradients with a shared direction that some tasks follow and others oppose.

  Norms differ from task to task (factors 0.2 to 2), as real task gradients do.
  """
  signs = rng.choice([-1.0, 1.0], size=num_tasks) * rng.uniform(0.2, 2.0, size=num_tasks)
  scales = rng.uniform(0.2, 2.0, size=num_tasks)
  grads = {}
  for name, shape in SHAPES.items():
    shared = rng.normal(size=shape)
    noise = rng.normal(size=(num_tasks, *shape))
    expand = (-1, *[1] * len(shape))
    grads[name] = signs.reshape(expand) * shared + scales.reshape(expand) * noise
  return grads


def nest(flat: dict) -> dict:
  """``{"a/b": x}`` to ``{"a": {"b": x}}``."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for parent in parents:
      node = node.setdefault(parent, {})
    node[leaf] = value
  return tree


def flatten(tree: dict) -> dict[str, np.ndarray]:
  """``{"a": {"b": x}}`` to ``{"a/b": x}``, leaves as numpy arrays."""
  return {
    jax.tree_util.keystr(path, simple=True, separator="/"): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def run(tx, grads: dict, dtype=jnp.float32, state=None):
  """One jitted step on a flat ``{"a/b": [T, ...]}`` dict; returns flat updates and state."""
  tree = nest({name: jnp.asarray(g, dtype) for name, g in grads.items()})
  params = jax.tree.map(lambda g: jnp.zeros(g.shape[1:], g.dtype), tree)
  state = tx.init(params) if state is None else state
  updates, state = jax.jit(tx.update)(tree, state, params)
  return flatten(updates), state


def assert_updates_close(updates: dict, expected: dict, rtol: float, atol: float) -> None:
  for name, value in expected.items():
    np.testing.assert_allclose(np.asarray(updates[name], np.float64), value, rtol, atol)
