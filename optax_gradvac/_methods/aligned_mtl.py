"""Aligned-MTL: task gradients made orthogonal with equal norms, then summed."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gradvac import _gram, _pipeline, _pytree


def aligned_mtl_weights(
  gram: jax.typing.ArrayLike, task_weights: jax.typing.ArrayLike | None = None
) -> jax.Array:
  r"""Aligned-MTL's task weights for one parameter group, from its Gram matrix.

  Algorithm 1 of the paper: with the eigen-decomposition of the Gram matrix
  :math:`G = V \operatorname{diag}(\lambda) V^\top` and :math:`\lambda_R` its
  smallest nonzero eigenvalue, the balance transformation

  .. math::
    B = \sqrt{\lambda_R} \; V \operatorname{diag}(\lambda)^{-1/2} V^\top

  turns the task gradients into aligned ones, :math:`\hat g_i = \sum_t B_{ti} g_t`,
  that are orthogonal with equal norms :math:`\sqrt{\lambda_R}` (their Gram
  matrix :math:`B G B = \lambda_R I` has condition number 1). The update is
  :math:`\sum_i w_i \hat g_i = \sum_t (B w)_t \, g_t`, so the weights are
  :math:`B w`.

  Rank-deficient Gram matrices (linearly dependent gradients, more tasks than
  parameters): eigenvalues at most ``T * eps * largest`` (``eps`` of the dtype:
  1.2e-7 in float32) count as 0, as in the official code; :math:`V` keeps only
  the other eigenvectors and :math:`\lambda_R` is the smallest of those. So a
  group of rank 1 (identical or opposite tasks) keeps its gradients as they
  are: the update is their ``task_weights``-weighted sum. A task whose gradient
  is zero is left out (weight 0).

  Pure array code: jit- and vmap-compatible; one ``[T, T]`` ``eigh``.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.
    task_weights: ``[T]`` task importances :math:`w`; ``None`` gives ones (the
      sum of the aligned gradients, as the official code does).

  Returns:
    ``[T]`` weights of the original gradients; the group's update is
    ``weights @ g``. They do not change when all gradients are scaled by the
    same factor.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[4.0, 0.0], [0.0, 1.0]])  # orthogonal, one dominating
    >>> weights = ogv.aligned_mtl_weights(g @ g.T)
    >>> print(weights, weights @ g)  # both rescaled to the smaller norm
    [0.25 1.  ] [1. 1.]

  References:
    Senushkin et al, `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023
  """
  gram = _gram.normalise(jnp.asarray(gram))
  present = jnp.diagonal(gram) > 0
  if task_weights is None:
    task_weights = jnp.ones(gram.shape[-1], gram.dtype)
  task_weights = jnp.where(present, jnp.asarray(task_weights, gram.dtype), 0)
  values, vectors = _gram.spectrum(gram)
  kept = values > 0
  smallest = jnp.min(jnp.where(kept, values, jnp.inf))
  scales = jnp.where(kept, jnp.sqrt(smallest / jnp.where(kept, values, 1)), 0)
  balance = jnp.matmul(vectors * scales, vectors.T, precision=jax.lax.Precision.HIGHEST)
  weights = jnp.matmul(balance, task_weights, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(present, weights, 0)


def aligned_mtl(
  num_tasks: int,
  task_weights: jax.typing.ArrayLike | None = None,
  *,
  granularity: _pytree.Granularity = "model",
) -> optax.GradientTransformationExtraArgs:
  r"""Aligned-MTL: aligns the task gradients to condition number 1, then sums them.

  ``update`` takes per-task gradients stacked on a leading task axis (every
  leaf ``[num_tasks, *param.shape]``) and returns one update shaped like the
  parameters. For each parameter group, the task gradients are replaced by
  orthogonal ones of equal norm (the square root of the Gram matrix's smallest
  eigenvalue) that span the same space, and the update is their sum weighted by
  ``task_weights``; see :func:`aligned_mtl_weights`. No dominating and no
  conflicting gradients remain; the update's size follows the smallest
  singular value of the gradients, so it shrinks when tasks nearly cancel. No
  state beyond what it logs (:class:`GramState`).

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
    task_weights: ``[T]`` task importances (the paper's :math:`w`, the
      trade-off the method converges to); ``None`` sums the aligned gradients
      (the official code); ``1 / T`` each averages them (torchjd's default).
    granularity: ``"model"`` (default, the paper's: one problem over all shared
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GramState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.aligned_mtl(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[4.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = tx.update(task_grads, tx.init(params), params)
    >>> print(updates["w"], state.weights)
    [1. 1.] [[0.25 1.  ]]

  References:
    Senushkin et al, `Independent Component Alignment for Multi-Task Learning
    <https://arxiv.org/abs/2305.19000>`_, CVPR 2023
  """
  if task_weights is not None and np.shape(task_weights) != (num_tasks,):
    raise ValueError(
      f"aligned_mtl: task_weights must have shape ({num_tasks},), got {np.shape(task_weights)}."
    )

  def group_weights(gram: jax.Array) -> jax.Array:
    return aligned_mtl_weights(gram, task_weights)

  method = _pipeline.stateless("aligned_mtl", group_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
