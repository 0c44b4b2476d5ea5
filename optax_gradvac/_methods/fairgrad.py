r"""FairGrad: alpha-fair task weights, by Newton's method on a convex program.

The weights :math:`w > 0` of FairGrad solve :math:`G w = w^{-1/\alpha}`: the
optimality condition of the strictly convex

.. math::
  \min_{w > 0} \; \tfrac12 w^\top G w - \sum_t h(w_t), \qquad
  h(w) = \frac{w^{p} - 1}{p}, \quad p = 1 - \frac1\alpha

(:math:`h' (w) = w^{-1/\alpha}`; :math:`h = \log` at :math:`\alpha = 1`, where
FairGrad is Nash-MTL), to which a penalty :math:`P` with :math:`w P'(w) = w^{p}
(\beta / M)^8 / \alpha`, :math:`\beta_t = \sigma_t w_t^{1/\alpha}`, is added
(:math:`\sigma_t = |g_t|`; see :func:`fairgrad_weights`). Newton's method on it
in the variables :math:`w_t (1 + x_t)` has gradient :math:`r = w \odot G w -
w^{p} + w^{p} (\beta / M)^8 / \alpha` and Hessian :math:`W G W +
\operatorname{diag}(w^{p} (1 + 7 (\beta / M)^8 / \alpha) / \alpha)` (:math:`W =
\operatorname{diag}(w)`; the terms that vanish at the solution left out):
positive definite wherever :math:`w > 0`.
The step is taken multiplicatively, :math:`w \odot \exp(l x)` (Newton's step to
second order; the weights stay positive and can move by orders of magnitude at
once, as they must when they lie far apart, at large or small :math:`\alpha`).
Each iteration tries the lengths :math:`l` = 1, 1/2, ..., 1/128, :math:`1 / (1 +
\lambda)` (:math:`\lambda` the Newton decrement) and 2, 4, ..., 128 together
and keeps the best, or the full step once :math:`\lambda < 1/2`, where it
converges quadratically: :func:`nash_mtl_weights`'s method, generalised to every
:math:`\alpha`.
"""

import numbers

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _gram, _pipeline, _pytree

_HIGHEST = jax.lax.Precision.HIGHEST
_POWER = 8  # of the penalty on beta / max_weight
_TOLERANCE = 100  # rounding units of the gradient's terms at which Newton's method stops


def _matvec(matrix: jax.Array, vector: jax.Array) -> jax.Array:
  return jnp.matmul(matrix, vector, precision=_HIGHEST)


def _utility(weights: jax.Array, power: jax.Array) -> jax.Array:
  """``sum_t h(w_t)``, ``h(w) = (w^p - 1) / p`` (``log w`` at ``p = 0``), accurate near 0."""
  logs = jnp.log(weights)
  small = jnp.abs(power) < 1e-6
  terms = jnp.where(small, logs, jnp.expm1(power * logs) / jnp.where(small, 1, power))
  return jnp.sum(terms)


def _penalty(
  weights: jax.Array, power: jax.Array, norms: jax.Array, alpha: jax.Array, max_weight: jax.Array
) -> jax.Array:
  """``w P'(w)`` per task: ``w^p (beta / M)^8 / alpha``, ``beta = sigma w^(1/alpha)``.

  In logarithms: the factors overflow where their product does not.
  """
  logs = jnp.log(weights)
  exponent = power * logs + _POWER * (jnp.log(norms / max_weight) + logs / alpha)
  return jnp.exp(exponent) / alpha


def _objective(
  gram: jax.Array,
  weights: jax.Array,
  alpha: jax.Array,
  norms: jax.Array,
  max_weight: jax.Array,
) -> jax.Array:
  power = 1 - 1 / alpha
  # P(w) = (w P'(w)) alpha / (7 + alpha): P' is a power of w.
  penalty = _penalty(weights, power, norms, alpha, max_weight) * alpha
  penalty = jnp.sum(penalty) / (_POWER - 1 + alpha)
  return weights @ _matvec(gram, weights) / 2 - _utility(weights, power) + penalty


