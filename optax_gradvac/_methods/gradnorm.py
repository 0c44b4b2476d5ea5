"""GradNorm: learned task weights that balance the tasks' gradient norms and training rates."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pipeline, _pytree


class GradNormState(NamedTuple):
  """State of :func:`gradnorm`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  task_weights: jax.Array  # [num_groups, T]: the learned weights w_i of the next step, sum T.
  initial_losses: jax.Array  # [num_groups, T]: each task's first positive loss L_i(0); 0 before.
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  weights: jax.Array  # [num_groups, T]: the task weights of the last step (0 if absent).


def _weights_step(
  task_weights: jax.Array,
  initial_losses: jax.Array,
  norms: jax.Array,
  losses: jax.Array,
  alpha: jax.typing.ArrayLike,
  learning_rate: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""One step of GradNorm's weights for one parameter group (Algorithm 1 of the paper).

  With :math:`G_i = w_i |\nabla L_i|` the weighted gradient norms, :math:`\bar G`
  their mean, :math:`\tilde L_i = L_i / L_i(0)` the loss ratios and
  :math:`r_i = \tilde L_i / \operatorname{mean}_j \tilde L_j` the relative inverse
  training rates, the weights take one gradient step on

  .. math::
    L_\text{grad} = \sum_i \big| G_i - \bar G \, r_i^\alpha \big|,

  the targets :math:`\bar G r_i^\alpha` held constant: :math:`w_i \mathrel{-}=
  \eta \operatorname{sign}(G_i - \bar G r_i^\alpha) |\nabla L_i|`. They are
  then renormalised to sum to ``T``. Only the tasks whose gradient is nonzero
  (``norms > 0``) take part: the others keep their weight until the
  renormalisation, and are left out of the means. A weight that the step would
  make negative is set to 0 (the paper leaves them unconstrained; a negative
  weight would ascend its task's loss).

  A task's first positive, finite loss is its :math:`L_i(0)` (recorded in
  ``initial_losses``); until then its loss ratio is 1. The step is skipped
  (weights and records unchanged) when a taking-part task's loss is negative
  or not finite, or when every weight would be 0.

  Args:
    task_weights: ``[T]`` current weights :math:`w_i`, summing to ``T``.
    initial_losses: ``[T]`` recorded :math:`L_i(0)`, 0 where none is yet.
    norms: ``[T]`` gradient norms :math:`|\nabla L_i|` of the group.
    losses: ``[T]`` losses :math:`L_i` of this step.
    alpha: the asymmetry :math:`\alpha \ge 0`.
    learning_rate: the step size :math:`\eta` of the weights.

  Returns:
    ``(task_weights, initial_losses)`` after the step.
  """
  num_tasks = task_weights.shape[-1]
  taking_part = norms > 0
  usable = ~taking_part | (jnp.isfinite(losses) & (losses >= 0))
  count = jnp.maximum(jnp.sum(taking_part), 1)
  record = taking_part & (initial_losses == 0) & jnp.isfinite(losses) & (losses > 0)
  recorded = jnp.where(record, losses, initial_losses)
  ratios = jnp.where(recorded > 0, losses / jnp.where(recorded > 0, recorded, 1), 1)
  ratios = jnp.where(taking_part, ratios, 0)
  mean_ratio = jnp.sum(ratios) / count
  rates = jnp.where(mean_ratio > 0, ratios / jnp.where(mean_ratio > 0, mean_ratio, 1), 1)
  weighted_norms = task_weights * norms
  targets = jnp.sum(jnp.where(taking_part, weighted_norms, 0)) / count * rates**alpha
  gradient = jnp.where(taking_part, jnp.sign(weighted_norms - targets) * norms, 0)
  stepped = jnp.maximum(task_weights - learning_rate * gradient, 0)
  total = jnp.sum(stepped)
  renormalised = stepped * (num_tasks / jnp.where(total > 0, total, 1))
  done = jnp.all(usable) & (total > 0)
  return jnp.where(done, renormalised, task_weights), jnp.where(done, recorded, initial_losses)


def gradnorm(
  num_tasks: int,
  alpha: jax.typing.ArrayLike = 1.5,
  learning_rate: jax.typing.ArrayLike = 0.025,
  *,
  granularity: _pytree.Granularity = "model",
) -> optax.GradientTransformationExtraArgs:
  r"""GradNorm: task weights learned so that the tasks train at similar rates.

  ``update(grads, state, params, losses=losses)`` takes per-task gradients
  stacked on a leading task axis and the ``[T]`` per-task losses of the same
  step, and returns, for each parameter group, :math:`\sum_i w_i g_i`: the
  gradient of the weighted loss :math:`\sum_i w_i L_i`. The weights
  :math:`w_i` start at 1 and are learned as in Algorithm 1 of the paper
  (see below): after each step they move, at rate
  ``learning_rate``, towards weighted gradient norms
  :math:`w_i |\nabla L_i|` equal to their mean times :math:`r_i^\alpha`, where
  :math:`r_i` is task ``i``'s loss ratio :math:`L_i / L_i(0)` relative to the
  mean ratio (a task that trains slower gets a larger gradient), then are
  renormalised to sum to ``T``. The update of a step uses the weights learned
  before it.

  The gradient norms are those of each parameter group (the Gram diagonal, no
  extra pass), so every group learns its own weights; the paper measures them
  on the last shared layer only, to save backward passes that the per-task
  gradients make unnecessary here. ``granularity="model"`` (the default) gives
  one set of weights for the whole model.

  The losses: pass them as ``losses=`` to ``update`` (``optax.chain``,
  :func:`multi_steps` and ``nnx.Optimizer.update`` pass extra keywords on);
  without them ``update`` raises. At the first step, each task's loss is
  recorded as its :math:`L_i(0)` (every ratio is then 1, so the weights start
  moving towards equal weighted gradient norms). The losses must be
  non-negative, as loss ratios assume; a negative or non-finite loss of a task
  that is present skips that step of the weights (the update is made with the
  current weights). A task whose gradient is zero in a group (absent from the
  batch) keeps its weight there and gets weight 0 in the update and in the
  logged ``weights``. A NaN or inf gradient gives its group's plain sum and leaves
  the state unchanged.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    alpha: the asymmetry :math:`\alpha \ge 0`, the strength of the pull towards
      equal training rates (0: equal weighted gradient norms). The paper uses
      0.12 to 3; 1.5 (LibMTL's default) by default.
    learning_rate: step size of the weights. Their gradient is a gradient
      norm, so the right value depends on the gradients' scale.
    granularity: ``"model"`` (default), ``"layer"``, ``"tensor"`` or a callable;
      see :func:`gradvac`. Each group learns its own weights.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`GradNormState`.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> import optax_gradvac as ogv
    >>> tx = ogv.gradnorm(num_tasks=2, learning_rate=0.1)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.array([[3.0, 0.0], [0.0, 1.0]])}
    >>> update = jax.jit(tx.update)
    >>> state = tx.init(params)
    >>> for losses in ([1.0, 1.0], [0.5, 0.9]):  # task 0 trains faster
    ...   updates, state = update(task_grads, state, params, losses=jnp.array(losses))
    ...   print(np.asarray(updates["w"]).round(4), np.asarray(state.task_weights[0]).round(4))
    [3. 1.] [0.7778 1.2222]
    [2.3333 1.2222] [0.5309 1.4691]

  References:
    Chen et al, `GradNorm: Gradient Normalization for Adaptive Loss Balancing
    in Deep Multitask Networks <https://arxiv.org/abs/1711.02257>`_, ICML 2018
  """
  _checks.check_nonnegative("gradnorm", "alpha", alpha)
  _checks.check_positive("gradnorm", "learning_rate", learning_rate)

  def init(num_groups: int, num_tasks: int, dtype: jnp.dtype) -> GradNormState:
    logged = _pipeline.gram_state(num_groups, num_tasks, dtype)
    return GradNormState(
      count=logged.count,
      task_weights=jnp.ones((num_groups, num_tasks), dtype),
      initial_losses=jnp.zeros((num_groups, num_tasks), dtype),
      cosine=logged.cosine,
      weights=logged.weights,
    )

  def weigh(
    gram: jax.Array, state: GradNormState, *, scale: jax.Array, losses: jax.typing.ArrayLike
  ) -> tuple[jax.Array, GradNormState]:
    _checks.check_task_losses("gradnorm", losses, num_tasks)
    dtype = gram.dtype
    # The Gram matrices are those of the gradients divided by `scale`.
    norms = jnp.sqrt(jnp.diagonal(gram, axis1=1, axis2=2)) * scale[:, None]
    task_weights = state.task_weights.astype(dtype)
    losses = jnp.broadcast_to(jnp.asarray(losses, dtype), norms.shape)
    step = jax.vmap(_weights_step, (0, 0, 0, 0, None, None))
    new_weights, initial_losses = step(
      task_weights, state.initial_losses.astype(dtype), norms, losses, alpha, learning_rate
    )
    return jnp.where(norms > 0, task_weights, 0), state._replace(
      task_weights=new_weights.astype(state.task_weights.dtype),
      initial_losses=initial_losses.astype(state.initial_losses.dtype),
    )

  method = _pipeline.Method("gradnorm", init, weigh, inputs=("scale", "losses"))
  return _pipeline.gram_transformation(method, num_tasks, granularity)
