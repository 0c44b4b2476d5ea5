"""Our transformations against LibMTL's weightings on the same per-task gradients.

LibMTL (PyTorch) implements each method as a weighting mixed into the model:
`backward(losses, **kwargs)` computes the `[T, P]` gradients of the shared
parameters with T backward passes (`AbsWeighting._compute_grad`), combines
them, and writes the update into the parameters' `.grad`. Here the model's
shared parameters are the leaves themselves, one flat parameter per leaf, and
task t's loss is linear, `sum_k <g_k[t], theta_k>`: autograd's gradient of it
is exactly `g_k[t]`, so LibMTL's own path sees exactly the gradients we get.

The agreement check runs LibMTL's whole `backward` (its own backward passes)
beside a copy whose `_compute_grad` returns the given `[T, P]` matrix, for
several steps with state; the timings use the latter (the weighting alone, as
section 4 times torchjd's aggregators alone), ours the jitted update,
repetitions interleaved. GradVac and PCGrad are compared with each other
(LibMTL's `random.shuffle` replaced by the identity, `shuffle=False` for us);
the Gram-based methods, each side against the float64 references of the tests
(`tests/closed_form_reference.py`, `tests/qp_reference.py`).

  python benchmarks/peers_libmtl.py [--quick] [--repeats N] [--only agreement,speed]
  # needs benchmarks/requirements-peers.txt and LibMTL (see benchmarks/README.md)
"""

import argparse
import contextlib
import importlib.metadata
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import Any
from unittest import mock

import _harness
import jax
import numpy as np
import peers  # gradients, our side and the float64 references, as for torchjd
import torch
from LibMTL import weighting as libmtl_weighting

import optax_gradvac as ogv

# Nash_MTL re-solves one cvxpy problem whose parameters enter non-affinely; cvxpy says so
# at every solve.
warnings.filterwarnings("ignore", message="You are solving a parameterized problem that is not DPP")

Leaves = peers.Leaves
CAGRAD_C = 0.5  # ours and LibMTL's default
SLOW_CALL_SECONDS = 10.0  # a LibMTL call slower than this gets at most 3 timed repetitions
GRAM_METHODS = ("imtl_g", "aligned_mtl", "nash_mtl", "mgda", "cagrad", "upgrad")
SPEED_CASES = (
  ("gradvac", "model"),
  ("gradvac", "layer"),
  ("pcgrad", "model"),
  *((method, "model") for method in GRAM_METHODS),
)


def configure(
  method: str, num_tasks: int, granularity: str, *, beta: float = peers.BETA, shuffle: bool = True
) -> tuple[Any, str, dict[str, Any]]:
  """Our transform, LibMTL's weighting class name and its keyword arguments, set alike.

  LibMTL's defaults (`LibMTL/config.py`) are kept except where they would
  change the definition: GradVac gets our beta (its default is 0.5) and group
  type 2 (one group per parameter tensor, our `"layer"` on these one-leaf
  layers) per layer; Nash-MTL gets `max_norm=0` (its default 1 clips the
  update's norm, which we leave to `optax.clip_by_global_norm`). MGDA keeps
  `mgda_gn="none"`, CAGrad `calpha=0.5, rescale=1` (divide by 1 + c^2, our
  default too), UPGrad `norm_eps = reg_eps = 1e-4`.
  """
  if method == "gradvac":
    tx = ogv.gradvac(num_tasks, beta, granularity=granularity, shuffle=shuffle)
    group_type = 0 if granularity == "model" else 2
    return tx, "GradVac", {"GradVac_beta": beta, "GradVac_group_type": group_type}
  if method == "pcgrad":
    return ogv.pcgrad(num_tasks, granularity=granularity, shuffle=shuffle), "PCGrad", {}
  if method == "mgda":
    return ogv.mgda(num_tasks), "MGDA", {"mgda_gn": "none"}
  if method == "cagrad":
    return ogv.cagrad(num_tasks, CAGRAD_C), "CAGrad", {"calpha": CAGRAD_C, "rescale": 1}
  if method == "nash_mtl":
    options = {"update_weights_every": 1, "optim_niter": 20, "max_norm": 0.0}
    return ogv.nash_mtl(num_tasks), "Nash_MTL", options
  if method == "imtl_g":
    return ogv.imtl_g(num_tasks), "IMTL", {}
  if method == "aligned_mtl":
    return ogv.aligned_mtl(num_tasks), "Aligned_MTL", {}
  options = {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4}
  return ogv.upgrad(num_tasks), "UPGrad", options


