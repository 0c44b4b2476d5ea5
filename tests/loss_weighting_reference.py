"""The loss-weighting methods from their papers, in float64 numpy with plain loops.

Each function returns ``(loss, weights)`` for one step, ``weights[t]`` being the
derivative of the loss in ``L_t`` (the weight of task t's gradient); the stateful
methods are classes stepped one training step at a time. Nothing here is shared
with the library: the formulas are written out as the papers state them (the
product, not its logarithm, for the geometric mean; FAMO's Adam written out).
"""

import numpy as np


def uw(losses: np.ndarray, log_variances: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
  """Kendall et al. 2018: sum_t L_t / (2 sigma_t^2) + log sigma_t, s_t = log sigma_t^2.

  Returns the loss, the weights and the gradient in s.
  """
  variances = np.exp(log_variances)
  loss = sum(
    losses[t] / (2 * variances[t]) + np.log(np.sqrt(variances[t])) for t in range(len(losses))
  )
  return loss, 1 / (2 * variances), 0.5 - losses / (2 * variances)


def imtl_l(losses: np.ndarray, log_scales: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
  """Liu et al. 2021, IMTL-L: sum_t e^{s_t} L_t - s_t. Returns loss, weights, gradient in s."""
  scales = np.exp(log_scales)
  return float(np.sum(scales * losses - log_scales)), scales, scales * losses - 1


def gls(losses: np.ndarray) -> tuple[float, np.ndarray]:
  """Chennupati et al. 2019: the T-th root of the product of the losses."""
  num_tasks = len(losses)
  product = 1.0
  for loss in losses:
    product *= loss
  geometric_mean = product ** (1 / num_tasks)
  # d/dL_t (prod_s L_s)^(1/T) = (1/T) (prod_s L_s)^(1/T - 1) prod_{s != t} L_s.
  weights = np.array(
    [
      product ** (1 / num_tasks - 1) / num_tasks * np.prod(np.delete(losses, t))
      for t in range(num_tasks)
    ]
  )
  return geometric_mean, weights


def stch(
  losses: np.ndarray, mu: float, preferences: np.ndarray, reference: np.ndarray
) -> tuple[float, np.ndarray]:
  """Lin et al. 2024: mu log sum_t exp(lambda_t (L_t - z_t) / mu), shifted by its maximum."""
  exponents = preferences * (losses - reference) / mu
  largest = exponents.max()
  terms = np.exp(exponents - largest)
  return mu * (largest + np.log(terms.sum())), preferences * terms / terms.sum()


class DWA:
  """Liu et al. 2019: lambda = T softmax(r / temperature), r_t = mean_t(e-1) / mean_t(e-2).

  Epochs of ``steps_per_epoch`` steps; weights 1 for the first two epochs; a step
  whose losses are not all finite is left out.
  """

  def __init__(self, num_tasks: int, steps_per_epoch: int, temperature: float) -> None:
    self.num_tasks, self.steps_per_epoch, self.temperature = num_tasks, steps_per_epoch, temperature
    self.epoch_losses: list[np.ndarray] = []
    self.means: list[np.ndarray] = []

  def weights(self) -> np.ndarray:
    if len(self.means) < 2:
      return np.ones(self.num_tasks)
    ratios = self.means[-1] / self.means[-2]
    exponentials = np.exp(ratios / self.temperature)
    return self.num_tasks * exponentials / exponentials.sum()

  def loss(self, losses: np.ndarray) -> tuple[float, np.ndarray]:
    weights = self.weights()
    return float(weights @ losses), weights

  def update(self, losses: np.ndarray) -> None:
    if not np.isfinite(losses).all():
      return
    self.epoch_losses.append(losses)
    if len(self.epoch_losses) == self.steps_per_epoch:
      self.means.append(np.mean(self.epoch_losses, axis=0))
      self.epoch_losses = []


class FAMO:
  """Liu et al. 2023, with the official code's optimiser for the logits.

  ``torch.optim.Adam(lr, weight_decay)``: the decay is added to the gradient,
  then Adam with betas (0.9, 0.999) and eps 1e-8 outside the square root. The
  loss uses z = softmax(xi); after the step, the logits descend on
  J_softmax^T delta, delta the decrease of log(L - b + 1e-8) over the step.
  ``update(before)`` without ``after`` defers the step to the next call of
  ``loss``, which takes that step's losses as the after-step ones.
  """

  epsilon = 1e-8

  def __init__(self, num_tasks: int, lr: float, weight_decay: float, min_losses: np.ndarray):
    self.lr, self.weight_decay, self.min_losses = lr, weight_decay, min_losses
    self.logits = np.zeros(num_tasks)
    self.first_moment, self.second_moment, self.steps = np.zeros(num_tasks), np.zeros(num_tasks), 0
    self.waiting: np.ndarray | None = None

  def usable(self, losses: np.ndarray) -> bool:
    return bool(np.isfinite(losses).all() and (losses - self.min_losses + self.epsilon > 0).all())

  def step(self, before: np.ndarray, after: np.ndarray) -> None:
    if not (self.usable(before) and self.usable(after)):
      return
    delta = np.log(before - self.min_losses + self.epsilon) - np.log(
      after - self.min_losses + self.epsilon
    )
    z = np.exp(self.logits) / np.exp(self.logits).sum()
    jacobian = np.diag(z) - np.outer(z, z)  # d z_i / d xi_j, symmetric
    gradient = jacobian.T @ delta + self.weight_decay * self.logits
    self.steps += 1
    self.first_moment = 0.9 * self.first_moment + 0.1 * gradient
    self.second_moment = 0.999 * self.second_moment + 0.001 * gradient**2
    first = self.first_moment / (1 - 0.9**self.steps)
    second = self.second_moment / (1 - 0.999**self.steps)
    self.logits = self.logits - self.lr * first / (np.sqrt(second) + 1e-8)

  def loss(self, losses: np.ndarray) -> tuple[float, np.ndarray]:
    if self.waiting is not None:
      self.step(self.waiting, losses)
      self.waiting = None
    z = np.exp(self.logits) / np.exp(self.logits).sum()
    shifted = losses - self.min_losses + self.epsilon
    c = 1 / np.sum(z / shifted)
    return float(c * np.sum(z * np.log(shifted))), c * z / shifted

  def update(self, before: np.ndarray, after: np.ndarray | None = None) -> None:
    """Call after ``loss(before)``."""
    if after is not None:
      self.step(before, after)
    elif self.usable(before):
      self.waiting = before
