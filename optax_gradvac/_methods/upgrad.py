"""UPGrad: the mean of the task gradients, each projected onto the dual cone of all."""

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree, _solvers


def upgrad_weights(gram: jax.typing.ArrayLike) -> jax.Array:
  r"""UPGrad's task weights for one parameter group, from its Gram matrix.

  Each task gradient :math:`g_i` is projected onto the dual cone of the
  gradients, :math:`\{x : \langle g_t, x \rangle \ge 0 \ \forall t\}` (the
  directions that conflict with no task); the update is the mean of the
  projections. By Proposition 1 of the paper the projection of
  :math:`J^\top e_i` is :math:`J^\top v_i` with

  .. math::
    v_i = \operatorname*{argmin}_{v \ge e_i} v^\top G v, \qquad
    w = \frac{1}{T} \sum_i v_i,

  ``T`` small quadratic programs on the Gram matrix, solved together by
  ``optax_gradvac._solvers.dual_cone_projection`` (``nonnegative_qp`` on
  ``v_i - e_i >= 0``) after normalising ``G`` by its largest diagonal entry. A
  gradient that conflicts with none is its own projection (``v_i = e_i``); so
  with no conflict at all the update is the mean gradient. Every weight is at
  least ``1 / T``.

  A task whose gradient is zero in this group is left out (weight 0; the mean
  is over the ``T'`` present tasks); with none left the weights are all 0.

  Tolerance: on well-conditioned problems the projections are exact to float32
  rounding of the Gram matrix (~1e-6 relative to the largest gradient); see
  ``nonnegative_qp`` for degenerate ones. torchjd solves the same problems
  with quadprog after adding ``1e-4 I`` to the trace-normalised Gram matrix,
  which moves its result by about that much.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[T]`` task weights (0 for absent tasks).

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[1.0, 0.0], [-1.0, 1.0]])  # two conflicting tasks
    >>> w = ogv.upgrad_weights(g @ g.T)
    >>> print(np.asarray(w).round(4), np.asarray(w @ g).round(4))
    [1.   0.75] [0.25 0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  gram = _gram.normalise(jnp.asarray(gram))
  num_tasks = gram.shape[-1]
  present = jnp.diagonal(gram) > 0
  # Row i: v_i, the weights of the projection of g_i.
  projections = _solvers.dual_cone_projection(gram, jnp.eye(num_tasks, dtype=gram.dtype))
  total = jnp.sum(jnp.where(present[:, None], projections, 0), axis=0)
  count = jnp.sum(present)
  return total / jnp.maximum(count, 1).astype(gram.dtype)


def upgrad(
  num_tasks: int, *, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""UPGrad: the mean of the task gradients projected onto their dual cone.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns, for each parameter group, :math:`\frac1T \sum_i \pi(g_i)`, where
  :math:`\pi` projects onto :math:`\{x : \langle g_t, x \rangle \ge 0 \
  \forall t\}` (weights from :func:`upgrad_weights`). The update conflicts with
  no task (:math:`\langle g_t, d \rangle \ge 0`), equals the mean gradient when
  no two tasks conflict, and is scale-equivariant (gradients times ``c`` give
  the update times ``c``). This is the aggregator of Jacobian descent (the
  paper's ``A_UPGrad``) with its default, uniform preference vector.

  Same input contract, checks, special inputs (an absent task is left out of
  its group; a NaN or inf gives its group's plain sum and keeps the state) and
  ``granularity`` options as :func:`gradvac`; the state
  (:class:`GramState`) logs each group's cosines and task weights.

  Cost: ``T`` small quadratic programs per group, solved together on
  ``[T, T]`` matrices (about ``T^3`` operations per solver iteration and
  group); nothing on the gradients beyond the two passes.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, as in the paper: one Jacobian over all
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object.

  Example:
    >>> import jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> tx = ogv.upgrad(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 0.0], [-1.0, 1.0]])}  # conflicting
    >>> updates, _ = tx.update(task_grads, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(4))
    [0.25 0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  method = _pipeline.stateless("upgrad", upgrad_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
