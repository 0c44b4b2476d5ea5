"""ConFIG: the direction with equal cosines to every task gradient, and its length."""

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _gram, _pipeline, _pytree

_HIGHEST = jax.lax.Precision.HIGHEST


def config_weights(gram: jax.typing.ArrayLike) -> jax.Array:
  r"""ConFIG's task weights for one parameter group, from its Gram matrix.

  With :math:`U` the matrix of the unit gradients :math:`u_t = g_t / |g_t|`
  (one per row), the paper's update (Eq. 2, with its default equal weights and
  projection length) is

  .. math::
    \hat d = \frac{U^{+} \mathbf 1}{|U^{+} \mathbf 1|}, \qquad
    d = \Big( \sum_t \langle g_t, \hat d \rangle \Big) \hat d,

  a direction with the same cosine to every task gradient (its projections on
  all :math:`u_t` are equal), scaled to the sum of the gradients' projections
  on it. Here :math:`U^{+} = U^\top (U U^\top)^{+}` and :math:`U U^\top = C`,
  the cosine matrix of the gradients, so :math:`U^{+} \mathbf 1 = \sum_t
  \beta_t u_t` with :math:`\beta = C^{+} \mathbf 1`: the weights of the
  gradients are

  .. math::
    w^{(0)}_t = \beta_t / |g_t|, \qquad
    w = \frac{\mathbf 1^\top G w^{(0)}}{w^{(0)\top} G w^{(0)}} \, w^{(0)}.

  :math:`C^{+}` is the pseudo-inverse on the eigenvalues of :math:`C` above
  ``T * eps * largest`` (``eps`` of the dtype); the paper's :math:`U^{+}`
  (``torch.linalg.pinv``, or least squares in the official code) drops singular
  values of :math:`U` below ``max(T, P) * eps * largest``: the two agree
  unless the gradients are linearly dependent to within about
  :math:`\sqrt{\epsilon}`. Before the length, the direction is that of
  :func:`imtl_g_weights`; IMTL-G then scales it so that the weights sum to 1.

  A task whose gradient is zero in this group is left out (weight 0; its row
  of :math:`U` is 0, as in the official code). The weights are all 0 (a zero
  update) when :math:`U^{+} \mathbf 1` vanishes: when no direction of the
  gradients' span has a positive projection on all of them equal (two
  opposite tasks), that is, when the projection of :math:`\mathbf 1` onto the
  range of :math:`C` has squared norm at most ``T * (T * eps)``.

  Pure array code: jit- and vmap-compatible; one ``[T, T]`` ``eigh``.

  Args:
    gram: ``[T, T]`` Gram matrix of the task gradients, ``gram[i, j] = <g_i, g_j>``.

  Returns:
    ``[T]`` task weights; the group's update is ``weights @ g``. They do not
    change when all gradients are scaled by the same factor.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> g = jnp.array([[2.0, 0.0], [0.0, 1.0]])  # orthogonal: the diagonal direction
    >>> weights = jax.jit(ogv.config_weights)(g @ g.T)
    >>> print(weights.round(4), (weights @ g).round(4))  # length 2 / sqrt(2) + 1 / sqrt(2)
    [0.75 1.5 ] [1.5 1.5]

  References:
    Liu et al, `ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
  """
  gram = _gram.normalise(jnp.asarray(gram))
  num_tasks = gram.shape[-1]
  norms = jnp.sqrt(jnp.diagonal(gram))
  present = norms > 0
  cosine = _gram.pairwise_cosine(gram)
  unit_weights = jnp.matmul(
    _gram.pseudo_inverse(cosine), present.astype(gram.dtype), precision=_HIGHEST
  )
  # U U^+ 1: the projection of 1 onto the range of C; 0 when no direction exists.
  projections = jnp.matmul(cosine, unit_weights, precision=_HIGHEST)
  direction = jnp.where(present, unit_weights / jnp.where(present, norms, 1), 0)
  along = jnp.matmul(gram, direction, precision=_HIGHEST)  # <g_t, d> for d = g^T direction
  sq_norm = direction @ along
  exists = (jnp.sum(projections**2) > num_tasks**2 * jnp.finfo(gram.dtype).eps) & (sq_norm > 0)
  length_ratio = jnp.sum(along) / jnp.where(exists, sq_norm, 1)
  return jnp.where(exists, length_ratio * direction, 0)


def config(
  num_tasks: int, *, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""ConFIG: the update with equal cosines to every task gradient.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns, for each parameter group, the direction of the gradients' span
  whose projections on all unit task gradients are equal, scaled to the sum
  of the gradients' projections on it (weights from :func:`config_weights`).
  When the gradients are linearly independent, every task improves, all at
  the same cosine (the paper's conflict-free update); the length follows the
  gradients' sizes.
  The update is scale-equivariant (gradients times ``c`` give the update
  times ``c``).

  Same input contract, checks, special inputs (an absent task is left out of
  its group; a NaN or inf gives its group's plain sum and keeps the state) and
  ``granularity`` options as :func:`gradvac`; the state (:class:`GramState`)
  logs each group's cosines and task weights.

  Cost: two passes over the gradients (the Gram matrices, one weighted sum) and
  one ``[T, T]`` eigen-decomposition per group. The paper's momentum variant
  (M-ConFIG, which computes one task's gradient per step) is not offered.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    granularity: ``"model"`` (default, the paper's: one direction over all
      parameters), ``"layer"``, ``"tensor"`` or a callable; see :func:`gradvac`.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GramState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.config(num_tasks=2)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[2.0, 0.0], [0.0, 1.0]])}
    >>> updates, state = jax.jit(tx.update)(task_grads, tx.init(params), params)
    >>> print(updates["w"].round(4), state.weights.round(4))
    [1.5 1.5] [[0.75 1.5 ]]

  References:
    Liu et al, `ConFIG: Towards Conflict-free Training of Physics Informed
    Neural Networks <https://arxiv.org/abs/2408.11104>`_, ICLR 2025
  """
  method = _pipeline.stateless("config", config_weights)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
