"""Training loop and held-out evaluation for the multilingual example.

:func:`train` takes any gradient-surgery transformation (stacked per-task gradients in, one
update out), chains Adam after it, trains :class:`~optax_gradvac.examples.model.CharTransformer`
on task-separated batches and returns a :class:`History`. Everything the surgery transform
keeps in its state under the names ``targets``, ``cosine`` and ``corrected`` (as
:class:`optax_gradvac.GradVacState` does) is recorded along the way. It also takes a
:class:`LossWeighting` instead: then each step is one gradient of a combination of the task
losses, without per-task gradients.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import optax_gradvac as ogv
from optax_gradvac.examples import data as data_lib
from optax_gradvac.examples import model as model_lib


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Model size, optimiser and schedule of one training run.

  Attributes:
    steps: the number of training steps.
    batch_words: the number of words per language per step.
    learning_rate: Adam's peak learning rate (linear warm-up, then cosine decay to a tenth).
    warmup_steps: the length of the warm-up.
    d_model: the model width.
    num_layers: the number of transformer blocks.
    num_heads: the number of attention heads.
    eval_every: the held-out evaluation period, in steps (the last step is always evaluated).
  """

  steps: int = 600
  batch_words: int = 32
  learning_rate: float = 3e-3
  warmup_steps: int = 30
  d_model: int = 128
  num_layers: int = 2
  num_heads: int = 4
  eval_every: int = 50


LossWeighting = ogv.LossWeighting  # the library's: one gradient of a weighted loss


@dataclasses.dataclass(frozen=True, eq=False)
class History:
  """What one training run recorded.

  Attributes:
    train_loss: float ``[steps, T]``, each language's training loss (nats per character).
    eval_steps: int ``[num_evals]``, the steps after which the held-out set was scored.
    heldout_bpc: float ``[num_evals, T]``, held-out bits per character at those steps.
    targets: float ``[T, T]``, the surgery state's final ``targets`` averaged over parameter
      groups, or ``None`` if the state has none.
    cosine: float ``[T, T]``, the state's ``cosine`` (cosine similarity of the original task
      gradients) averaged over parameter groups and over the second half of training, or
      ``None`` if the state has none.
    corrected_fraction: float ``[steps]``, the fraction of ordered task pairs (over all
      groups) that the surgery corrected at each step, or ``None``.
    seconds: the wall time of the run, compilation included.
    validation_bpc: float ``[num_evals, T]``, validation bits per character at the same
      steps, or ``None`` without a validation split.
  """

  train_loss: np.ndarray
  eval_steps: np.ndarray
  heldout_bpc: np.ndarray
  targets: np.ndarray | None
  cosine: np.ndarray | None
  corrected_fraction: np.ndarray | None
  seconds: float
  validation_bpc: np.ndarray | None = None

  @property
  def final_bpc(self) -> np.ndarray:
    """Held-out bits per character of each language after the last step, ``[T]``."""
    return self.heldout_bpc[-1]


def with_probe(
  transform: optax.GradientTransformation, probe: optax.GradientTransformation
) -> optax.GradientTransformationExtraArgs:
  """Runs ``probe`` beside ``transform`` on the same stacked gradients, to record its state.

  The update is ``transform``'s alone; ``probe``'s update is discarded (and compiled away
  under ``jit``). With ``probe = ogv.gradvac(...)`` this records the task-gradient cosine
  of a run that trains with a plain sum.

  Args:
    transform: the transformation whose update is used.
    probe: a transformation with the same input contract, run only for its state.

  Returns:
    A transformation whose state is ``(transform_state, probe_state)``.
  """

  def init(params: optax.Params) -> tuple[optax.OptState, optax.OptState]:
    return transform.init(params), probe.init(params)

  def update(
    updates: optax.Updates,
    state: tuple[optax.OptState, optax.OptState],
    params: optax.Params | None = None,
    **extra_args: Any,
  ) -> tuple[optax.Updates, tuple[optax.OptState, optax.OptState]]:
    transform_state, probe_state = state
    new_updates, transform_state = transform.update(updates, transform_state, params, **extra_args)
    _, probe_state = probe.update(updates, probe_state, params)
    return new_updates, (transform_state, probe_state)

  return optax.GradientTransformationExtraArgs(init, update)