def libmtl_model(name: str, sizes: Sequence[int], num_tasks: int) -> Any:
  """A LibMTL weighting mixed into a model whose shared parameters are flat leaves.

  What LibMTL's `Trainer` provides (`task_num`, `device`, `rep_grad`, the
  encoder's parameters) is set here; `given`, when set, is returned by
  `_compute_grad` in place of the gradients of the losses.
  """
  base = getattr(libmtl_weighting, name)

  class Model(base):
    def __init__(self) -> None:
      super().__init__()
      self.task_num, self.device, self.rep_grad = num_tasks, torch.device("cpu"), False
      self.encoder = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(n)) for n in sizes])
      for param in self.encoder:
        param.grad = torch.zeros_like(param)  # `_reset_grad` writes only existing `.grad`s
      self.given: torch.Tensor | None = None
      self.init_param()

    def get_share_params(self) -> Iterator[torch.nn.Parameter]:
      return self.encoder.parameters()

    def zero_grad_share_params(self) -> None:
      self.encoder.zero_grad(set_to_none=False)

    def _compute_grad(self, losses: torch.Tensor, mode: str, rep_grad: bool = False) -> Any:
      if self.given is None:
        return super()._compute_grad(losses, mode, rep_grad)
      return self.given

  return Model()


class Theirs:
  """A LibMTL weighting driven on given gradients; its update is the `.grad`s."""

  def __init__(self, name: str, options: dict[str, Any], leaves: Leaves, own: bool) -> None:
    self.model = libmtl_model(name, [leaf.shape[1] for leaf in leaves], len(leaves[0]))
    self.options, self.own = options, own
    # Nash-MTL alone forms its update by `backward` of the weighted losses.
    self.needs_losses = own or name == "Nash_MTL"
    self.placeholder = torch.zeros(len(leaves[0]))

  def losses(self, leaves: list[torch.Tensor]) -> torch.Tensor:
    """Task t's loss `sum_k <leaves[k][t], theta_k>`: its gradient is exactly `leaves[k][t]`."""
    return sum(leaf @ param for leaf, param in zip(leaves, self.model.encoder, strict=True))

  def step(self, leaves: list[torch.Tensor], matrix: torch.Tensor) -> None:
    """One call of the weighting's `backward`, as a training step makes it."""
    self.model.zero_grad_share_params()
    self.model.given = None if self.own else matrix
    losses = self.losses(leaves) if self.needs_losses else self.placeholder
    self.model.backward(losses, **self.options)

  def update(self) -> np.ndarray:
    return torch.cat([p.grad.reshape(-1) for p in self.model.encoder]).detach().numpy()

  def targets(self) -> np.ndarray:
    """GradVac's `[groups, T, T]` targets (LibMTL keeps `rho_T` as `[T, T, groups]`)."""
    return self.model.rho_T.permute(2, 0, 1).numpy()


@contextlib.contextmanager
def libmtl_context(dtype: torch.dtype, ascending: bool) -> Iterator[None]:
  """LibMTL under `dtype`, with `torch.symeig` back and, if asked, no shuffling.

  LibMTL builds its tensors in torch's default dtype, so float64 runs set it.
  Its `Aligned_MTL` calls `torch.symeig`, removed from torch: it gets the
  replacement torch's error message names, `torch.linalg.eigh` on the upper
  triangle (symeig's default). GradVac and PCGrad visit the tasks in the order
  `random.shuffle` leaves; the identity makes it ascending, as `shuffle=False`.
  """

  def symeig(matrix: torch.Tensor, eigenvectors: bool = False, upper: bool = True) -> Any:
    del eigenvectors
    return torch.linalg.eigh(matrix, UPLO="U" if upper else "L")

  previous = torch.get_default_dtype()
  torch.set_default_dtype(dtype)
  try:
    with contextlib.ExitStack() as stack:
      stack.enter_context(mock.patch.object(torch, "symeig", symeig, create=True))
      if ascending:
        stack.enter_context(mock.patch.object(random, "shuffle", lambda items: None))
      yield
  finally:
    torch.set_default_dtype(previous)


def torch_leaves(leaves: Leaves) -> tuple[list[torch.Tensor], torch.Tensor]:
  """LibMTL's inputs: the leaves, and the `[T, P]` matrix its `_compute_grad` returns."""
  tensors = [torch.from_numpy(leaf) for leaf in leaves]
  return tensors, torch.cat(tensors, dim=1)


def optimum(method: str, leaves: Leaves) -> np.ndarray:
  """The float64 update of the tests' reference on the whole model."""
  if method in peers.GRAM_REFERENCES:
    return peers.reference_update(method, leaves, per_layer=False)
  update = peers.qp_reference_update(method, leaves, per_layer=False)
  # peers' CAGrad reference is torchjd's `rescale=False`; ours and LibMTL's divide by 1 + c^2.
  return update / (1 + CAGRAD_C**2) if method == "cagrad" else update


