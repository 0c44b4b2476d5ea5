"""The loss weightings against torchjd 0.18's scalarizers, on the same losses.

For every method both sides run the same sequence of positive per-task losses for
several steps, with the same learned parameters (random log-variances and
log-scales for UW and IMTL-L, drawn afresh each step) and the same hyper-parameters,
and this compares, step by step:

- the scalar loss;
- the weights: torchjd's are the autograd derivative of its scalar in the losses,
  ours the `weights` that `loss` returns (which the tests check equal `jax.grad` of
  our loss);
- UW's and IMTL-L's gradient in their learned parameters (autograd on both sides);
- the state: FAMO's logits after every update (torchjd's internal Adam against ours),
  with the losses recomputed after the step (torchjd's `update(new_losses)`) and
  without (torchjd's `update` called with the next step's losses before its
  forward), and DWA's weights over epochs (torchjd's `step()` every
  `steps_per_epoch` calls).

Ours runs jitted in float64 and in float32, torchjd in float64; the relative error
of a quantity is its largest difference over its largest magnitude, the worst over
the steps. One more row checks LibMTL's STCH recipe (the official multi-task code's:
normalised log-losses, preferences 1, times T, the maximum subtracted without being
added back): written out in torch from its definition, against our `stch` applied to
`log(losses / nadir)`, its loss shifted and scaled back and its gradient in the
losses divided by T.

  python benchmarks/peers_losses.py [--quick]
  # needs benchmarks/requirements-peers.txt
"""

import importlib.metadata
from collections.abc import Callable, Sequence
from typing import Any

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchjd.scalarization import DWA, FAMO, IMTLL, STCH, UW, GeometricMean

import optax_gradvac as ogv

# float64 for the comparisons, within main() only (jax.enable_x64 from jax 0.8).
if hasattr(jax, "enable_x64"):
  enable_x64 = jax.enable_x64
else:
  from jax.experimental import enable_x64

MU = 0.5
STEPS_PER_EPOCH = 3
TOLERANCE = {"float64": 1e-12, "float32": 1e-4}


def relative_error(ours: Any, theirs: Any) -> float:
  """Largest absolute difference over the largest magnitude of the reference."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def loss_sequence(num_tasks: int, steps: int, seed: int) -> np.ndarray:
  """``[steps + 1, T]`` positive losses of different scales, falling at different rates."""
  rng = np.random.default_rng(seed)
  scales = np.exp(rng.uniform(-2, 2, num_tasks))
  rates = rng.uniform(0.8, 1.0, num_tasks)
  noise = rng.uniform(0.85, 1.15, (steps + 1, num_tasks))
  return scales * rates ** np.arange(steps + 1)[:, None] * noise


class Ours:
  """One jitted step of an optax_gradvac weighting: loss, weights, parameter gradient, state."""

  def __init__(self, weighting: ogv.LossWeighting, dtype: Any) -> None:
    self.weighting, self.dtype = weighting, dtype
    self.state = weighting.init(dtype)

    def step(losses, state, params, after):
      (loss, weights), params_grad = jax.value_and_grad(weighting.loss, argnums=2, has_aux=True)(
        losses, state, params
      )
      return loss, weights, params_grad, weighting.update(losses, state, losses_after_step=after)

    self.step_fn = jax.jit(step)

  def step(self, losses: np.ndarray, params: np.ndarray | None, after: np.ndarray | None) -> tuple:
    def cast(array: np.ndarray | None) -> jax.Array | None:
      return None if array is None else jnp.asarray(array, self.dtype)

    loss, weights, params_grad, self.state = self.step_fn(
      cast(losses), self.state, cast(params), cast(after)
    )
    return loss, weights, params_grad


def theirs_step(
  scalarizer: torch.nn.Module, losses: np.ndarray, learned: str | None, params: np.ndarray | None
) -> tuple:
  """torchjd's scalar, its derivative in the losses and in the learned parameters."""
  values = torch.tensor(losses, requires_grad=True)
  inputs = [values]
  if learned is not None:
    parameter = getattr(scalarizer, learned)
    with torch.no_grad():
      parameter.copy_(torch.tensor(params))
    inputs.append(parameter)
  output = scalarizer(values)
  grads = torch.autograd.grad(output, inputs)
  return (
    output.item(),
    grads[0].numpy(),
    None if learned is None else grads[1].numpy(),
  )


