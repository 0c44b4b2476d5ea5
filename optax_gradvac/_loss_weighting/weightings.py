"""Loss weightings: the factories, their states and their input checks.

The formulas are in :mod:`optax_gradvac._loss_weighting.formulas`; this module
keeps the state (DWA's epoch means, FAMO's logits and their optimiser), checks
every input at trace time, and wires both into a :class:`LossWeighting`.
"""

import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_gradvac import _checks
from optax_gradvac._loss_weighting import formulas


class LossWeighting(NamedTuple):
  """A loss weighting: one scalar loss from the per-task losses, and its state.

  Built by :func:`uw`, :func:`dwa`, :func:`gls`, :func:`stch`, :func:`famo` and
  :func:`imtl_l`. The per-task losses ``[T]`` are computed inside the function
  that the training step differentiates (``jax.vmap`` of a loss over
  task-separated batches, :func:`task_value_and_grad`'s losses, or one loss per
  task of a shared batch); the weighting turns them into the scalar loss whose
  gradient the optimiser follows: one backward pass, no per-task gradients.

  The four functions, all pure (``jit``-, ``vmap``- and ``grad``-compatible; every
  input is checked at trace time):

  - ``init(dtype=jnp.float32) -> state``: the initial state, a ``NamedTuple`` of
    arrays (checkpoint it with the optimiser's state).
  - ``init_params(dtype=jnp.float32) -> params``: the method's learned
    parameters (``[T]`` log-variances of :func:`uw`, log-scales of
    :func:`imtl_l`), or ``None``. Put them in the tree that the optimiser
    trains, beside the model's, and pass them back to ``loss``.
  - ``loss(losses, state, params=None) -> (loss, weights)``: the scalar loss to
    differentiate, and ``weights[t]``, its derivative in ``losses[t]`` (with the
    method's stop-gradients): the gradient of ``loss`` is
    :math:`\\sum_t w_t \\nabla L_t`. Log the weights; they carry no gradient.
  - ``update(losses, state, *, losses_after_step=None) -> state``: after the
    step, the state for the next one, from this step's losses (take them out of
    the differentiated function as auxiliary output). Only :func:`famo` reads
    ``losses_after_step`` (the losses recomputed on the same batch after the
    parameter update); the others refuse it.

  Example:
    One step's protocol, here with :func:`dwa` (the guide "Loss weighting" has
    jitted training steps with every method, in optax and in Flax):

    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.dwa(num_tasks=2, steps_per_epoch=10)
    >>> state, params = weighting.init(), weighting.init_params()  # DWA learns no params
    >>> losses = jnp.array([1.0, 2.0])  # computed inside the differentiated function
    >>> loss, weights = weighting.loss(losses, state, params)
    >>> print(loss, weights)  # the first two epochs weigh every task 1
    3.0 [1. 1.]
    >>> print(jax.grad(lambda losses: weighting.loss(losses, state)[0])(losses))
    [1. 1.]
    >>> state = weighting.update(losses, state)  # after the optimizer's step
    >>> print(state.count, state.loss_sum)
    1 [1. 2.]
  """

  init: Callable[..., Any]
  init_params: Callable[..., Any]
  loss: Callable[..., tuple[jax.Array, jax.Array]]
  update: Callable[..., Any]


# Input checks: static information only (shapes, dtypes, Python values), at trace time.


def _check_losses(name: str, num_tasks: int, losses: Any, arg: str = "losses") -> jax.Array:
  """One floating loss per task, ``[num_tasks]``."""
  if losses is None or not (hasattr(losses, "shape") or isinstance(losses, list | tuple)):
    raise TypeError(
      f"{name}: {arg} must be an array of one loss per task, shape ({num_tasks},), got "
      f"{_checks._describe(losses)}."
    )
  losses = jnp.asarray(losses)
  if not jnp.issubdtype(losses.dtype, jnp.floating):
    raise TypeError(f"{name}: {arg} must be floating, got {_checks._describe(losses)}.")
  if losses.shape != (num_tasks,):
    raise ValueError(
      f"{name}: {arg} must have shape ({num_tasks},), one loss per task (num_tasks="
      f"{num_tasks}), got {_checks._describe(losses)}. For a batch of runs, jax.vmap the "
      "weighting's functions."
    )
  return losses