# GradVac and PCGrad: the same algorithm on both sides, in a fixed order.


def surgery_agreement(
  method: str, granularity: str, beta: float, num_tasks: int, steps: int, leaf_size: int
) -> tuple[Any, ...]:
  """Both sides for `steps` steps on the same gradients, ascending order; a table row."""
  initial = peers.make_leaves(num_tasks, 4, leaf_size, 0)
  tx, name, options = configure(method, num_tasks, granularity, beta=beta, shuffle=False)
  ours = peers.Ours(tx, initial)
  errors = dict.fromkeys(("update", "targets", "given"), 0.0)
  corrections = 0
  with libmtl_context(torch.float32, ascending=True):
    own, given = (Theirs(name, options, initial, own=flag) for flag in (True, False))
    for step in range(steps):
      leaves = peers.make_leaves(num_tasks, 4, leaf_size, seed=100 + step)
      ours_update = peers.flat_update(ours.step(peers.as_tree(leaves)))
      for theirs in (own, given):
        theirs.step(*torch_leaves(leaves))
      errors["update"] = max(errors["update"], peers.relative_error(ours_update, own.update()))
      errors["given"] = max(errors["given"], peers.relative_error(given.update(), own.update()))
      corrections += int(ours.state.corrected.sum())
      if method == "gradvac":
        error = peers.relative_error(np.asarray(ours.state.targets), own.targets())
        errors["targets"] = max(errors["targets"], error)
  worst = max(errors.values())
  return (
    method,
    granularity,
    beta if method == "gradvac" else "-",
    num_tasks,
    steps,
    corrections,
    errors["update"],
    errors["targets"] if method == "gradvac" else "-",
    errors["given"],
    "yes" if worst <= 1e-5 else "NO",
  )


# The Gram-based methods: each side against the float64 optimum.


def gram_agreement(method: str, num_tasks: int, steps: int, leaf_size: int) -> tuple[Any, ...]:
  """Each side in float64 and float32 against the float64 reference; a table row."""
  initial = peers.make_leaves(num_tasks, 4, leaf_size, 0)
  initial64 = [leaf.astype(np.float64) for leaf in initial]
  tx, name, options = configure(method, num_tasks, "model")
  ours = peers.Ours(tx, initial)
  with jax.enable_x64(True):
    ours64 = peers.Ours(tx, initial64)
  with libmtl_context(torch.float32, ascending=False):
    own, given = (Theirs(name, options, initial, own=flag) for flag in (True, False))
  with libmtl_context(torch.float64, ascending=False):
    own64 = Theirs(name, options, initial64, own=True)
  errors = dict.fromkeys(("ours64", "theirs64", "ours", "theirs", "given"), 0.0)
  for step in range(steps):
    leaves = peers.make_leaves(num_tasks, 4, leaf_size, seed=100 + step)
    leaves64 = [leaf.astype(np.float64) for leaf in leaves]
    expected = optimum(method, leaves)
    with jax.enable_x64(True):
      updates = {"ours64": peers.flat_update(ours64.step(peers.as_tree(leaves64)))}
    with libmtl_context(torch.float64, ascending=False):
      own64.step(*torch_leaves(leaves64))
      updates["theirs64"] = own64.update()
    updates["ours"] = peers.flat_update(ours.step(peers.as_tree(leaves)))
    with libmtl_context(torch.float32, ascending=False):
      for theirs in (own, given):
        theirs.step(*torch_leaves(leaves))
    updates["theirs"] = own.update()
    for key, update in updates.items():
      errors[key] = max(errors[key], peers.relative_error(update, expected))
    errors["given"] = max(errors["given"], peers.relative_error(given.update(), own.update()))
  closer = errors["ours"] <= max(errors["theirs"], 1e-5)
  return (
    method,
    num_tasks,
    steps,
    errors["ours64"],
    errors["theirs64"],
    errors["ours"],
    errors["theirs"],
    errors["given"],
    "yes" if closer else "NO",
  )