def compare(
  name: str,
  make_ours: Callable[[], ogv.LossWeighting],
  make_theirs: Callable[[], torch.nn.Module],
  num_tasks: int,
  steps: int,
  mode: str = "",
) -> tuple[Any, ...]:
  """Runs both for ``steps`` steps; returns a table row."""
  losses = loss_sequence(num_tasks, steps, seed=len(name) + len(mode))
  rng = np.random.default_rng(1)
  afters = losses[:-1] * rng.uniform(0.85, 1.05, (steps, num_tasks))
  learned = {"uw": "log_var", "imtl_l": "log_scale"}.get(name)
  errors: dict[str, dict[str, float]] = {}
  for dtype_name, dtype in (("float64", jnp.float64), ("float32", jnp.float32)):
    ours, theirs = Ours(make_ours(), dtype), make_theirs().double()
    worst = errors[dtype_name] = {"loss": 0.0, "weights": 0.0, "state": 0.0}
    for k in range(steps):
      params = None if learned is None else rng.normal(size=num_tasks)
      recompute = mode == "recomputed"
      if name == "famo" and mode == "not recomputed" and k > 0:
        theirs.update(torch.tensor(losses[k]))  # the next step's losses as the after-step ones
      loss, weights, params_grad = ours.step(losses[k], params, afters[k] if recompute else None)
      their_loss, their_weights, their_params_grad = theirs_step(theirs, losses[k], learned, params)
      worst["loss"] = max(worst["loss"], relative_error(loss, their_loss))
      worst["weights"] = max(worst["weights"], relative_error(weights, their_weights))
      if learned is not None:
        worst["state"] = max(worst["state"], relative_error(params_grad, their_params_grad))
      if name == "famo":
        if recompute:
          theirs.update(torch.tensor(afters[k]))
        worst["state"] = max(
          worst["state"], relative_error(ours.state.logits, theirs._w.detach().numpy())
        )
      if name == "dwa" and (k + 1) % STEPS_PER_EPOCH == 0:
        theirs.step()
  agree = all(
    value <= TOLERANCE[dtype_name] for dtype_name in errors for value in errors[dtype_name].values()
  )
  state_column = {"uw": "grad log_var", "imtl_l": "grad log_scale", "famo": "logits"}.get(name, "-")
  return (
    f"{name} {mode}".strip(),
    num_tasks,
    steps,
    errors["float64"]["loss"],
    errors["float64"]["weights"],
    f"{state_column}: {errors['float64']['state']:.3g}" if state_column != "-" else "-",
    max(errors["float32"].values()),
    "yes" if agree else "NO",
  )


def libmtl_stch_row(num_tasks: int, steps: int) -> tuple[Any, ...]:
  """LibMTL's STCH after its warm-up, written out in torch, against ``stch`` on log-ratios."""
  losses = loss_sequence(num_tasks, steps, seed=11)
  nadir = losses[:3].mean(axis=0)  # LibMTL: the mean losses of its warm-up epoch
  weighting = ogv.stch(num_tasks, mu=MU, preferences=jnp.ones(num_tasks))

  @jax.jit
  def ours(losses):
    def loss_fn(losses):
      log_ratios = jnp.log(losses / nadir)
      return weighting.loss(log_ratios, weighting.init(jnp.float64))[0], jnp.max(log_ratios)

    return jax.value_and_grad(loss_fn, has_aux=True)(losses)

  loss_error = grad_error = 0.0
  for k in range(3, steps):
    values = torch.tensor(losses[k], requires_grad=True)
    log_ratios = torch.log(values / torch.tensor(nadir) + 1e-20)
    shifted = log_ratios - log_ratios.max().detach()
    theirs = MU * torch.log(torch.sum(torch.exp(shifted / MU))) * num_tasks
    (their_grad,) = torch.autograd.grad(theirs, values)
    (loss, largest), grad = ours(jnp.asarray(losses[k]))
    loss_error = max(loss_error, relative_error(loss, theirs.item() / num_tasks + float(largest)))
    grad_error = max(grad_error, relative_error(grad, their_grad.numpy() / num_tasks))
  agree = max(loss_error, grad_error) <= TOLERANCE["float64"]
  return (
    "stch, LibMTL's recipe",
    num_tasks,
    steps - 3,
    loss_error,
    grad_error,
    "-",
    "-",
    "yes" if agree else "NO",
  )


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the agreement table; returns it."""
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  num_tasks, steps = (3, 6) if args.quick else (5, 12)
  rng = np.random.default_rng(0)
  preferences = rng.dirichlet(np.ones(num_tasks))
  reference = rng.uniform(0, 0.1, num_tasks)
  min_losses = np.linspace(0, 0.01, num_tasks)
  cases = [
    ("uw", lambda: ogv.uw(num_tasks), lambda: UW(num_tasks), ""),
    ("imtl_l", lambda: ogv.imtl_l(num_tasks), lambda: IMTLL(num_tasks), ""),
    ("gls", lambda: ogv.gls(num_tasks), GeometricMean, ""),
    (
      "stch",
      lambda: ogv.stch(num_tasks, mu=MU, preferences=preferences, reference=reference),
      lambda: STCH(MU, torch.tensor(preferences), torch.tensor(reference)),
      "",
    ),
    (
      "dwa",
      lambda: ogv.dwa(num_tasks, steps_per_epoch=STEPS_PER_EPOCH),
      DWA,
      "",
    ),
  ]
  cases += [
    (
      "famo",
      lambda: ogv.famo(num_tasks, min_losses=min_losses),
      lambda: FAMO(num_tasks, torch.tensor(min_losses)),
      mode,
    )
    for mode in ("recomputed", "not recomputed")
  ]
  print("# optax_gradvac's loss weightings vs torchjd")
  print(
    f"{_harness.machine_line()}; torch {torch.__version__}, "
    f"torchjd {importlib.metadata.version('torchjd')}"
  )
  with enable_x64(True):
    rows = [
      compare(name, ours, theirs, num_tasks, steps, mode) for name, ours, theirs, mode in cases
    ]
    rows.append(libmtl_stch_row(num_tasks, steps))
  table = _harness.markdown_table(
    (
      "method",
      "T",
      "steps",
      "float64: loss",
      "float64: weights",
      "float64: learned or state",
      "float32: worst",
      f"agree ({TOLERANCE['float64']:g} / {TOLERANCE['float32']:g})",
    ),
    rows,
  )
  print("\n## Agreement: max relative error against torchjd (float64), same losses\n")
  print(table)
  return table


if __name__ == "__main__":
  main()