def _check_state(name: str, state: Any, expected: Any) -> None:
  """The weighting's own state type, each array of the shape its ``init`` gives."""
  if type(state) is not type(expected):
    raise TypeError(
      f"{name}: expected its own state, a {type(expected).__name__}, got "
      f"{type(state).__name__}. Pass the state that this weighting's init returned."
    )
  paths_and_expected = jax.tree_util.tree_flatten_with_path(expected)[0]
  leaves, structure = jax.tree.flatten(state)
  if structure != jax.tree.structure(expected):
    raise TypeError(
      f"{name}: state has the structure {structure}, expected {jax.tree.structure(expected)}. "
      "Pass the state that this weighting's init returned."
    )
  for (path, want), value in zip(paths_and_expected, leaves, strict=True):
    if np.shape(value) != want.shape:
      raise ValueError(
        f"{name}: state{jax.tree_util.keystr(path)} has shape {np.shape(value)}, expected "
        f"{want.shape}. Was the state built for another num_tasks?"
      )


def _check_params(name: str, num_tasks: int, params: Any, learned: str | None) -> Any:
  """UW's and IMTL-L's ``[T]`` learned parameters; ``None`` for the others."""
  if learned is None:
    if params is not None:
      raise TypeError(
        f"{name} learns no parameters: pass params=None (its init_params() is None), got "
        f"{_checks._describe(params)}."
      )
    return None
  if params is None:
    raise TypeError(
      f"{name}: pass its learned {learned} as params: a [{num_tasks}] array from "
      "init_params(), kept in the tree that your optimizer trains."
    )
  return _check_losses(name, num_tasks, params, f"params (the {learned})")


def _check_no_after_step(name: str, losses_after_step: Any) -> None:
  if losses_after_step is not None:
    raise TypeError(
      f"{name}: losses_after_step is read by famo only; {name} needs no recomputed losses."
    )


def _check_dtype(name: str, dtype: Any) -> jnp.dtype:
  _checks.check_float_dtype(name, "dtype", dtype)
  return jnp.dtype(dtype)


def _check_task_vector(name: str, arg: str, num_tasks: int, value: Any) -> jax.Array:
  """A hyper-parameter given per task, ``[num_tasks]`` (a constant of the weighting)."""
  shape = np.shape(value)
  if shape != (num_tasks,):
    raise ValueError(f"{name}: {arg} must have shape ({num_tasks},), got shape {shape}.")
  return value


def _stateless(
  name: str,
  num_tasks: int,
  formula: Callable[..., tuple[jax.Array, jax.Array]],
  learned: str | None = None,
) -> LossWeighting:
  """A weighting without state: ``formula(losses)``, or ``formula(losses, params)``."""
  _checks.check_num_tasks(name, num_tasks)

  def init(dtype: Any = jnp.float32) -> optax.EmptyState:
    _check_dtype(name, dtype)
    return optax.EmptyState()

  def init_params(dtype: Any = jnp.float32) -> jax.Array | None:
    dtype = _check_dtype(name, dtype)
    return None if learned is None else jnp.zeros(num_tasks, dtype)

  def loss(
    losses: jax.typing.ArrayLike, state: optax.EmptyState, params: Any = None
  ) -> tuple[jax.Array, jax.Array]:
    losses = _check_losses(name, num_tasks, losses)
    _check_state(name, state, optax.EmptyState())
    params = _check_params(name, num_tasks, params, learned)
    return formula(losses) if learned is None else formula(losses, params)

  def update(
    losses: jax.typing.ArrayLike,
    state: optax.EmptyState,
    *,
    losses_after_step: jax.typing.ArrayLike | None = None,
  ) -> optax.EmptyState:
    _check_losses(name, num_tasks, losses)
    _check_state(name, state, optax.EmptyState())
    _check_no_after_step(name, losses_after_step)
    return state

  return LossWeighting(init, init_params, loss, update)