def agreement_tables(quick: bool) -> list[str]:
  """Prints and returns the two agreement tables."""
  num_tasks, leaf_size, steps = (4, 100, 3) if quick else (8, 20_000, 5)
  checks = [
    surgery_agreement("gradvac", "model", peers.BETA, num_tasks, steps, leaf_size),
    surgery_agreement("gradvac", "model", 0.5, num_tasks, steps, leaf_size),
    surgery_agreement("gradvac", "layer", 0.5, num_tasks, steps, leaf_size),
    surgery_agreement("pcgrad", "model", 0.0, num_tasks, steps, leaf_size),
  ]
  surgery_table = _harness.markdown_table(
    (
      "method",
      "granularity",
      "beta",
      "T",
      "steps",
      "pairs corrected",
      "max rel. error, update",
      "max rel. error, targets",
      "LibMTL given vs own gradients",
      "agree to 1e-5",
    ),
    checks,
  )
  print(f"\n## GradVac and PCGrad (4 leaves of {leaf_size} float32, ascending order)\n")
  print(surgery_table)
  rows = []
  for method in GRAM_METHODS:
    rows.append(gram_agreement(method, num_tasks, steps, leaf_size))
    print(f"{method} T={num_tasks}: {rows[-1][3:]}", flush=True)
  gram_table = _harness.markdown_table(
    (
      "method",
      "T",
      "steps",
      "float64: ours vs optimum",
      "float64: LibMTL vs optimum",
      "float32: ours vs optimum",
      "float32: LibMTL vs optimum",
      "LibMTL given vs own gradients",
      "ours as close",
    ),
    rows,
  )
  print(f"\n## Gram-based methods: distance to the float64 optimum (4 leaves of {leaf_size})\n")
  print(gram_table)
  return [surgery_table, gram_table]


def speed(
  method: str, granularity: str, num_tasks: int, leaves: Leaves, repeats: int
) -> tuple[Any, ...]:
  """Median step times of our jitted update and LibMTL's weighting; a table row."""
  tx, name, options = configure(method, num_tasks, granularity)
  ours = peers.Ours(tx, leaves)
  tree = peers.as_tree(leaves)
  tensors, matrix = torch_leaves(leaves)
  with libmtl_context(torch.float32, ascending=False):
    theirs = Theirs(name, options, leaves, own=False)
    jax.block_until_ready(ours.step(tree))  # compiles
    _, seconds = _harness.timed(lambda: theirs.step(tensors, matrix))
    # LibMTL's per-layer GradVac takes minutes a call on a loaded 2-core machine.
    medians = _harness.interleaved_medians(
      {"ours": lambda: ours.step(tree), "theirs": lambda: theirs.step(tensors, matrix)},
      repeats=repeats if seconds < SLOW_CALL_SECONDS else min(repeats, 3),
      warmup=0,
    )
  return (
    method,
    granularity,
    len(leaves) if granularity == "layer" else 1,
    num_tasks,
    1e3 * medians["ours"],
    1e3 * medians["theirs"],
    medians["ours"] / medians["theirs"],
  )


def speed_table(quick: bool, repeats: int) -> str:
  """Prints and returns the step-time table."""
  num_leaves, leaf_size, task_counts = (4, 1000, (4,)) if quick else (48, 20_833, (4, 16))
  rows = []
  for method, granularity in SPEED_CASES:
    for num_tasks in task_counts:
      leaves = peers.make_leaves(num_tasks, num_leaves, leaf_size, seed=num_tasks)
      rows.append(speed(method, granularity, num_tasks, leaves, repeats))
      print(f"{method} {granularity} T={num_tasks}: ratio {rows[-1][-1]:.3g}", flush=True)
  table = _harness.markdown_table(
    ("method", "granularity", "groups", "T", "ours ms", "LibMTL ms", "ours / LibMTL"), rows
  )
  print(f"\n## Step time, P = {num_leaves * leaf_size:,} float32 in {num_leaves} leaves\n")
  print(table)
  print(
    f"medians of {repeats} interleaved repetitions (3 where one LibMTL call takes over "
    f"{SLOW_CALL_SECONDS:.0f} s) after one warm-up call each"
  )
  return table


PARTS = ("agreement", "speed")


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the agreement and timing tables; returns them, a blank line apart."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--only", default=",".join(PARTS))
  known, argv = parser.parse_known_args(argv)
  parts = set(known.only.split(","))
  if parts - set(PARTS):
    raise SystemExit(f"unknown parts {sorted(parts - set(PARTS))}; choose from {PARTS}")
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  repeats = args.repeats or (3 if args.quick else 7)
  print("# optax_gradvac vs LibMTL")
  print(
    f"{_harness.machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"LibMTL {importlib.metadata.version('LibMTL')}"
  )
  tables = []
  if "agreement" in parts:
    tables += agreement_tables(args.quick)
  if "speed" in parts:
    tables.append(speed_table(args.quick, repeats))
  return "\n\n".join(tables)


if __name__ == "__main__":
  main()
