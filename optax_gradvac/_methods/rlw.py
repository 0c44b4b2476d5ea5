"""RLW: random loss weighting, new softmax-normal task weights every step."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_gradvac import _checks, _pipeline, _pytree


class RLWState(NamedTuple):
  """State of :func:`rlw`."""

  count: jax.Array  # shape=(), dtype=jnp.int32: steps taken (non-finite ones skipped).
  key: jax.Array  # typed PRNG key for the task weights.
  cosine: jax.Array  # [num_groups, T, T]: cosines of the original gradients, last step.
  weights: jax.Array  # [num_groups, T]: the task weights of the last step.


def rlw(
  num_tasks: int, *, key: jax.Array | int = 0, granularity: _pytree.Granularity = "model"
) -> optax.GradientTransformationExtraArgs:
  r"""Random loss weighting: the gradients summed with random weights, new each step.

  ``update`` takes per-task gradients stacked on a leading task axis and
  returns :math:`\sum_t \lambda_t g_t` with

  .. math::
    \lambda = \operatorname{softmax}(z), \qquad z \sim \mathcal N(0, I_T),

  drawn anew at every step: the paper's default distribution (Algorithm 1 with
  standard normal :math:`\tilde\lambda`), LibMTL's ``RLW`` default and torchjd's
  ``Random``. The weights are positive and sum to 1, each 1/T on average, so
  the update is on the scale of the mean gradient. Weighting the losses or
  their gradients is the same thing here (the paper's RLW and RGW coincide on
  the per-task gradients): one draw per step serves every parameter group, as
  one weighted loss would. A task whose gradient is zero in a group (absent
  from the batch) contributes nothing there; its weight is logged as 0, the
  others keep theirs (not renormalised, as in a weighted loss).

  The state keeps a typed key, split once per update: the weights of a run are
  reproducible from ``key`` and do not depend on the gradients. A NaN or inf
  gradient gives its group's plain sum and leaves the state (so the key) unchanged,
  as for :func:`gradvac`.

  .. warning::
    Like :func:`gradvac`, it must come first in a chain; use
    :func:`multi_steps` for gradient accumulation.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    key: PRNG key (typed or raw) or integer seed for the weights; the state
      keeps a typed key.
    granularity: ``"model"`` (default), ``"layer"``, ``"tensor"`` or a callable
      (see :func:`gradvac`): the groups whose absent tasks are logged with
      weight 0. The weights themselves are the same in every group.

  Returns:
    A :class:`optax.GradientTransformationExtraArgs` object whose state is a
    :class:`RLWState`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> tx = ogv.rlw(num_tasks=3, key=0)
    >>> params = {"w": jnp.zeros(2)}
    >>> task_grads = {"w": jnp.eye(3, 2)}  # the third task absent
    >>> updates, state = jax.jit(tx.update)(task_grads, tx.init(params), params)
    >>> _, draw = jax.random.split(jax.random.key(0))  # the first step's draw
    >>> weights = jax.nn.softmax(jax.random.normal(draw, (3,)))
    >>> print(jnp.allclose(updates["w"], weights[:2]), state.weights[0, 2])
    True 0.0

  References:
    Lin et al, `Reasonable Effectiveness of Random Weighting: A Litmus Test for
    Multi-Task Learning <https://arxiv.org/abs/2111.10603>`_, TMLR 2022
  """
  _checks.check_key("rlw", key)

  def init(num_groups: int, num_tasks: int, dtype: jnp.dtype) -> RLWState:
    logged = _pipeline.gram_state(num_groups, num_tasks, dtype)
    return RLWState(
      count=logged.count,
      key=_checks.canonicalize_key("rlw", key),
      cosine=logged.cosine,
      weights=logged.weights,
    )

  def weigh(gram: jax.Array, state: RLWState) -> tuple[jax.Array, RLWState]:
    new_key, draw = jax.random.split(state.key)
    # Drawn in float32 whatever the gradients' dtype: the same key gives the
    # same weights in every precision.
    logits = jax.random.normal(draw, (num_tasks,), jnp.float32).astype(gram.dtype)
    present = jnp.diagonal(gram, axis1=1, axis2=2) > 0
    return jnp.where(present, jax.nn.softmax(logits), 0), state._replace(key=new_key)

  method = _pipeline.Method("rlw", init, weigh)
  return _pipeline.gram_transformation(method, num_tasks, granularity)