def uw(num_tasks: int) -> LossWeighting:
  r"""Uncertainty weighting (UW): each loss scaled by a learned inverse variance.

  .. math::
    \mathcal{L} = \sum_t \tfrac12 e^{-s_t} L_t + \tfrac12 s_t,

  with :math:`s_t = \log \sigma_t^2` task t's log-variance (homoscedastic
  uncertainty), a parameter trained by the same optimiser as the model:
  ``init_params()`` gives zeros (:math:`\sigma_t = 1`, weights 1/2), to be kept
  in the parameter tree and passed as ``params`` to ``loss``. Its gradient,
  :math:`\tfrac12 (1 - e^{-s_t} L_t)`, drives :math:`e^{s_t}` towards
  :math:`L_t`: each task's weight tends to :math:`1 / (2 L_t)`. No state.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).

  Returns:
    A :class:`LossWeighting` whose state is ``optax.EmptyState()`` and whose
    ``loss`` needs ``params``: the ``[T]`` log-variances.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.uw(num_tasks=2)
    >>> log_variances, state = weighting.init_params(), weighting.init()
    >>> losses = jnp.array([1.0, 4.0])
    >>> loss, weights = weighting.loss(losses, state, log_variances)
    >>> print(loss, weights)
    2.5 [0.5 0.5]
    >>> print(jax.grad(lambda s: weighting.loss(losses, state, s)[0])(log_variances))
    [ 0.  -1.5]

  References:
    Kendall et al, `Multi-Task Learning Using Uncertainty to Weigh Losses for
    Scene Geometry and Semantics <https://arxiv.org/abs/1705.07115>`_, CVPR 2018
  """
  return _stateless("uw", num_tasks, formulas.uw_loss, learned="log-variances")


def imtl_l(num_tasks: int) -> LossWeighting:
  r"""IMTL-L: each loss scaled by a learned :math:`e^{s_t}`, regularised by :math:`-s_t`.

  .. math::
    \mathcal{L} = \sum_t e^{s_t} L_t - s_t,

  the loss-balance half of Impartial Multi-Task Learning: :math:`s_t` is a
  parameter trained by the same optimiser as the model (``init_params()``
  gives zeros: the plain sum at the start), kept in the parameter tree and
  passed as ``params`` to ``loss``. Its gradient :math:`e^{s_t} L_t - 1`
  drives every scaled loss :math:`e^{s_t} L_t` towards 1. No state.

  It is UW (:func:`uw`) up to a factor 2 and the sign of the parameter
  (``imtl_l`` at :math:`s` is twice ``uw`` at :math:`-s`), with the same
  optima. The paper's full IMTL also balances the gradients (IMTL-G,
  :func:`imtl_g`), which needs per-task gradients.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).

  Returns:
    A :class:`LossWeighting` whose state is ``optax.EmptyState()`` and whose
    ``loss`` needs ``params``: the ``[T]`` log-scales.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.imtl_l(num_tasks=2)
    >>> log_scales, state = weighting.init_params(), weighting.init()
    >>> losses = jnp.array([1.0, 4.0])
    >>> loss, weights = weighting.loss(losses, state, log_scales)
    >>> print(loss, weights)
    5.0 [1. 1.]
    >>> print(jax.grad(lambda s: weighting.loss(losses, state, s)[0])(log_scales))
    [0. 3.]

  References:
    Liu et al, `Towards Impartial Multi-task Learning
    <https://openreview.net/forum?id=IMPnRXEWpvr>`_, ICLR 2021
  """
  return _stateless("imtl_l", num_tasks, formulas.imtl_l_loss, learned="log-scales")


def gls(num_tasks: int) -> LossWeighting:
  r"""Geometric loss strategy (GLS): the geometric mean of the losses.

  .. math::
    \mathcal{L} = \Bigl(\prod_t L_t\Bigr)^{1/T}, \qquad
    \frac{\partial \mathcal{L}}{\partial L_t} = \frac{\mathcal{L}}{T L_t}:

  each task's gradient is weighted by the inverse of its loss, so every task's
  relative decrease counts alike, whatever the scale of its loss. Computed as
  :math:`\exp(\tfrac1T \sum_t \log L_t)`, which neither overflows nor
  underflows. The losses must be positive (a zero loss makes the weights
  ``nan``). No state, no parameters.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).

  Returns:
    A :class:`LossWeighting` whose state is ``optax.EmptyState()``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.gls(num_tasks=2)
    >>> loss, weights = weighting.loss(jnp.array([1.0, 4.0]), weighting.init())
    >>> print(loss, weights)
    2.0 [1.   0.25]

  References:
    Chennupati et al, `MultiNet++: Multi-Stream Feature Aggregation and Geometric
    Loss Strategy for Multi-Task Learning <https://arxiv.org/abs/1904.08492>`_,
    CVPR Workshops 2019
  """
  return _stateless("gls", num_tasks, formulas.gls_loss)


