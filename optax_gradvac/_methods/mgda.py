"""MGDA: the min-norm point of the convex hull of the task gradients."""

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree, _solvers


def mgda_weights(gram: jax.typing.ArrayLike) -> jax.Array:
  r"""MGDA's task weights for one parameter group, from its Gram matrix.

  .. math::
    w = \operatorname*{argmin}_{w \ge 0, \ \sum_t w_t = 1}
      \Big| \sum_t w_t g_t \Big|^2 = \operatorname*{argmin}_{w \in \Delta} w^\top G w

  The update :math:`\sum_t w_t g_t` is the min-norm point of the convex hull of
  the gradients: unless it is 0 (a Pareto-stationary point), it decreases every
  task's loss, :math:`\langle g_t, d \rangle \ge |d|^2` for every ``t``. A task
  whose gradient is zero in this group is left out of the hull (its weight is
  0); with none left the weights are all 0.

  The Gram matrix is normalised by its largest diagonal entry, then the
  problem is solved as a non-negative least-squares problem (see
  ``optax_gradvac._solvers.min_norm_weights``) to float32 rounding on
  well-conditioned problems: the update is within ~1e-6 of the exact one,
  relative to the largest gradient. Sener and Koltun use Frank-Wolfe
  (their Algorithm 2), which is slower to converge; the optimum is the same.
  Pure array code with capped loops: ``jit``- and ``vmap``-compatible.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[T]`` task weights on the simplex (0 for absent tasks).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two conflicting tasks
    >>> w = ogv.mgda_weights(g @ g.T)
    >>> print(np.asarray(w).round(4), np.asarray(w @ g).round(4))  # the min-norm point (0.2, 0.4)
    [0.6 0.4] [0.2 0.4]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, 2018

    Désidéri, `Multiple-gradient descent algorithm (MGDA) for multiobjective
    optimization <https://doi.org/10.1016/j.crma.2012.03.014>`_, 2012
  """
  return _solvers.min_norm_weights(_gram.normalise(jnp.asarray(gram)))


def mgda(
  num_tasks: int, *, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""MGDA: steps along the min-norm point of the convex hull of the task gradients.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns, for each parameter group, :math:`\sum_t w_t g_t` with the weights of
  :func:`mgda_weights`: the common descent direction of the multiple-gradient
  descent algorithm (Désidéri 2012), as Sener and Koltun apply it to the
  shared parameters' gradients. The update is scale-equivariant (gradients
  times ``c`` give the update times ``c``).

  Same input contract, checks, special inputs (an absent task is left out of
  its group's hull; a NaN or inf gives its group's plain sum and keeps the state) and
  ``granularity`` options as :func:`gradvac`; the state
  (:class:`GramState`) logs each group's cosines and task weights.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, as in the paper: one problem over all
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> tx = ogv.mgda(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting
    >>> updates, state = tx.update(task_grads, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(4), np.asarray(state.weights).round(4))
    [0.2 0.4] [[0.6 0.4]]

  References:
    Sener and Koltun, `Multi-Task Learning as Multi-Objective Optimization
    <https://arxiv.org/abs/1810.04650>`_, 2018
  """
  method = _pipeline.stateless("mgda", mgda_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