def make_optimizer(
  surgery: optax.GradientTransformation, config: TrainConfig
) -> optax.GradientTransformation:
  """Chains ``surgery`` (stacked task gradients to one update) with scheduled Adam.

  Args:
    surgery: e.g. ``ogv.gradvac(num_tasks)`` or ``ogv.sum_tasks(num_tasks)``.
    config: gives the learning-rate schedule.

  Returns:
    ``optax.chain(surgery, optax.adam(schedule))``.
  """
  schedule = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=config.warmup_steps,
    decay_steps=config.steps,
    end_value=config.learning_rate / 10,
  )
  return optax.chain(surgery, optax.adam(schedule))


def _group_mean(state: optax.OptState, name: str) -> jax.Array | None:
  """The ``[num_groups, T, T]`` field ``name`` of the surgery state, averaged over groups."""
  value = optax.tree.get(state, name)
  return None if value is None else jnp.mean(value.astype(jnp.float32), axis=0)


def train(
  surgery: optax.GradientTransformation | LossWeighting,
  data: data_lib.MultilingualData,
  config: TrainConfig,
  *,
  seed: int = 0,
  batches: np.ndarray | None = None,
  description: str | None = None,
  progress: bool = True,
  steps_per_call: int = 25,
  pass_losses: bool = False,
  recompute_losses: bool = False,
  progress_row: int | None = None,
) -> History:
  """Trains the character model on all languages at once with ``surgery`` then Adam.

  Each step draws ``config.batch_words`` words per language, computes one loss and one
  gradient per language (``ogv.task_value_and_grad``), and hands the stacked gradients to
  ``surgery``. A :class:`LossWeighting` instead gets the losses, and the step is the
  gradient of the scalar it makes of them.

  Up to ``steps_per_call`` steps run in one call of a compiled ``lax.fori_loop``. On XLA:CPU
  each call allocates the step's temporaries afresh (282 MiB for the default model), and glibc
  hands a block that large back to the OS when it is freed: at one step per call, faulting
  those pages in again was a quarter of the CPU time of a run. The results do not depend on
  ``steps_per_call``: the loop runs the same step on the same data.

  Args:
    surgery: a transformation from stacked ``[T, ...]`` gradients to one update, or a
      :class:`LossWeighting`.
    data: the encoded words.
    config: model size, optimiser and schedule.
    seed: the seed of the initial parameters, and of the batches when ``batches`` is None.
    batches: int ``[config.steps, T, config.batch_words]`` word indices from
      :func:`~optax_gradvac.examples.data.sample_batches`; pass the same array to compare
      methods on the same data order.
    description: the progress-bar label.
    progress: whether to show a progress bar.
    steps_per_call: the most training steps per call of the compiled loop; calls also end
      at each held-out evaluation.
    pass_losses: whether to pass the task losses to ``surgery``'s update as ``losses=``.
    recompute_losses: for a :class:`LossWeighting`: whether to pass it the losses
      recomputed on the same batch after the step (one more forward pass).
    progress_row: the terminal row of the progress bar, for runs side by side in several
      processes (the bar is then erased when the run ends); ``None`` for a single bar, left
      on screen.

  Returns:
    The recorded :class:`History`.
  """
  start = time.perf_counter()
  if batches is None:
    batches = data_lib.sample_batches(data, config.steps, config.batch_words, seed)
  model = model_lib.CharTransformer(
    vocab_size=len(data.symbols),
    max_length=data.seq_len,
    d_model=config.d_model,
    num_layers=config.num_layers,
    num_heads=config.num_heads,
  )
  params = model_lib.init_params(model, data.seq_len, seed)
  loss_fn = model_lib.make_loss(model)
  tasks = jnp.arange(data.num_tasks)[:, None]
  train_tokens = jnp.asarray(data.train_tokens)

  if not isinstance(surgery, optax.GradientTransformation):
    optimizer = make_optimizer(optax.identity(), config)
    # The weighting's learned parameters ride beside the model's, trained by the same Adam.
    params = {"model": params, "weighting": surgery.init_params()}
    opt_state = (optimizer.init(params), surgery.init())
    task_losses = jax.vmap(loss_fn, in_axes=(None, 0))

    def step(params, opt_state, train_tokens, indices):
      adam_state, weighting_state = opt_state
      tokens = train_tokens[tasks, indices]

      def total(params):
        losses = task_losses(params["model"], tokens)
        return surgery.loss(losses, weighting_state, params["weighting"])[0], losses

      (_, losses), grads = jax.value_and_grad(total, has_aux=True)(params)
      updates, adam_state = optimizer.update(grads, adam_state, params)
      params = optax.apply_updates(params, updates)
      after = {}
      if recompute_losses:
        after["losses_after_step"] = task_losses(params["model"], tokens)
      weighting_state = surgery.update(losses, weighting_state, **after)
      return params, (adam_state, weighting_state), {"loss": losses}

    def model_params(params):
      return params["model"]

  else:
    optimizer = make_optimizer(surgery, config)
    opt_state = optimizer.init(params)
    task_value_and_grad = ogv.task_value_and_grad(loss_fn)

    # The word arrays and batches are arguments, not closed-over constants, so that they stay
    # out of the compiled program.
    def step(params, opt_state, train_tokens, indices):
      losses, grads = task_value_and_grad(params, train_tokens[tasks, indices])
      extra_args = {"losses": losses} if pass_losses else {}
      updates, opt_state = optimizer.update(grads, opt_state, params, **extra_args)
      stats = {"loss": losses}
      for name in ("cosine", "corrected"):
        value = _group_mean(opt_state, name)
        if value is not None:
          stats[name] = value
      return optax.apply_updates(params, updates), opt_state, stats

    def model_params(params):
      return params

  def run_steps(params, opt_state, train_tokens, batches, first, num_steps):
    """Steps ``first`` to ``first + num_steps - 1`` (``num_steps <= steps_per_call``)."""
    shapes = jax.eval_shape(step, params, opt_state, train_tokens, batches[0])[2]
    stats = jax.tree.map(lambda s: jnp.zeros((steps_per_call, *s.shape), s.dtype), shapes)

    def body(i, carry):
      params, opt_state, stats = carry
      params, opt_state, step_stats = step(params, opt_state, train_tokens, batches[first + i])
      stats = jax.tree.map(lambda all_steps, one: all_steps.at[i].set(one), stats, step_stats)
      return params, opt_state, stats

    return jax.lax.fori_loop(0, num_steps, body, (params, opt_state, stats))

  run_steps = jax.jit(run_steps, donate_argnums=(0, 1))

  # One language at a time: all of them at once needed 1.3 GiB of XLA temporaries for the
  # default model (86 MiB this way), at the same speed.
  def evaluate(params, tokens):
    def one_language(language_tokens):
      return model_lib.bits_per_character(model, params, language_tokens[None])[0]

    return jax.lax.map(one_language, tokens)

  evaluate = jax.jit(evaluate)
  heldout_tokens = jnp.asarray(data.heldout_tokens)
  validation_tokens = None
  if data.validation_tokens is not None:
    validation_tokens = jnp.asarray(data.validation_tokens)

  device_batches = jnp.asarray(batches)
  stats, eval_steps, heldout_bpc, validation_bpc = [], [], [], []
  bar = tqdm(
    total=config.steps,
    desc=description,
    disable=not progress,
    position=progress_row,
    leave=progress_row is None,
  )
  done = 0
  while done < config.steps:
    next_eval = min((done // config.eval_every + 1) * config.eval_every, config.steps)
    num_steps = min(steps_per_call, next_eval - done)
    params, opt_state, call_stats = run_steps(
      params, opt_state, train_tokens, device_batches, done, num_steps
    )
    stats.append({name: value[:num_steps] for name, value in jax.device_get(call_stats).items()})
    done += num_steps
    bar.update(num_steps)
    if done == next_eval:
      eval_steps.append(done)
      heldout_bpc.append(np.asarray(evaluate(model_params(params), heldout_tokens)))
      if validation_tokens is not None:
        validation_bpc.append(np.asarray(evaluate(model_params(params), validation_tokens)))
      bar.set_postfix(heldout_bpc=f"{heldout_bpc[-1].mean():.3f}")
  bar.close()
  stats = jax.tree.map(lambda *values: np.concatenate(values), *stats)

  num_tasks = data.num_tasks
  off_diagonal = num_tasks * (num_tasks - 1)
  targets = _group_mean(opt_state, "targets")
  return History(
    train_loss=stats["loss"],
    eval_steps=np.array(eval_steps),
    heldout_bpc=np.stack(heldout_bpc),
    targets=None if targets is None else np.asarray(targets),
    cosine=stats["cosine"][config.steps // 2 :].mean(0) if "cosine" in stats else None,
    corrected_fraction=(
      stats["corrected"].sum((1, 2)) / off_diagonal if "corrected" in stats else None
    ),
    seconds=time.perf_counter() - start,
    validation_bpc=np.stack(validation_bpc) if validation_bpc else None,
  )