def stch(
  num_tasks: int,
  *,
  mu: jax.typing.ArrayLike = 1.0,
  preferences: jax.typing.ArrayLike | None = None,
  reference: jax.typing.ArrayLike | None = None,
) -> LossWeighting:
  r"""Smooth Tchebycheff scalarisation (STCH): a smooth maximum of the losses.

  .. math::
    \mathcal{L} = \mu \log \sum_t \exp\Bigl(\frac{\lambda_t (L_t - z^*_t)}{\mu}\Bigr),
    \qquad \frac{\partial \mathcal{L}}{\partial L_t} =
    \lambda_t \operatorname{softmax}\Bigl(\frac{\lambda (L - z^*)}{\mu}\Bigr)_t:

  the smooth version of the Tchebycheff scalarisation
  :math:`\max_t \lambda_t (L_t - z^*_t)` (to which it tends as :math:`\mu \to 0`,
  from above, within :math:`\mu \log T`), so the gradient goes mostly to the
  task worst off relative to its preference. No state, no parameters.

  The official multi-task code applies it to normalised log-losses,
  :math:`\log(L_t / \bar L_t)` with :math:`\bar L_t` the mean loss over a warm-up
  epoch (trained on :math:`\sum_t \log L_t`), :math:`\lambda = 1` and the result
  times :math:`T`; that is this weighting on ``jnp.log(losses / mean_losses)``
  with ``preferences=jnp.ones(T)``, up to the factor :math:`T`.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    mu: the smoothing :math:`\mu > 0`; the smaller, the closer to the maximum.
      1.0 is the official multi-task code's default; the paper compares 0.01
      to 1.
    preferences: ``[T]`` preference weights :math:`\lambda` (on the simplex in
      the paper); ``None`` for uniform ones, :math:`1 / T`.
    reference: ``[T]`` ideal point :math:`z^*` (a lower bound of each loss);
      ``None`` for zeros.

  Returns:
    A :class:`LossWeighting` whose state is ``optax.EmptyState()``.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.stch(num_tasks=2, mu=0.1, preferences=jnp.ones(2))
    >>> loss, weights = weighting.loss(jnp.array([1.0, 2.0]), weighting.init())
    >>> print(loss.round(4), weights.round(4))  # nearly max(L) and its task
    2.0 [0. 1.]

  References:
    Lin et al, `Smooth Tchebycheff Scalarization for Multi-Objective Optimization
    <https://arxiv.org/abs/2402.19078>`_, ICML 2024
  """
  name = "stch"
  _checks.check_positive(name, "mu", mu)
  preferences = (
    np.full(num_tasks, 1 / num_tasks)
    if preferences is None
    else _check_task_vector(name, "preferences", num_tasks, preferences)
  )
  reference = (
    np.zeros(num_tasks)
    if reference is None
    else _check_task_vector(name, "reference", num_tasks, reference)
  )

  def formula(losses: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Constants in the losses' compute dtype: float64 preferences must not promote it.
    dtype = formulas.compute_dtype(losses)
    return formulas.stch_loss(
      losses, jnp.asarray(mu, dtype), jnp.asarray(preferences, dtype), jnp.asarray(reference, dtype)
    )

  return _stateless(name, num_tasks, formula)


class DWAState(NamedTuple):
  """State of :func:`dwa`."""

  count: jax.Array  # shape=(), dtype=int32: steps summed into loss_sum (this epoch so far).
  loss_sum: jax.Array  # [T]: the sum of this epoch's losses so far.
  averages: jax.Array  # [2, T]: mean losses of the last two completed epochs, older first.
  epochs: jax.Array  # shape=(), dtype=int32: completed epochs (uniform weights before 2).


def dwa(
  num_tasks: int, *, steps_per_epoch: int, temperature: jax.typing.ArrayLike = 2.0
) -> LossWeighting:
  r"""Dynamic weight average (DWA): weights from each task's rate of loss decrease.

  .. math::
    \mathcal{L} = \sum_t \lambda_t L_t, \qquad
    \lambda = T \operatorname{softmax}(r / \tau), \qquad
    r_t = \frac{\bar L_t(e - 1)}{\bar L_t(e - 2)},

  with :math:`\bar L_t(e)` task t's mean loss over epoch :math:`e` and
  :math:`\tau` the temperature: a task whose loss fell less over the last epoch
  gets more weight. The weights of epoch :math:`e` depend on the two epochs
  before it only (no gradient flows through them), and are 1 during the first
  two epochs, as in the paper.

  ``update`` adds each step's losses to the state, and every
  ``steps_per_epoch`` steps closes an epoch: its mean becomes the newer of the
  two averages. ``steps_per_epoch=1`` gives the per-step variant (ratios of
  consecutive steps' losses, noisier). A step whose losses are not all finite is
  left out of the mean (the state does not change).

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    steps_per_epoch: the number of ``update`` calls per epoch (a Python int):
      the paper averages the losses over each epoch.
    temperature: :math:`\tau > 0`; the larger, the more uniform the weights.
      The paper's is 2.

  Returns:
    A :class:`LossWeighting` whose state is a :class:`DWAState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.dwa(num_tasks=2, steps_per_epoch=1)
    >>> state = weighting.init()
    >>> for losses in ([1.0, 1.0], [0.5, 1.0]):  # task 0's loss halves
    ...   state = weighting.update(jnp.array(losses), state)
    >>> loss, weights = weighting.loss(jnp.array([0.5, 1.0]), state)
    >>> print(weights.round(4))  # softmax([0.5, 1] / 2), times 2
    [0.8756 1.1244]

  References:
    Liu et al, `End-to-End Multi-Task Learning with Attention
    <https://arxiv.org/abs/1803.10704>`_, CVPR 2019
  """
  name = "dwa"
  _checks.check_num_tasks(name, num_tasks)
  _checks.check_size(name, "steps_per_epoch", steps_per_epoch, 1)
  _checks.check_positive(name, "temperature", temperature)

  def init(dtype: Any = jnp.float32) -> DWAState:
    dtype = _check_dtype(name, dtype)
    # Each field in a buffer of its own: a step that donates the state would
    # otherwise donate one buffer twice.
    return DWAState(
      count=jnp.zeros([], jnp.int32),
      loss_sum=jnp.zeros(num_tasks, dtype),
      averages=jnp.ones((2, num_tasks), dtype),
      epochs=jnp.zeros([], jnp.int32),
    )

  expected = jax.eval_shape(init)

  def init_params(dtype: Any = jnp.float32) -> None:
    _check_dtype(name, dtype)

  def loss(
    losses: jax.typing.ArrayLike, state: DWAState, params: Any = None
  ) -> tuple[jax.Array, jax.Array]:
    losses = _check_losses(name, num_tasks, losses)
    _check_state(name, state, expected)
    _check_params(name, num_tasks, params, None)
    weights = jnp.where(
      state.epochs >= 2,
      formulas.dwa_weights(state.averages[0], state.averages[1], temperature),
      1,
    )
    return formulas.weighted_sum_loss(losses, weights)

  def update(
    losses: jax.typing.ArrayLike,
    state: DWAState,
    *,
    losses_after_step: jax.typing.ArrayLike | None = None,
  ) -> DWAState:
    losses = jax.lax.stop_gradient(_check_losses(name, num_tasks, losses))
    _check_state(name, state, expected)
    _check_no_after_step(name, losses_after_step)
    finite = jnp.all(jnp.isfinite(losses))
    loss_sum = state.loss_sum + jnp.where(finite, losses, 0).astype(state.loss_sum.dtype)
    count = state.count + finite.astype(state.count.dtype)
    closes = count >= steps_per_epoch
    mean = loss_sum / jnp.maximum(count, 1)
    return DWAState(
      count=jnp.where(closes, 0, count),
      loss_sum=jnp.where(closes, 0, loss_sum),
      averages=jnp.where(closes, jnp.stack([state.averages[1], mean]), state.averages),
      epochs=jnp.where(closes, optax.safe_increment(state.epochs), state.epochs),
    )

  return LossWeighting(init, init_params, loss, update)


class FAMOState(NamedTuple):
  """State of :func:`famo`."""

  logits: jax.Array  # [T]: xi; the task weights are z = softmax(xi).
  logits_state: tuple[Any, ...]  # optax.chain(add_decayed_weights, adam) state of the logits.
  previous_losses: jax.Array  # [T]: the last update's losses, awaiting the next step's.
  has_previous: jax.Array  # shape=(), dtype=bool: whether previous_losses awaits them.


def famo(
  num_tasks: int,
  *,
  learning_rate: jax.typing.ArrayLike = 0.025,
  weight_decay: jax.typing.ArrayLike = 1e-3,
  min_losses: jax.typing.ArrayLike | None = None,
) -> LossWeighting:
  r"""Fast adaptive multitask optimisation (FAMO): weights learned from the losses' decrease.

  .. math::
    \mathcal{L} = c \sum_t z_t \log(L_t - b_t + \epsilon), \qquad
    z = \operatorname{softmax}(\xi), \qquad
    c = \Bigl(\sum_t \frac{z_t}{L_t - b_t + \epsilon}\Bigr)^{-1},

  with :math:`z` and :math:`c` held constant (:math:`b` = ``min_losses``,
  :math:`\epsilon = 10^{-8}`): the gradient is the convex combination
  :math:`\sum_t c z_t \nabla L_t / (L_t - b_t + \epsilon)`, which decreases
  every log-loss at a rate set by :math:`z`. After the parameter update the
  logits :math:`\xi` take one step of Adam (learning rate ``learning_rate``,
  L2 decay ``weight_decay``, as the official code's ``torch.optim.Adam``) on
  :math:`J_z(\xi)^\top \delta`, with :math:`\delta_t` task t's decrease of
  log-loss over the step: weight moves to the tasks that improved least.

  **The losses after the step.** The paper measures :math:`\delta` on the same
  batch, before and after the update: recompute the per-task losses with the
  new parameters on the step's batch (one more forward pass, no backward) and
  pass them as ``update(losses, state, losses_after_step=new_losses)``; the
  logits move at once. Without them, ``update(losses, state)`` records the
  step's losses, and the logits move at the start of the next step, before its
  weights are formed (inside ``loss``, and again, identically, in ``update``),
  with the *next step's* losses as the after-step losses: the same parameters,
  another batch, no extra forward pass. :math:`\delta` then also holds the
  difference between the two batches' losses, noise of mean zero that can
  exceed a step's real decrease when batches are small; Adam's averaging and
  the decay damp it. The first step of that mode does not move the logits.

  The losses must stay above ``min_losses`` (positive, by default). A step whose
  losses (or recomputed losses) are not all finite and above ``min_losses``
  leaves the logits and their optimiser unchanged. The official code also
  clips the model's gradient norm to 1 (``max_norm``): chain
  ``optax.clip_by_global_norm(1.0)`` before the optimiser for that.

  Args:
    num_tasks: number of tasks ``T`` (a Python int).
    learning_rate: the logits' Adam learning rate (the paper's 0.025).
    weight_decay: the logits' L2 regularisation :math:`\gamma`, added to their
      gradient before Adam: 1e-3, as LibMTL, torchjd and the official
      experiments on NYUv2, CelebA and QM9 (1e-2 on CityScapes and Meta-World).
    min_losses: ``[T]`` lower bounds :math:`b` of the losses; ``None`` for zeros.

  Returns:
    A :class:`LossWeighting` whose state is a :class:`FAMOState`.

  Example:
    >>> import jax.numpy as jnp
    >>> import optax_gradvac as ogv
    >>> weighting = ogv.famo(num_tasks=2)
    >>> state = weighting.init()
    >>> losses = jnp.array([1.0, 4.0])
    >>> loss, weights = weighting.loss(losses, state)
    >>> print(weights)  # equal z: inversely proportional to the losses
    [0.8 0.2]
    >>> # Task 0's loss halved over the step, task 1's did not move:
    >>> state = weighting.update(losses, state, losses_after_step=jnp.array([0.5, 4.0]))
    >>> print(state.logits.round(4))  # one Adam step: weight moves to task 1
    [-0.025  0.025]

  References:
    Liu et al, `FAMO: Fast Adaptive Multitask Optimization
    <https://arxiv.org/abs/2306.03792>`_, NeurIPS 2023
  """
  name = "famo"
  _checks.check_num_tasks(name, num_tasks)
  _checks.check_positive(name, "learning_rate", learning_rate)
  _checks._check_scalar(name, "weight_decay", weight_decay)
  if isinstance(weight_decay, numbers.Real) and not 0 <= weight_decay < float("inf"):
    raise ValueError(f"{name}: weight_decay must be nonnegative and finite, got {weight_decay}.")
  min_losses = (
    np.zeros(num_tasks)
    if min_losses is None
    else _check_task_vector(name, "min_losses", num_tasks, min_losses)
  )
  optimizer = optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(learning_rate))

  def init(dtype: Any = jnp.float32) -> FAMOState:
    dtype = _check_dtype(name, dtype)
    logits = jnp.zeros(num_tasks, dtype)
    return FAMOState(
      logits=logits,
      logits_state=optimizer.init(logits),
      previous_losses=jnp.zeros(num_tasks, dtype),
      has_previous=jnp.zeros([], bool),
    )

  expected = jax.eval_shape(init)

  def init_params(dtype: Any = jnp.float32) -> None:
    _check_dtype(name, dtype)

  def usable(losses: jax.Array) -> jax.Array:
    """Whether every loss is finite and above its bound: its logarithm is finite."""
    shifted = losses - jnp.asarray(min_losses, losses.dtype) + formulas.FAMO_EPSILON
    return jnp.all(jnp.isfinite(losses) & (shifted > 0))

  def step_logits(
    logits: jax.Array, logits_state: Any, before: jax.Array, after: jax.Array, go: jax.Array
  ) -> tuple[jax.Array, Any]:
    """One step of the logits' optimiser on the decrease from ``before`` to ``after``."""
    go = go & usable(before) & usable(after)
    # Unusable losses are replaced before the logarithms: no nan even in a discarded branch.
    before, after = jnp.where(go, before, 1), jnp.where(go, after, 1)
    gradient = formulas.famo_logits_gradient(logits, before, after, min_losses)
    updates, new_state = optimizer.update(gradient.astype(logits.dtype), logits_state, logits)
    new_logits = optax.apply_updates(logits, updates)

    def keep(new: jax.Array, old: jax.Array) -> jax.Array:
      return jnp.where(go, new, old)

    return keep(new_logits, logits), jax.tree.map(keep, new_state, logits_state)

  def pending(state: FAMOState, losses: jax.Array) -> tuple[jax.Array, Any]:
    """The logits after the step that waited for these losses (the lagged mode)."""
    previous = state.previous_losses.astype(losses.dtype)
    return step_logits(state.logits, state.logits_state, previous, losses, state.has_previous)

  def loss(
    losses: jax.typing.ArrayLike, state: FAMOState, params: Any = None
  ) -> tuple[jax.Array, jax.Array]:
    losses = _check_losses(name, num_tasks, losses)
    _check_state(name, state, expected)
    _check_params(name, num_tasks, params, None)
    logits, _ = pending(state, jax.lax.stop_gradient(losses))
    return formulas.famo_loss(losses, logits, min_losses)

  def update(
    losses: jax.typing.ArrayLike,
    state: FAMOState,
    *,
    losses_after_step: jax.typing.ArrayLike | None = None,
  ) -> FAMOState:
    losses = jax.lax.stop_gradient(_check_losses(name, num_tasks, losses))
    _check_state(name, state, expected)
    if losses_after_step is not None:
      after = jax.lax.stop_gradient(
        _check_losses(name, num_tasks, losses_after_step, "losses_after_step")
      )
    logits, logits_state = pending(state, losses)
    if losses_after_step is None:
      recorded = usable(losses)
      return FAMOState(
        logits=logits,
        logits_state=logits_state,
        previous_losses=jnp.where(recorded, losses, state.previous_losses).astype(
          state.previous_losses.dtype
        ),
        has_previous=recorded,
      )
    logits, logits_state = step_logits(logits, logits_state, losses, after, jnp.array(True))
    return state._replace(
      logits=logits, logits_state=logits_state, has_previous=jnp.zeros([], bool)
    )

  return LossWeighting(init, init_params, loss, update)
