"""DualProj: the mean of the task gradients, projected onto the dual cone of all."""

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree, _solvers


def dualproj_weights(gram: jax.typing.ArrayLike) -> jax.Array:
  r"""DualProj's task weights for one parameter group, from its Gram matrix.

  The mean gradient :math:`\bar g = \frac1T \sum_t g_t` is projected onto the
  dual cone of the gradients, :math:`\{x : \langle g_t, x \rangle \ge 0 \
  \forall t\}` (the directions that conflict with no task): the update is the
  direction closest to the mean that no task opposes. By Proposition 1 of
  Quinton and Rey the projection of :math:`J^\top u`, :math:`u = \frac1T
  \mathbf 1`, is :math:`J^\top v` with

  .. math::
    v = \operatorname*{argmin}_{v \ge u} v^\top G v,

  one quadratic program on the Gram matrix, solved by
  ``optax_gradvac._solvers.dual_cone_projection`` (the solver of
  :func:`upgrad_weights`) after normalising ``G`` by its largest diagonal entry.
  If the mean conflicts with no task it is its own projection (:math:`v = u`).
  This is the projection of Gradient Episodic Memory (Lopez-Paz and Ranzato,
  2017, Eq. 11) applied to the mean gradient, as torchjd's ``DualProj``; where
  :func:`upgrad_weights` projects each gradient and averages, DualProj
  averages, then projects once.

  A task whose gradient is zero in this group is left out (weight 0; the mean
  is over the ``T'`` present tasks); with none left the weights are all 0.

  Tolerance: on well-conditioned problems the projection is exact to float32
  rounding of the Gram matrix (~1e-6 relative to the largest gradient), as for
  :func:`upgrad_weights`. torchjd solves the same problem with quadprog after
  adding ``1e-4 I`` to the trace-normalised Gram matrix.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[T]`` task weights (0 for absent tasks), each at least ``1 / T'``.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[1.0, 1.0], [-3.0, 0.0]])  # the mean (-1, 0.5) opposes task 0
    >>> w = jax.jit(ogv.dualproj_weights)(g @ g.T)
    >>> print(np.asarray(w).round(4), np.asarray(w @ g).round(4))
    [0.75 0.5 ] [-0.75  0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024

    Lopez-Paz and Ranzato, `Gradient Episodic Memory for Continual Learning
    <https://arxiv.org/abs/1706.08840>`_, NeurIPS 2017
  """
  gram = _gram.normalise(jnp.asarray(gram))
  present = jnp.diagonal(gram) > 0
  count = jnp.maximum(jnp.sum(present), 1).astype(gram.dtype)
  mean = jnp.where(present, 1 / count, 0)
  return _solvers.dual_cone_projection(gram, mean)


def dualproj(
  num_tasks: int, *, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""DualProj: the mean task gradient projected onto the gradients' dual cone.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns, for each parameter group, the projection of the mean gradient onto
  :math:`\{x : \langle g_t, x \rangle \ge 0 \ \forall t\}` (weights from
  :func:`dualproj_weights`): the mean itself when it conflicts with no task,
  otherwise the closest direction that conflicts with none. The update is
  scale-equivariant (gradients times ``c`` give the update times ``c``).

  Same input contract, checks, special inputs (an absent task is left out of
  its group; a NaN or inf gives its group's plain sum and keeps the state) and
  ``granularity`` options as :func:`gradvac`; the state (:class:`GramState`)
  logs each group's cosines and task weights.

  Cost: one small quadratic program per group on ``[T, T]`` matrices; nothing
  on the gradients beyond the two passes.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, as torchjd: one Jacobian over all
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GramState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> tx = ogv.dualproj(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[1.0, 1.0], [-3.0, 0.0]])}
    >>> updates, _ = jax.jit(tx.update)(task_grads, tx.init(params), params)
    >>> print(np.asarray(updates["w"]).round(4))  # orthogonal to task 0's gradient
    [-0.75  0.75]

  References:
    Quinton and Rey, `Jacobian Descent for Multi-Objective Optimization
    <https://arxiv.org/abs/2406.16232>`_, 2024
  """
  method = _pipeline.stateless("dualproj", dualproj_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
