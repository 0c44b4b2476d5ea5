"""The methods the multilingual experiment can run: one registry, one entry per method.

A method is either a **transformation of the stacked task gradients** (the sum, PCGrad,
GradVac and every other Gram-based method of the library: ``tx.update(task_grads, state,
params)``, optionally with ``losses=``) or a **loss weighting** (a
:class:`~optax_gradvac.LossWeighting`: one gradient of a combination of the
task losses per step, no per-task gradients). :func:`~optax_gradvac.examples.train.train`
takes either. Adding a method is one entry of :data:`REGISTRY`; for example::

  "fairgrad": Entry(lambda s: ogv.fairgrad(s.num_tasks, granularity=s.granularity), "FairGrad"),

The static weightings of the sum (``sum_low*``, ``temperature*``) are loss weightings: the
sum with fixed per-language weights, normalised to mean 1 (Adam after the step makes the
overall scale irrelevant).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_gradvac as ogv
from optax_gradvac.examples import train as train_lib


@dataclasses.dataclass(frozen=True)
class Setting:
  """What a method's factory may use.

  Attributes:
    num_tasks: the number of languages.
    granularity: the parameter groups of the surgery.
    beta: the EMA rate of the GradVac targets.
    seed: the seed of the run (random visiting orders, random weights).
    low_resource: bool ``[T]``, which languages are low-resource (``None`` if unknown).
    train_sizes: int ``[T]``, each language's number of training words (``None`` if unknown).
  """

  num_tasks: int
  granularity: str
  beta: float
  seed: int
  low_resource: np.ndarray | None = None
  train_sizes: np.ndarray | None = None

  def data_dependent(self, name: str) -> np.ndarray:
    """The field ``name`` (``"low_resource"`` or ``"train_sizes"``), which must be known.

    Raises:
      ValueError: if it is ``None``.
    """
    value = getattr(self, name)
    if value is None:
      raise ValueError(f"this method weights the languages by {name}: pass the data")
    return value


Built = optax.GradientTransformation | train_lib.LossWeighting


@dataclasses.dataclass(frozen=True)
class Entry:
  """One method of the registry.

  Attributes:
    build: the factory, from a :class:`Setting` to a transformation of the stacked task
      gradients or a :class:`~optax_gradvac.LossWeighting`.
    summary: what it does, in a few words (for ``--help`` and the tables).
    granularity: its parameter groups: ``"model"`` (the whole model, as in the papers of
      most methods), or ``None`` to follow ``--granularity``.
    per_granularity: whether ``--granularity both`` runs it once per layer and once on the
      whole model (as ``NAME-layer`` and ``NAME-model``).
    takes_losses: whether its ``update`` takes the per-task losses as ``losses=``.
    recompute_losses: for a loss weighting: whether its ``update`` takes the losses
      recomputed after the step (``losses_after_step=``, FAMO's).
    similarity: the field of its state to cluster the languages by: ``"targets"`` (GradVac's
      EMA goals), ``"cosine"`` (the task-gradient cosine) or ``None``.
    static: whether it is a static weighting of the sum (the race runs these at the sum's
      learning rate rather than tuning them).
  """

  build: Callable[[Setting], Built]
  summary: str
  granularity: str | None = "model"
  per_granularity: bool = False
  takes_losses: bool = False
  recompute_losses: bool = False
  similarity: str | None = None
  static: bool = False


def static_weights(weights: np.ndarray) -> train_lib.LossWeighting:
  """The sum of the task losses with fixed weights, normalised to mean 1.

  Args:
    weights: positive ``[T]`` weights.

  Returns:
    A loss weighting without learned parameters or state.
  """
  weights = np.asarray(weights, np.float64)
  if weights.ndim != 1 or not np.all(weights > 0):
    raise ValueError(f"static weights must be a positive vector, got {weights}")
  normalized = (weights / weights.mean()).astype(np.float32)

  def init(dtype: jnp.dtype = jnp.float32) -> tuple:
    del dtype
    return ()

  def init_params(dtype: jnp.dtype = jnp.float32) -> None:
    del dtype

  def loss(losses: jax.Array, state: tuple, params: None = None) -> tuple[jax.Array, jax.Array]:
    del state, params
    if losses.shape != normalized.shape:
      raise ValueError(f"{len(normalized)} static weights for losses of shape {losses.shape}")
    return jnp.dot(normalized, losses), jnp.asarray(normalized)

  def update(losses: jax.Array, state: tuple, *, losses_after_step: None = None) -> tuple:
    del losses, losses_after_step
    return state

  return train_lib.LossWeighting(init, init_params, loss, update)


def low_resource_weights(factor: float) -> Callable[[Setting], train_lib.LossWeighting]:
  """The sum with the low-resource languages' losses weighted ``factor`` times the others'."""
  return lambda s: static_weights(np.where(s.data_dependent("low_resource"), factor, 1.0))


def temperature_weights(temperature: float) -> Callable[[Setting], train_lib.LossWeighting]:
  """The sum with language ``l`` weighted ``n_l ** (1 / temperature)`` (``n_l`` words).

  This is the expected batch of temperature-based sampling of languages (Arivazhagan et
  al. 2019, the baseline of Wang et al. 2021): drawing each word's language with
  probability proportional to ``n_l ** (1 / temperature)`` gives language ``l`` that share
  of a batch's words, hence of its gradient. The batches stay those of the other methods
  (the same number of words of every language); only their weights change.
  """

  def build(s: Setting) -> train_lib.LossWeighting:
    sizes = np.asarray(s.data_dependent("train_sizes"), np.float64)
    return static_weights(sizes ** (1 / temperature))

  return build


def _sum_with_cosine_probe(s: Setting) -> optax.GradientTransformation:
  # The probe's update is discarded: it only records the task-gradient cosine of the run.
  probe = ogv.gradvac(s.num_tasks, s.beta, granularity=s.granularity, key=s.seed)
  return train_lib.with_probe(ogv.sum_tasks(s.num_tasks), probe)


# The example samples batches without epochs: DWA's "epoch" is a window of this many steps
# (the default evaluation interval).
DWA_STEPS_PER_EPOCH = 50

REGISTRY: dict[str, Entry] = {
  "sum": Entry(
    _sum_with_cosine_probe,
    "the plain sum of the task gradients",
    granularity=None,
    similarity="cosine",
  ),
  "pcgrad": Entry(
    lambda s: ogv.pcgrad(s.num_tasks, granularity=s.granularity, key=s.seed), "PCGrad"
  ),
  "gradvac": Entry(
    lambda s: ogv.gradvac(s.num_tasks, s.beta, granularity=s.granularity, key=s.seed),
    "GradVac",
    granularity=None,
    per_granularity=True,
    similarity="targets",
  ),
  "mean": Entry(lambda s: ogv.mean_tasks(s.num_tasks), "the mean of the task gradients"),
  "mgda": Entry(lambda s: ogv.mgda(s.num_tasks, granularity=s.granularity), "MGDA"),
  "imtl_g": Entry(lambda s: ogv.imtl_g(s.num_tasks, granularity=s.granularity), "IMTL-G"),
  "aligned_mtl": Entry(
    lambda s: ogv.aligned_mtl(s.num_tasks, granularity=s.granularity), "Aligned-MTL"
  ),
  "cagrad": Entry(lambda s: ogv.cagrad(s.num_tasks, granularity=s.granularity), "CAGrad"),
  "upgrad": Entry(lambda s: ogv.upgrad(s.num_tasks, granularity=s.granularity), "UPGrad"),
  "nash_mtl": Entry(lambda s: ogv.nash_mtl(s.num_tasks, granularity=s.granularity), "Nash-MTL"),
  "fairgrad": Entry(lambda s: ogv.fairgrad(s.num_tasks, granularity=s.granularity), "FairGrad"),
  "dualproj": Entry(lambda s: ogv.dualproj(s.num_tasks, granularity=s.granularity), "DualProj"),
  "config": Entry(lambda s: ogv.config(s.num_tasks, granularity=s.granularity), "ConFIG"),
  "rlw": Entry(
    lambda s: ogv.rlw(s.num_tasks, granularity=s.granularity, key=s.seed),
    "random loss weighting",
  ),
  "gradnorm": Entry(
    lambda s: ogv.gradnorm(s.num_tasks, granularity=s.granularity),
    "GradNorm",
    takes_losses=True,
  ),
  # Loss weightings: one gradient of a weighted loss per step, no per-task gradients.
  "uw": Entry(lambda s: ogv.uw(s.num_tasks), "uncertainty weighting"),
  "dwa": Entry(
    lambda s: ogv.dwa(s.num_tasks, steps_per_epoch=DWA_STEPS_PER_EPOCH),
    "dynamic weight average",
  ),
  "gls": Entry(lambda s: ogv.gls(s.num_tasks), "the geometric mean of the losses"),
  "stch": Entry(lambda s: ogv.stch(s.num_tasks), "smooth Tchebycheff scalarization"),
  "famo": Entry(lambda s: ogv.famo(s.num_tasks), "FAMO", recompute_losses=True),
  "imtl_l": Entry(lambda s: ogv.imtl_l(s.num_tasks), "IMTL-L"),
  # The static-weight front of the sum, and temperature-based sampling in expectation.
  "sum_low2": Entry(
    low_resource_weights(2.0), "the sum, low-resource losses weighted 2x", static=True
  ),
  "sum_low4": Entry(
    low_resource_weights(4.0), "the sum, low-resource losses weighted 4x", static=True
  ),
  "sum_low8": Entry(
    low_resource_weights(8.0), "the sum, low-resource losses weighted 8x", static=True
  ),
  "temperature5": Entry(
    temperature_weights(5.0), "the sum, languages weighted n ** (1/5)", static=True
  ),
  "temperature2": Entry(
    temperature_weights(2.0), "the sum, languages weighted n ** (1/2)", static=True
  ),
}
