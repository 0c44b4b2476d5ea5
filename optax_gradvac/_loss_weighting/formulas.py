r"""The loss-weighting methods' formulas on ``[T]`` arrays: readable beside the papers.

Each ``*_loss`` function maps the per-task losses :math:`L` (and the method's
learned or stateful quantities) to ``(loss, weights)``: the scalar loss whose
gradient the optimiser follows, and ``weights[t]``, the derivative of that loss
with respect to :math:`L_t` (with the method's stop-gradients), so that the
gradient of the loss is :math:`\sum_t w_t \nabla L_t`. No state, no pytrees, no
checks: those are in :mod:`optax_gradvac._loss_weighting.weightings`.

Every function computes in float32 or wider (the dtype of the losses promoted
with float32), and is pure array code: jit-, vmap- and grad-compatible.
"""

import jax
import jax.numpy as jnp

# FAMO's shift inside its logarithms, as in the official code (and torchjd, LibMTL).
FAMO_EPSILON = 1e-8


def compute_dtype(*arrays: jax.typing.ArrayLike) -> jnp.dtype:
  """The dtype the formulas compute in: the arrays' dtypes promoted with float32."""
  return jnp.result_type(jnp.float32, *arrays)


def uw_loss(
  losses: jax.typing.ArrayLike, log_variances: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  r"""Uncertainty weighting: :math:`\sum_t \tfrac12 e^{-s_t} L_t + \tfrac12 s_t`.

  :math:`s_t = \log \sigma_t^2` is task t's learned log-variance: Kendall et al.'s
  loss for a Gaussian likelihood, in the log-variance form they train.
  """
  dtype = compute_dtype(losses, log_variances)
  losses, log_variances = jnp.asarray(losses, dtype), jnp.asarray(log_variances, dtype)
  weights = jnp.exp(-log_variances) / 2
  return jnp.sum(weights * losses + log_variances / 2), jax.lax.stop_gradient(weights)


def imtl_l_loss(
  losses: jax.typing.ArrayLike, log_scales: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  r"""IMTL-L: :math:`\sum_t e^{s_t} L_t - s_t` with learned log-scales :math:`s_t`."""
  dtype = compute_dtype(losses, log_scales)
  losses, log_scales = jnp.asarray(losses, dtype), jnp.asarray(log_scales, dtype)
  weights = jnp.exp(log_scales)
  return jnp.sum(weights * losses - log_scales), jax.lax.stop_gradient(weights)


def gls_loss(losses: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array]:
  r"""The geometric mean :math:`(\prod_t L_t)^{1/T}`, as :math:`\exp(\tfrac1T \sum_t \log L_t)`.

  The log form cannot overflow or underflow where the product would. Its
  derivative in :math:`L_t` is :math:`\mathrm{GM} / (T L_t)`.
  """
  losses = jnp.asarray(losses, compute_dtype(losses))
  geometric_mean = jnp.exp(jnp.mean(jnp.log(losses)))
  weights = geometric_mean / (losses.shape[-1] * losses)
  return geometric_mean, jax.lax.stop_gradient(weights)


def stch_loss(
  losses: jax.typing.ArrayLike,
  mu: jax.typing.ArrayLike,
  preferences: jax.typing.ArrayLike,
  reference: jax.typing.ArrayLike,
) -> tuple[jax.Array, jax.Array]:
  r"""Smooth Tchebycheff: :math:`\mu \log \sum_t \exp(\lambda_t (L_t - z^*_t) / \mu)`.

  Lin et al. (2024), with preferences :math:`\lambda` and ideal point :math:`z^*`.
  ``logsumexp`` subtracts the largest exponent, so a small :math:`\mu` cannot
  overflow. Its derivative in :math:`L_t` is
  :math:`\lambda_t \operatorname{softmax}(\lambda (L - z^*) / \mu)_t`.
  """
  dtype = compute_dtype(losses, preferences, reference)
  losses = jnp.asarray(losses, dtype)
  exponents = jnp.asarray(preferences, dtype) * (losses - jnp.asarray(reference, dtype)) / mu
  weights = jnp.asarray(preferences, dtype) * jax.nn.softmax(exponents)
  return mu * jax.nn.logsumexp(exponents), jax.lax.stop_gradient(weights)


def dwa_weights(
  older: jax.typing.ArrayLike, newer: jax.typing.ArrayLike, temperature: jax.typing.ArrayLike
) -> jax.Array:
  r"""DWA's weights :math:`T \operatorname{softmax}(w / \tau)`, :math:`w_t = L_t(e-1) / L_t(e-2)`.

  Liu et al. (2019): :math:`L_t(e)` is task t's mean loss over epoch
  :math:`e`, :math:`\tau` the temperature; the weights sum to :math:`T`. A task
  whose older mean loss is 0 gets the ratio 1 (no relative change).
  """
  dtype = compute_dtype(older, newer)
  older, newer = jnp.asarray(older, dtype), jnp.asarray(newer, dtype)
  nonzero = older != 0
  ratios = jnp.where(nonzero, newer / jnp.where(nonzero, older, 1), 1)
  return older.shape[-1] * jax.nn.softmax(ratios / temperature)


def weighted_sum_loss(
  losses: jax.typing.ArrayLike, weights: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  r""":math:`\sum_t w_t L_t` with the weights held constant (DWA's loss)."""
  dtype = compute_dtype(losses, weights)
  weights = jax.lax.stop_gradient(jnp.asarray(weights, dtype))
  return jnp.sum(weights * jnp.asarray(losses, dtype)), weights


def famo_loss(
  losses: jax.typing.ArrayLike, logits: jax.typing.ArrayLike, min_losses: jax.typing.ArrayLike
) -> tuple[jax.Array, jax.Array]:
  r"""FAMO's loss :math:`c \sum_t z_t \log(L_t - b_t + \epsilon)`.

  Liu et al. (2023): :math:`z = \operatorname{softmax}(\xi)` and :math:`c = (\sum_t z_t / (L_t - b_t
  + \epsilon))^{-1}` and :math:`z` are held constant, so the gradient is
  :math:`\sum_t c z_t \nabla L_t / (L_t - b_t + \epsilon)`, a convex combination
  of the task gradients (the weights sum to 1).
  """
  dtype = compute_dtype(losses, logits, min_losses)
  losses = jnp.asarray(losses, dtype)
  task_weights = jax.lax.stop_gradient(jax.nn.softmax(jnp.asarray(logits, dtype)))
  shifted = losses - jnp.asarray(min_losses, dtype) + FAMO_EPSILON
  normaliser = jax.lax.stop_gradient(jnp.sum(task_weights / shifted))
  weights = task_weights / normaliser
  return jnp.sum(weights * jnp.log(shifted)), jax.lax.stop_gradient(weights / shifted)


def famo_logits_gradient(
  logits: jax.typing.ArrayLike,
  before: jax.typing.ArrayLike,
  after: jax.typing.ArrayLike,
  min_losses: jax.typing.ArrayLike,
) -> jax.Array:
  r"""FAMO's gradient for the logits :math:`\xi`: :math:`J_z(\xi)^\top \delta`.

  Liu et al. (2023): :math:`\delta_t = \log(L_t^{\text{before}}
  - b_t + \epsilon) - \log(L_t^{\text{after}} - b_t + \epsilon)` is task t's decrease
  of log-loss over a step, and :math:`J_z` the Jacobian of
  :math:`z = \operatorname{softmax}(\xi)`: :math:`(J_z^\top \delta)_t = z_t (\delta_t -
  z^\top \delta)`. A descent step on it moves weight to the tasks whose log-loss
  decreased least.
  """
  dtype = compute_dtype(before, after, logits)
  min_losses = jnp.asarray(min_losses, dtype)
  decrease = jnp.log(jnp.asarray(before, dtype) - min_losses + FAMO_EPSILON) - jnp.log(
    jnp.asarray(after, dtype) - min_losses + FAMO_EPSILON
  )
  task_weights = jax.nn.softmax(jnp.asarray(logits, dtype))
  return task_weights * (decrease - jnp.dot(task_weights, decrease))