def fairgrad_weights(
  gram: jax.typing.ArrayLike,
  alpha: jax.typing.ArrayLike = 2.0,
  *,
  max_weight: jax.typing.ArrayLike = 100.0,
  max_iterations: jax.typing.ArrayLike = 50,
) -> jax.Array:
  r"""FairGrad's task weights for one parameter group: :math:`G w = w^{-1/\alpha}`.

  The update :math:`d = \sum_t w_t g_t` maximises the tasks' alpha-fair
  utility :math:`\sum_t \frac{\langle g_t, d\rangle^{1 - \alpha}}{1 - \alpha}`
  over a ball (Ban and Ji, Eq. 4): its optimality condition gives every task
  the directional derivative :math:`\langle g_t, d \rangle = w_t^{-1/\alpha}`,
  so a task with a small improvement gets a large weight. :math:`\alpha = 1`
  is proportional fairness (Nash-MTL, :func:`nash_mtl_weights`); as
  :math:`\alpha \to 0` the update tends to the one that maximises the total
  improvement without making any task worse (the sum of the gradients, when it
  makes none worse); as :math:`\alpha \to \infty`, max-min fairness (the worst
  task's improvement).

  Solver: the weights minimise a strictly convex function (see the module
  docstring), by damped Newton on the Gram matrix divided by its largest
  diagonal entry :math:`\lambda` (the weights of :math:`G` are those of
  :math:`G / \lambda` times :math:`\lambda^{-\alpha / (\alpha + 1)}`), in a
  ``lax.while_loop`` that stops once the terms of every equation
  :math:`w_t (G w)_t = w_t^{1 - 1/\alpha}` (the penalty's included) cancel to
  within 100 rounding units of their magnitudes
  (:math:`|r_t| \le 100 \epsilon (w_t (|G| w)_t + w_t^{1 - 1/\alpha} + \ldots)`), or
  after ``max_iterations`` steps. Where every improvement is well above
  rounding this is a relative residual :math:`|w_t^{1/\alpha} (G w)_t - 1|`
  of about :math:`200 \epsilon`; where the solution makes a task's improvement
  :math:`w_t^{-1/\alpha}` smaller than the rounding of :math:`(G w)_t` (small
  :math:`\alpha` with tasks that conflict, or large :math:`\alpha`, where
  weights lie orders of magnitude apart), no floating-point solution does
  better. It starts from the solution for orthogonal gradients,
  :math:`w_t = G_{tt}^{-\alpha / (\alpha + 1)}`, times its best multiple.
  On gradients whose norms lie up to 1e4 apart it took 2 to 10 steps for
  :math:`\alpha` from 0.5 to 50 and up to 19 at 0.1 (float32 and float64);
  with two opposite tasks, up to 23, and the cap at :math:`\alpha \ge 10` in
  float64, where the last steps hover at a relative 1e-9. Once converged, two
  more full Newton steps take the weights to the rounding floor of the
  gradient: in float32 the update then differs from a float64 solve on the
  same float32 Gram matrix by a few rounding units (about 1e-7, relative).
  The official code and torchjd run scipy's ``least_squares`` on :math:`G w -
  w^{-1/\alpha}` from :math:`1 / T` in float64, with its default tolerances.

  The solution exists only if some direction improves every task; as two
  tasks near opposite, weights grow without bound. A penalty keeps them
  finite: it changes task ``t``'s equation to :math:`\langle g_t, d \rangle =
  w_t^{-1/\alpha} (1 - (\beta_t / M)^8 / \alpha)` with :math:`\beta_t =
  \sigma_t w_t^{1/\alpha}`, :math:`\sigma_t = |g_t| / \sqrt\lambda` and
  :math:`M` = ``max_weight``: :math:`\beta_t` is about :math:`\sigma_t /
  \langle g_t, d \rangle`, so it acts only on a task whose improvement falls
  below about :math:`1 / M` of its (normalised) gradient norm, by a relative
  :math:`(\beta_t / M)^8 / \alpha` (1e-8 at :math:`\beta_t = M / 10`). At
  :math:`\alpha = 1` it is :func:`nash_mtl_weights`'s penalty. Two opposite
  tasks then cancel to about :math:`1 / M` of their size. A zero gradient is
  left out (weight 0).

  Pure array code: jit- and vmap-compatible.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.
    alpha: the fairness parameter :math:`\alpha > 0`; 2, the official code's
      value in all its experiments, by default.
    max_weight: :math:`M`: the penalty acts on tasks whose improvement falls
      below about :math:`1 / M` of their normalised gradient norm.
    max_iterations: cap on the Newton steps.

  Returns:
    ``[T]`` positive task weights (0 for absent tasks). Scaling every gradient
    by ``c`` multiplies them by :math:`c^{-2\alpha / (\alpha + 1)}` and the
    update by :math:`c^{(1 - \alpha) / (1 + \alpha)}`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # orthogonal: w_t = |g_t|^(-2 alpha / (alpha + 1))
    >>> weights = jax.jit(ogv.fairgrad_weights)(g @ g.T, alpha=3.0)
    >>> print(weights.round(4), (weights @ g).round(4))
    [0.3536 1.    ] [0.7071 1.    ]

  References:
    Ban and Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024
  """
  gram = jnp.asarray(gram)
  num_tasks, dtype = gram.shape[-1], gram.dtype
  alpha = jnp.asarray(alpha, dtype)
  max_weight = jnp.asarray(max_weight, dtype)
  largest = jnp.max(jnp.diagonal(gram))
  normalised = _gram.normalise(gram)
  norms = jnp.sqrt(jnp.diagonal(normalised))
  present = norms > 0
  # An absent task gets an identity row and column: w_t = 1, decoupled.
  identity = jnp.eye(num_tasks, dtype=dtype)
  both = present[:, None] & present[None, :]
  normalised = jnp.where(both, normalised, identity)
  norms = jnp.where(present, norms, 1)
  power = 1 - 1 / alpha
  # The start: the solution for orthogonal gradients, G_tt w_t = w_t^(-1/alpha),
  # times its best multiple c without the penalty: c^(1 + 1/alpha) w^T G w = sum(w^p).
  diagonal = norms ** (-2 * alpha / (alpha + 1))
  quadratic = diagonal @ _matvec(normalised, diagonal)
  ratio = jnp.sum(diagonal**power) / jnp.maximum(quadratic, jnp.finfo(dtype).tiny)
  weights = diagonal * ratio ** (alpha / (alpha + 1))

  def gradient(weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The gradient in the variables w_t (1 + x_t) at x = 0, and its size in rounding units."""
    own = weights**power  # w h'(w)
    penalty = _penalty(weights, power, norms, alpha, max_weight)
    value = weights * _matvec(normalised, weights) - own + penalty
    magnitude = weights * _matvec(jnp.abs(normalised), weights) + own + penalty
    # A weight that underflowed to 0 (its task's improvement far above the
    # others', at large alpha) has converged: its terms are all 0.
    scale = jnp.where(magnitude > 0, magnitude * jnp.finfo(dtype).eps, 1)
    return value, jnp.where(magnitude > 0, value / scale, 0)

  def unconverged(carry: tuple) -> jax.Array:
    iteration, _, _, error = carry
    return (iteration < max_iterations) & (jnp.max(jnp.abs(error)) > _TOLERANCE)

  def newton_step(carry: tuple) -> tuple:
    iteration, weights, residual, _ = carry
    # w^2 P''(w) = (7 / alpha) w P'(w); the terms of W (Hessian in w) W.
    penalty = _penalty(weights, power, norms, alpha, max_weight)
    curvature = (weights**power + (_POWER - 1) * penalty) / alpha
    hessian = normalised * weights[:, None] * weights[None, :] + jnp.diag(curvature)
    step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), residual)
    step = jnp.where(jnp.all(jnp.isfinite(step)), step, -residual / jnp.diagonal(hessian))
    decrement = jnp.sqrt(jnp.maximum(-(residual @ step), 0))
    # The step is taken multiplicatively, w exp(l x): the weights stay positive
    # and can move by orders of magnitude in one step (weights far apart, at
    # large or small alpha), and to second order it is Newton's w (1 + x).
    # Lengths 1, 1/2, ..., 1/128, the damped 1 / (1 + decrement) and 2, 4, ...,
    # 128 are tried together: the best is taken, or the full step near the
    # solution, where it converges quadratically.
    lengths = jnp.concatenate(
      [
        0.5 ** jnp.arange(8, dtype=dtype),
        1 / (1 + decrement[None]),
        2 ** jnp.arange(1, 8, dtype=dtype),
      ]
    )
    trials = weights * jnp.exp(lengths[:, None] * step)
    usable = jnp.all(jnp.isfinite(trials) & (trials > 0), axis=1)
    objective = jax.vmap(_objective, (None, 0, None, None, None))
    values = objective(normalised, jnp.where(usable[:, None], trials, 1), alpha, norms, max_weight)
    values = jnp.where(usable & jnp.isfinite(values), values, jnp.inf)
    best = jnp.where((decrement < 0.5) & jnp.isfinite(values[0]), 0, jnp.argmin(values))
    weights = jnp.where(jnp.isfinite(values[best]), trials[best], weights)
    return iteration + 1, weights, *gradient(weights)

  init = (jnp.zeros([], jnp.int32), weights, *gradient(weights))
  _, weights, _, error = jax.lax.while_loop(unconverged, newton_step, init)

  def refine(weights: jax.Array, _) -> tuple[jax.Array, None]:
    """A full Newton step."""
    own = weights**power
    penalty = _penalty(weights, power, norms, alpha, max_weight)
    residual = gradient(weights)[0]
    curvature = (own + (_POWER - 1) * penalty) / alpha
    hessian = normalised * weights[:, None] * weights[None, :] + jnp.diag(curvature)
    step = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), residual)
    refined = weights * jnp.exp(step)
    return jnp.where(jnp.all(jnp.isfinite(refined)), refined, weights), None

  # The stopping test leaves up to 100 rounding units; from there two full
  # Newton steps (quadratic convergence) reach the rounding floor of the
  # gradient itself. Only from a converged point.
  refined, _ = jax.lax.scan(refine, weights, None, length=2)
  weights = jnp.where(jnp.max(jnp.abs(error)) <= _TOLERANCE, refined, weights)

  # The weights of G itself: those of G / largest times largest^(-alpha / (alpha + 1)).
  rescale = jnp.where(largest > 0, largest, 1) ** (-alpha / (alpha + 1))
  return jnp.where(present, weights * rescale, 0)


def fairgrad(
  num_tasks: int,
  alpha: jax.typing.ArrayLike = 2.0,
  *,
  granularity: _pytree.Granularity = "model",
  max_weight: jax.typing.ArrayLike = 100.0,
  max_iterations: jax.typing.ArrayLike = 50,
) -> optax.GradientTransformationExtraArgs:
  r"""FairGrad: the update that maximises the tasks' alpha-fair utility.

  ``update`` takes per-task gradients stacked on a leading task axis (every
  leaf ``[num_tasks, *param.shape]``) and returns one update shaped like the
  parameters: for each parameter group, :math:`\sum_t w_t g_t` with
  :math:`w > 0` solving :math:`G w = w^{-1/\alpha}` (:func:`fairgrad_weights`).
  Each task's improvement is :math:`\langle g_t, d \rangle = w_t^{-1/\alpha}`:
  ``alpha`` trades the total improvement (small ``alpha``: near the sum of the
  gradients) for that of the worst-off task (large ``alpha``); ``alpha = 1``
  is :func:`nash_mtl`.

  The update's size depends on the gradients' in a way of its own: scaling
  every gradient by ``c`` scales it by :math:`c^{(1 - \alpha) / (1 + \alpha)}`
  (``c^(-1/3)`` at ``alpha = 2``). The official code also multiplies the
  update by ``T`` and clips its norm to 1 (``max_norm``); chain
  ``optax.scale(num_tasks)`` and ``optax.clip_by_global_norm(1.0)`` after it
  for that.

  Cost: two passes over the gradients (the Gram matrices, one weighted sum) and
  a few ``[T, T]`` Cholesky solves per group, one per Newton step (at most
  ``max_iterations``). Special inputs as :func:`gradvac`: a zero gradient is
  left out of its group; a NaN or inf gives its group's plain sum and leaves
  the state unchanged. No state beyond what it logs (:class:`GramState`).

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    alpha: the fairness parameter :math:`\alpha > 0` (default 2, the official
      code's value in all its experiments).
    granularity: ``"model"`` (default, the paper's: one problem over all shared
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.
    max_weight: the penalty's :math:`M` (see :func:`fairgrad_weights`): keeps
      the solution finite when tasks conflict completely, and changes no other
      solution measurably.
    max_iterations: cap on the Newton steps per solve.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GramState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.fairgrad(num_tasks=2, alpha=3.0)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = jax.jit(tx.update)(task_grads, tx.init(params), params)
    >>> print(updates["w"].round(4), state.weights.round(4))
    [0.7071 1.    ] [[0.3536 1.    ]]

  References:
    Ban and Ji, `Fair Resource Allocation in Multi-Task Learning
    <https://arxiv.org/abs/2402.15638>`_, ICML 2024
  """
  _checks.check_positive("fairgrad", "alpha", alpha)
  _checks.check_positive("fairgrad", "max_weight", max_weight)
  if isinstance(max_iterations, numbers.Real) and not max_iterations >= 1:
    raise ValueError(f"fairgrad: max_iterations must be at least 1, got {max_iterations}.")

  def weigh(
    gram: jax.Array, state: _pipeline.GramState, *, scale: jax.Array
  ) -> tuple[jax.Array, _pipeline.GramState]:
    def solve(gram: jax.Array) -> jax.Array:
      return fairgrad_weights(gram, alpha, max_weight=max_weight, max_iterations=max_iterations)

    weights = jax.vmap(solve)(gram)
    # The Gram matrices are those of the gradients divided by `scale`: the
    # weights of the gradients themselves are scale^(-2 alpha / (alpha + 1)) times theirs.
    exponent = -2 * jnp.asarray(alpha, weights.dtype) / (alpha + 1)
    return weights * scale[:, None] ** exponent, state

  method = _pipeline.Method("fairgrad", _pipeline.gram_state, weigh, inputs=("scale",))
  return _pipeline.gram_transformation(method, num_tasks, granularity)
