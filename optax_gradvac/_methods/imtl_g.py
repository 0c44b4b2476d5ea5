"""IMTL-G: the update whose projections on every task's unit gradient are equal."""

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree


def imtl_g_weights(gram: jax.typing.ArrayLike) -> jax.Array:
  r"""IMTL-G's task weights for one parameter group, from its Gram matrix.

  The update :math:`d = \sum_t \alpha_t g_t` has the same projection on every
  task's unit gradient :math:`u_t = g_t / |g_t|`, and the weights sum to 1:

  .. math::
    \langle d, u_1 \rangle = \dots = \langle d, u_T \rangle, \qquad \sum_t \alpha_t = 1.

  The paper solves this as :math:`\alpha_{2:T} = g_1 U^\top (D U^\top)^{-1}` with
  :math:`D = g_1 - g_{2:T}`, :math:`U = u_1 - u_{2:T}`. Here, equivalently, with
  :math:`C` the cosine matrix of the gradients and :math:`|g|` their norms:

  .. math::
    \beta = C^{+} \mathbf{1}, \qquad \alpha_t = \frac{\beta_t / |g_t|}{\sum_s \beta_s / |g_s|},

  (:math:`\sum_t \beta_t u_t` is the vector of the gradients' span whose
  projection on every :math:`u_t` is 1), which equals the paper's closed form
  whenever its :math:`(T - 1) \times (T - 1)` matrix is invertible.

  Special cases: a zero gradient is left out (weight 0). With linearly
  dependent gradients :math:`C^{+}` is the pseudo-inverse (eigenvalues of
  :math:`C` below ``T * eps * largest`` dropped; ``eps`` of the dtype): two
  identical tasks share one weight equally, and where no nonzero vector of the
  span has equal projections on all unit gradients (two opposite tasks; more
  tasks than parameters in a group), :math:`\beta` is the least-squares
  solution. The weights are all 0 (a zero update) when that solution has no
  projection left (:math:`|C \beta|^2 \le T^2 \epsilon`: opposite tasks), or
  when :math:`|\sum_s \beta_s / |g_s|| \le T \epsilon \sum_s |\beta_s| / |g_s|`
  (0 to rounding): equal projections with weights summing to 1 do not exist then.
  As in the paper, that sum can be negative (one task with a much smaller
  gradient than the others, three tasks or more): the update then has equal
  *negative* projections on every task gradient.

  Pure array code: jit- and vmap-compatible; no iteration.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[T]`` task weights summing to 1 (or all 0, see above); the group's update
    is ``weights @ g``. They do not change when all gradients are scaled by the
    same factor.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # orthogonal, unequal norms
    >>> weights = ogv.imtl_g_weights(g @ g.T)
    >>> print(weights.round(4), (weights @ g).round(4))  # equal projections: 2/3 each
    [0.3333 0.6667] [0.6667 0.6667]

  References:
    Liu et al, `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  gram = _gram.normalise(jnp.asarray(gram))
  num_tasks = gram.shape[-1]
  norms = jnp.sqrt(jnp.diagonal(gram))
  present = norms > 0
  cosine = _gram.pairwise_cosine(gram)
  unit_weights = _gram.pseudo_inverse(cosine) @ present.astype(gram.dtype)
  projections = jnp.matmul(cosine, unit_weights, precision=jax.lax.Precision.HIGHEST)
  weights = jnp.where(present, unit_weights / jnp.where(present, norms, 1), 0)
  total = jnp.sum(weights)
  tolerance = num_tasks * jnp.finfo(gram.dtype).eps
  exists = (jnp.sum(projections**2) > num_tasks * tolerance) & (
    jnp.abs(total) > tolerance * jnp.sum(jnp.abs(weights))
  )
  return jnp.where(exists, weights / jnp.where(exists, total, 1), 0)


def imtl_g(
  num_tasks: int, *, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""IMTL-G: the update with equal projections on every task's unit gradient.

  ``update`` takes per-task gradients stacked on a leading task axis (every
  leaf ``[num_tasks, *param.shape]``) and returns one update shaped like the
  parameters: for each parameter group, :math:`\sum_t \alpha_t g_t` with the
  weights of :func:`imtl_g_weights` (summing to 1, so that no task's gradient
  norm dominates the direction). No state beyond what it logs
  (:class:`GramState`: the weights and cosines of the last step).

  Cost: two passes over the gradients (the Gram matrices, one weighted sum) and
  one ``[T, T]`` eigen-decomposition per group. Special inputs as
  :func:`gradvac`: a zero gradient is left out of its group; a NaN or inf
  gives its group's plain sum and leaves the state unchanged. Scaling every gradient by
  ``c`` scales the update by ``c``.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, the paper's: one problem over all shared
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GramState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.imtl_g(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(task_grads, tx.init(params), params)
    >>> print(updates["w"].round(4), state.weights.round(4))
    [0.6667 0.6667] [[0.3333 0.6667]]

  References:
    Liu et al, `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  method = _pipeline.stateless("imtl_g", imtl_g_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
