"""`gradvac` and `pcgrad` against torchjd's GradVac and PCGrad on the same gradients.

torchjd (PyTorch, CPU here) aggregates one Jacobian matrix `[T, P]` per
aggregator; per-layer GradVac needs one aggregator, with its own targets, per
group. Both sides get identical float32 gradient matrices: a pytree of 48 leaves
of `[T, 20833]` for us (P = 999,984), the same leaves, or their concatenation
for whole-model surgery, as torch tensors for torchjd. Our times are the jitted
update's; torchjd's are its aggregators' calls; repetitions alternate.

Before timing, an agreement check runs both on the same inputs for several
steps with a fixed visiting order (ascending: `shuffle=False` here,
`torch.randperm` replaced by `torch.arange` there) and compares the updates and
the similarity targets.

Then IMTL-G, Aligned-MTL and Nash-MTL: the closed forms against torchjd in
float64, every side's float32 update against the float64 references of the
tests (`tests/closed_form_reference.py`), and the step times.

Then MGDA, CAGrad and UPGrad, whose weights solve a convex program: each
side's update, in float64 and in float32, against the float64 optimum of the
tests' references (`tests/qp_reference.py`), and the step times.

Then ConFIG and RLW (closed forms: RLW's against torchjd's `Random` fed the
same draws) and DualProj and FairGrad (solvers) likewise; torchjd has no
GradNorm.

  python benchmarks/peers.py [--quick] [--repeats N]
                             [--only gradvac|closed_form|qp|config_rlw|dualproj_fairgrad]
  # needs benchmarks/requirements-peers.txt
"""

import argparse
import contextlib
import functools
import importlib.metadata
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchjd.aggregation import (
  IMTLG,
  MGDA,
  AlignedMTL,
  CAGrad,
  ConFIG,
  DualProj,
  FairGrad,
  GradVac,
  NashMTL,
  PCGrad,
  Random,
  UPGrad,
)

import optax_gradvac as ogv

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
import closed_form_reference  # the float64 references of the tests
import qp_reference

Leaves = list[np.ndarray]
BETA = 0.01  # the paper's; torchjd's default is 0.5, so both are given it explicitly


def make_leaves(num_tasks: int, num_leaves: int, leaf_size: int, seed: int) -> Leaves:
  """Per-task gradients with a shared direction, so that cosines take both signs.

  Task t's gradient is `a_t * shared + s_t * noise_t`, with `a_t` in [-1.5, 1.5]
  and `s_t` in [0.3, 1] drawn per task and leaf: pairs range from aligned to
  conflicting, and norms differ from task to task, as real task gradients do.
  """
  rng = np.random.default_rng(seed)
  leaves = []
  for _ in range(num_leaves):
    shared = rng.standard_normal(leaf_size, dtype=np.float32)
    noise = rng.standard_normal((num_tasks, leaf_size), dtype=np.float32)
    mix = rng.uniform(-1.5, 1.5, (num_tasks, 1)).astype(np.float32)
    scale = rng.uniform(0.3, 1.0, (num_tasks, 1)).astype(np.float32)
    leaves.append(mix * shared + scale * noise)
  return leaves


def as_tree(leaves: Leaves) -> dict[str, dict[str, jax.Array]]:
  """Our input: each leaf in a layer of its own, so `"layer"` makes one group each."""
  return {f"layer_{k:02d}": {"kernel": jnp.asarray(leaf)} for k, leaf in enumerate(leaves)}


def flat_update(update: Any) -> np.ndarray:
  """Our update as one vector, leaves in the order torchjd's matrix has them."""
  return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree.leaves(update)])


class Ours:
  """The jitted update of an `optax_gradvac` transform, with its state carried."""

  def __init__(self, tx: Any, leaves: Leaves) -> None:
    self.params = jax.tree.map(lambda leaf: jnp.zeros(leaf.shape[1:]), as_tree(leaves))
    self.state = tx.init(self.params)
    self.update = jax.jit(tx.update)

  def step(self, tree: Any) -> Any:
    update, self.state = self.update(tree, self.state, self.params)
    return update


class Theirs:
  """torchjd aggregators: one over the whole matrix, or one per group."""

  def __init__(self, make: Callable[[], torch.nn.Module], num_groups: int) -> None:
    self.aggregators = [make() for _ in range(num_groups)]

  def step(self, matrices: list[torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
      return torch.cat(
        [agg(matrix) for agg, matrix in zip(self.aggregators, matrices, strict=True)]
      )

  def targets(self) -> np.ndarray:
    """`[groups, T, T]` EMA targets (GradVac's `_phi_t` buffer)."""
    return np.stack([agg.gramian_weighting._phi_t.numpy() for agg in self.aggregators])


def torch_inputs(leaves: Leaves, per_layer: bool) -> list[torch.Tensor]:
  """torchjd's input: one matrix per aggregator."""
  if per_layer:
    return [torch.from_numpy(leaf) for leaf in leaves]
  return [torch.from_numpy(np.concatenate(leaves, axis=1))]


@contextlib.contextmanager
def ascending_torch_order() -> Iterator[None]:
  """Makes torchjd visit the other tasks in ascending order, as `shuffle=False` does."""
  with mock.patch.object(torch, "randperm", lambda n, **kwargs: torch.arange(n, **kwargs)):
    yield


def relative_error(ours: np.ndarray, theirs: np.ndarray) -> float:
  """Largest absolute difference over the largest magnitude of the reference."""
  return float(np.max(np.abs(ours - theirs)) / max(np.max(np.abs(theirs)), 1e-30))


def agreement(
  method: str, granularity: str, beta: float, num_tasks: int, steps: int, leaf_size: int
) -> tuple[Any, ...]:
  """Runs both for `steps` steps on the same gradients; returns a table row."""
  num_leaves = 4
  per_layer = granularity == "layer"
  if method == "gradvac":
    tx = ogv.gradvac(num_tasks, beta, granularity=granularity, shuffle=False)
    make = functools.partial(GradVac, beta=beta)
  else:
    tx = ogv.pcgrad(num_tasks, granularity=granularity, shuffle=False)
    make = PCGrad
  ours = Ours(tx, make_leaves(num_tasks, num_leaves, leaf_size, 0))
  theirs = Theirs(make, num_leaves if per_layer else 1)
  update_error = target_error = 0.0
  corrections = 0
  with ascending_torch_order():
    for step in range(steps):
      leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=100 + step)
      ours_update = flat_update(ours.step(as_tree(leaves)))
      theirs_update = theirs.step(torch_inputs(leaves, per_layer)).numpy()
      update_error = max(update_error, relative_error(ours_update, theirs_update))
      corrections += int(ours.state.corrected.sum())
      if method == "gradvac":
        error = relative_error(np.asarray(ours.state.targets), theirs.targets())
        target_error = max(target_error, error)
  worst = max(update_error, target_error)
  return (
    method,
    granularity,
    beta if method == "gradvac" else "-",
    num_tasks,
    steps,
    corrections,
    update_error,
    target_error if method == "gradvac" else "-",
    "yes" if worst <= 1e-5 else "NO",
  )


def speed(
  method: str, granularity: str, num_tasks: int, leaves: Leaves, repeats: int
) -> tuple[Any, ...]:
  """Median step times of ours and torchjd's on the same gradients; a table row."""
  per_layer = granularity == "layer"
  if method == "gradvac":
    tx = ogv.gradvac(num_tasks, BETA, granularity=granularity)
    make: Callable[[], torch.nn.Module] = functools.partial(GradVac, beta=BETA)
  else:
    tx = ogv.pcgrad(num_tasks, granularity=granularity)
    make = PCGrad
  ours, theirs = Ours(tx, leaves), Theirs(make, len(leaves) if per_layer else 1)
  tree, matrices = as_tree(leaves), torch_inputs(leaves, per_layer)
  medians = _harness.interleaved_medians(
    {"ours": lambda: ours.step(tree), "theirs": lambda: theirs.step(matrices)},
    repeats=repeats,
  )
  return (
    method,
    granularity,
    len(leaves) if per_layer else 1,
    num_tasks,
    1e3 * medians["ours"],
    1e3 * medians["theirs"],
    medians["ours"] / medians["theirs"],
  )


# IMTL-G, Aligned-MTL and Nash-MTL: agreement with torchjd and with the float64
# references of the tests, and speed.


def gram_method(method: str, num_tasks: int, granularity: str) -> tuple[Any, Callable[..., Any]]:
  """Our transform and a maker of torchjd's aggregator (given a dtype), configured alike.

  Aligned-MTL: torchjd's default averages the aligned gradients, ours (the
  official code) sums them, so torchjd gets a preference vector of ones.
  Nash-MTL: torchjd clips the update's norm to 1 by default (`max_norm`), a
  rescaling we leave to `optax.clip_by_global_norm`, so it gets `max_norm=0`.
  """
  if method == "imtl_g":
    return ogv.imtl_g(num_tasks, granularity=granularity), lambda dtype: IMTLG()
  if method == "aligned_mtl":
    tx = ogv.aligned_mtl(num_tasks, granularity=granularity)
    return tx, lambda dtype: AlignedMTL(pref_vector=torch.ones(num_tasks, dtype=dtype))
  tx = ogv.nash_mtl(num_tasks, granularity=granularity)
  return tx, lambda dtype: NashMTL(n_tasks=num_tasks, max_norm=0.0)


GRAM_REFERENCES = {
  "imtl_g": closed_form_reference.imtl_g,
  "aligned_mtl": closed_form_reference.aligned_mtl,
  "nash_mtl": closed_form_reference.nash_mtl,
}


def reference_update(method: str, leaves: Leaves, per_layer: bool) -> np.ndarray:
  """The float64 update of the tests' reference, flattened like torchjd's."""
  groups = [leaves] if not per_layer else [[leaf] for leaf in leaves]
  updates = []
  for group in groups:
    grads = np.concatenate([np.asarray(leaf, np.float64) for leaf in group], axis=1)
    updates.append(GRAM_REFERENCES[method](grads) @ grads)
  return np.concatenate(updates)


def gram_method_agreement(
  method: str, granularity: str, num_tasks: int, steps: int, leaf_size: int
) -> tuple[Any, ...]:
  """Both sides in float32 against the float64 reference, and each other in float64."""
  num_leaves, per_layer = 4, granularity == "layer"
  tx, make = gram_method(method, num_tasks, granularity)
  initial = make_leaves(num_tasks, num_leaves, leaf_size, 0)  # shapes for init
  closed_form = method != "nash_mtl"  # Nash-MTL's solvers differ: no float64 pairing
  ours = Ours(tx, initial)
  theirs = Theirs(lambda: make(torch.float32), num_leaves if per_layer else 1)
  theirs64 = Theirs(lambda: make(torch.float64), num_leaves if per_layer else 1)
  with jax.enable_x64(True):
    ours64 = Ours(tx, [leaf.astype(np.float64) for leaf in initial])
  ours_error = theirs_error = pair_error = 0.0
  for step in range(steps):
    leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=100 + step)
    expected = reference_update(method, leaves, per_layer)
    ours_update = flat_update(ours.step(as_tree(leaves)))
    theirs_update = theirs.step(torch_inputs(leaves, per_layer)).numpy()
    ours_error = max(ours_error, relative_error(ours_update, expected))
    theirs_error = max(theirs_error, relative_error(theirs_update, expected))
    if closed_form:
      leaves64 = [leaf.astype(np.float64) for leaf in leaves]
      with jax.enable_x64(True):
        ours64_update = flat_update(ours64.step(as_tree(leaves64)))
      theirs64_update = theirs64.step(torch_inputs(leaves64, per_layer)).numpy()
      pair_error = max(pair_error, relative_error(ours64_update, theirs64_update))
  verdict = pair_error <= 1e-5 if closed_form else ours_error <= max(theirs_error, 1e-5)
  return (
    method,
    granularity,
    num_tasks,
    steps,
    pair_error if closed_form else "-",
    ours_error,
    theirs_error,
    "yes" if verdict else "NO",
  )


def gram_method_speed(
  method: str,
  granularity: str,
  num_tasks: int,
  leaves: Leaves,
  repeats: int,
  configure: Callable[[str, int, str], tuple[Any, Callable[..., Any]]] | None = None,
) -> tuple[Any, ...]:
  """Median step times of ours and torchjd's on the same float32 gradients; a table row.

  `configure` gives our transform and torchjd's aggregator maker (default: `gram_method`).
  """
  per_layer = granularity == "layer"
  tx, make = (configure or gram_method)(method, num_tasks, granularity)
  ours = Ours(tx, leaves)
  theirs = Theirs(lambda: make(torch.float32), len(leaves) if per_layer else 1)
  tree, matrices = as_tree(leaves), torch_inputs(leaves, per_layer)
  medians = _harness.interleaved_medians(
    {"ours": lambda: ours.step(tree), "theirs": lambda: theirs.step(matrices)},
    repeats=repeats,
  )
  return (
    method,
    granularity,
    len(leaves) if per_layer else 1,
    num_tasks,
    1e3 * medians["ours"],
    1e3 * medians["theirs"],
    medians["ours"] / medians["theirs"],
  )


def gram_methods_tables(quick: bool, repeats: int, num_leaves: int, leaf_size: int) -> str:
  """Prints the agreement and speed tables of IMTL-G, Aligned-MTL and Nash-MTL."""
  methods = ("imtl_g", "aligned_mtl", "nash_mtl")
  check_size, steps = (100, 3) if quick else (20_000, 5)
  checks = [
    gram_method_agreement(method, granularity, num_tasks, steps, check_size)
    for method in methods
    for granularity in ("model", "layer")
    for num_tasks in ((4,) if quick else (8, 16))
  ]
  check_table = _harness.markdown_table(
    (
      "method",
      "granularity",
      "T",
      "steps",
      "float64: ours vs torchjd",
      "float32: ours vs float64 reference",
      "float32: torchjd vs float64 reference",
      "agree",
    ),
    checks,
  )
  print(f"\n## Agreement of IMTL-G, Aligned-MTL, Nash-MTL (4 leaves of {check_size})\n")
  print(check_table)
  rows = []
  for method in methods:
    for granularity in ("model", "layer"):
      for num_tasks in (4,) if quick else (8, 16):
        leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=num_tasks)
        rows.append(gram_method_speed(method, granularity, num_tasks, leaves, repeats))
        print(f"{method} {granularity} T={num_tasks}: ratio {rows[-1][-1]:.4f}", flush=True)
  speed_table = _harness.markdown_table(
    ("method", "granularity", "groups", "T", "ours ms", "torchjd ms", "ours / torchjd"), rows
  )
  print(f"\n## Step time of IMTL-G, Aligned-MTL, Nash-MTL, P = {num_leaves * leaf_size:,}\n")
  print(speed_table)
  return check_table + "\n\n" + speed_table


# MGDA, CAGrad and UPGrad: each side's distance to the float64 optimum, and speed.

QP_METHODS = ("mgda", "cagrad", "upgrad")
CAGRAD_C = 0.5  # our default; torchjd's CAGrad has none


def qp_method(method: str, num_tasks: int, granularity: str) -> tuple[Any, Callable[..., Any]]:
  """Our transform and a maker of torchjd's aggregator (given a dtype), each as it comes.

  Both sides keep their default solver settings. CAGrad: c = 0.5 on both sides,
  and ours with `rescale=False`, since torchjd follows the paper's Algorithm 1
  and does not divide the update by 1 + c^2 as the official code (and our
  default) does.
  """
  if method == "mgda":
    return ogv.mgda(num_tasks, granularity=granularity), lambda dtype: MGDA()
  if method == "cagrad":
    tx = ogv.cagrad(num_tasks, CAGRAD_C, granularity=granularity, rescale=False)
    return tx, lambda dtype: CAGrad(c=CAGRAD_C)
  return ogv.upgrad(num_tasks, granularity=granularity), lambda dtype: UPGrad()


QP_REFERENCES = {
  "mgda": qp_reference.mgda,
  "cagrad": functools.partial(qp_reference.cagrad, c=CAGRAD_C, rescale=False),
  "upgrad": qp_reference.upgrad,
}


def qp_reference_update(method: str, leaves: Leaves, per_layer: bool) -> np.ndarray:
  """The float64 optimum of every group from the tests' references, flattened like torchjd's.

  The references try every support on the rows they are given, each try a
  least-squares solve on those rows: on a group's `[T, P]` gradients UPGrad's
  takes minutes at T = 8. They get instead the `[T, T]` rows `R^T` of the
  float64 QR factorisation `g^T = Q R` of the group's gradients: the same Gram
  matrix, so the same weights, and the group's update is `Q @` the update of
  the rows (exact up to float64 rounding: 4e-14 from the references on the
  full gradients at T = 8).
  """
  groups = [leaves] if not per_layer else [[leaf] for leaf in leaves]
  updates = []
  for group in groups:
    grads = np.concatenate([np.asarray(leaf, np.float64) for leaf in group], axis=1)
    basis, triangle = np.linalg.qr(grads.T)
    updates.append(basis @ QP_REFERENCES[method](triangle.T))
  return np.concatenate(updates)


def qp_method_agreement(
  method: str, granularity: str, num_tasks: int, steps: int, leaf_size: int
) -> tuple[Any, ...]:
  """Each side, in float64 and in float32, against the float64 optimum; a table row."""
  num_leaves, per_layer = 4, granularity == "layer"
  num_groups = num_leaves if per_layer else 1
  tx, make = qp_method(method, num_tasks, granularity)
  initial = make_leaves(num_tasks, num_leaves, leaf_size, 0)  # shapes for init
  ours = Ours(tx, initial)
  with jax.enable_x64(True):
    ours64 = Ours(tx, [leaf.astype(np.float64) for leaf in initial])
  theirs = Theirs(lambda: make(torch.float32), num_groups)
  theirs64 = Theirs(lambda: make(torch.float64), num_groups)
  errors = dict.fromkeys(("ours64", "theirs64", "ours", "theirs"), 0.0)
  for step in range(steps):
    leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=100 + step)
    leaves64 = [leaf.astype(np.float64) for leaf in leaves]
    expected = qp_reference_update(method, leaves, per_layer)
    with jax.enable_x64(True):
      updates = {"ours64": flat_update(ours64.step(as_tree(leaves64)))}
    updates["theirs64"] = theirs64.step(torch_inputs(leaves64, per_layer)).numpy()
    updates["ours"] = flat_update(ours.step(as_tree(leaves)))
    updates["theirs"] = theirs.step(torch_inputs(leaves, per_layer)).numpy()
    for name, update in updates.items():
      errors[name] = max(errors[name], relative_error(update, expected))
  closer = errors["ours"] <= max(errors["theirs"], 1e-5)
  return (
    method,
    granularity,
    num_tasks,
    steps,
    errors["ours64"],
    errors["theirs64"],
    errors["ours"],
    errors["theirs"],
    "yes" if closer else "NO",
  )


def qp_methods_tables(quick: bool, repeats: int, num_leaves: int, leaf_size: int) -> str:
  """Prints the distance-to-optimum and speed tables of MGDA, CAGrad and UPGrad."""
  check_size, steps = (100, 3) if quick else (20_000, 5)
  task_counts = (4,) if quick else (8, 16)
  checks = []
  for method in QP_METHODS:
    for granularity in ("model", "layer"):
      for num_tasks in task_counts:
        checks.append(qp_method_agreement(method, granularity, num_tasks, steps, check_size))
        print(f"{method} {granularity} T={num_tasks}: {checks[-1][4:]}", flush=True)
  check_table = _harness.markdown_table(
    (
      "method",
      "granularity",
      "T",
      "steps",
      "float64: ours vs optimum",
      "float64: torchjd vs optimum",
      "float32: ours vs optimum",
      "float32: torchjd vs optimum",
      "ours as close",
    ),
    checks,
  )
  print(f"\n## Distance to the float64 optimum: MGDA, CAGrad, UPGrad (4 leaves of {check_size})\n")
  print(check_table)
  rows = []
  for method in QP_METHODS:
    for granularity in ("model", "layer"):
      for num_tasks in task_counts:
        leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=num_tasks)
        rows.append(
          gram_method_speed(method, granularity, num_tasks, leaves, repeats, configure=qp_method)
        )
        print(f"{method} {granularity} T={num_tasks}: ratio {rows[-1][-1]:.4f}", flush=True)
  speed_table = _harness.markdown_table(
    ("method", "granularity", "groups", "T", "ours ms", "torchjd ms", "ours / torchjd"), rows
  )
  print(f"\n## Step time of MGDA, CAGrad, UPGrad, P = {num_leaves * leaf_size:,}\n")
  print(speed_table)
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return check_table + "\n\n" + speed_table


# ConFIG, RLW, DualProj and FairGrad: the closed forms against torchjd in float64,
# every side against the float64 reference or optimum, and speed.

FAIRGRAD_ALPHA = 2.0  # the official code's; torchjd's FairGrad has no default


def newer_method(method: str, num_tasks: int, granularity: str) -> tuple[Any, Callable[..., Any]]:
  """Our transform and a maker of torchjd's aggregator (given a dtype), each with its defaults.

  RLW: torchjd's `Random` draws `torch.randn`; the agreement check feeds it our draws.
  FairGrad: alpha = 2 on both sides.
  """
  if method == "config":
    return ogv.config(num_tasks, granularity=granularity), lambda dtype: ConFIG()
  if method == "rlw":
    return ogv.rlw(num_tasks, key=0, granularity=granularity), lambda dtype: Random()
  if method == "dualproj":
    return ogv.dualproj(num_tasks, granularity=granularity), lambda dtype: DualProj()
  tx = ogv.fairgrad(num_tasks, FAIRGRAD_ALPHA, granularity=granularity)
  return tx, lambda dtype: FairGrad(FAIRGRAD_ALPHA)


def newer_reference(method: str, grads: np.ndarray, weights: np.ndarray) -> np.ndarray:
  """The float64 update of one group: the papers' formulas or optima (`tests/`).

  DualProj's exhaustive reference gets the `[T, T]` rows of the group's QR
  factor, as in `qp_reference_update`; FairGrad's is solved without our penalty
  (its effect on these problems is far below float64 rounding), so both sides
  are measured against the exact alpha-fair weights.
  """
  if method == "config":
    return closed_form_reference.config(grads)
  if method == "rlw":
    return weights @ grads
  if method == "dualproj":
    basis, triangle = np.linalg.qr(grads.T)
    return basis @ qp_reference.dualproj(triangle.T)
  return closed_form_reference.fairgrad(grads, FAIRGRAD_ALPHA) @ grads


@contextlib.contextmanager
def torch_draws(logits: np.ndarray) -> Iterator[None]:
  """Makes torchjd's `Random` draw `logits` (ours for the step) instead of `torch.randn`."""

  def randn(*size: Any, dtype: Any = None, device: Any = None) -> torch.Tensor:
    assert size == (len(logits),)
    return torch.as_tensor(logits, dtype=dtype, device=device)

  with mock.patch.object(torch, "randn", randn):
    yield


def newer_agreement(
  method: str, granularity: str, num_tasks: int, steps: int, leaf_size: int
) -> tuple[Any, ...]:
  """Each side, in float64 and float32, against the reference; closed forms also to each other."""
  num_leaves, per_layer = 4, granularity == "layer"
  num_groups = num_leaves if per_layer else 1
  tx, make = newer_method(method, num_tasks, granularity)
  initial = make_leaves(num_tasks, num_leaves, leaf_size, 0)
  ours = Ours(tx, initial)
  with jax.enable_x64(True):
    ours64 = Ours(tx, [leaf.astype(np.float64) for leaf in initial])
  theirs = Theirs(lambda: make(torch.float32), num_groups)
  theirs64 = Theirs(lambda: make(torch.float64), num_groups)
  logits = closed_form_reference.rlw_logits(0, num_tasks, steps)
  weights = closed_form_reference.rlw_weights(0, num_tasks, steps)
  errors = dict.fromkeys(("pair", "ours64", "theirs64", "ours", "theirs"), 0.0)
  for step in range(steps):
    leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=100 + step)
    leaves64 = [leaf.astype(np.float64) for leaf in leaves]
    groups = [leaves64] if not per_layer else [[leaf] for leaf in leaves64]
    expected = np.concatenate(
      [newer_reference(method, np.concatenate(group, axis=1), weights[step]) for group in groups]
    )
    with torch_draws(logits[step]) if method == "rlw" else contextlib.nullcontext():
      updates = {
        "theirs64": theirs64.step(torch_inputs(leaves64, per_layer)).numpy(),
        "theirs": theirs.step(torch_inputs(leaves, per_layer)).numpy(),
      }
    with jax.enable_x64(True):
      updates["ours64"] = flat_update(ours64.step(as_tree(leaves64)))
    updates["ours"] = flat_update(ours.step(as_tree(leaves)))
    for name, update in updates.items():
      errors[name] = max(errors[name], relative_error(update, expected))
    errors["pair"] = max(errors["pair"], relative_error(updates["ours64"], updates["theirs64"]))
  closed_form = method in ("config", "rlw")
  if closed_form:
    verdict = errors["pair"] <= 1e-5
  else:
    verdict = errors["ours"] <= max(errors["theirs"], 1e-5)
  return (
    method,
    granularity,
    num_tasks,
    steps,
    errors["pair"] if closed_form else "-",
    errors["ours64"],
    errors["theirs64"],
    errors["ours"],
    errors["theirs"],
    "yes" if verdict else "NO",
  )


def newer_methods_tables(
  methods: Sequence[str], quick: bool, repeats: int, num_leaves: int, leaf_size: int
) -> str:
  """Prints the agreement and speed tables of `methods` (ConFIG, RLW, DualProj, FairGrad)."""
  check_size, steps = (100, 3) if quick else (20_000, 5)
  task_counts = (4,) if quick else (8, 16)
  checks = []
  for method in methods:
    for granularity in ("model", "layer"):
      for num_tasks in task_counts:
        checks.append(newer_agreement(method, granularity, num_tasks, steps, check_size))
        print(f"{method} {granularity} T={num_tasks}: {checks[-1][4:]}", flush=True)
  check_table = _harness.markdown_table(
    (
      "method",
      "granularity",
      "T",
      "steps",
      "float64: ours vs torchjd",
      "float64: ours vs reference",
      "float64: torchjd vs reference",
      "float32: ours vs reference",
      "float32: torchjd vs reference",
      "agree / ours as close",
    ),
    checks,
  )
  print(f"\n## Agreement: {', '.join(methods)} (4 leaves of {check_size})\n")
  print(check_table)
  rows = []
  for method in methods:
    for granularity in ("model", "layer"):
      for num_tasks in task_counts:
        leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=num_tasks)
        rows.append(
          gram_method_speed(method, granularity, num_tasks, leaves, repeats, configure=newer_method)
        )
        print(f"{method} {granularity} T={num_tasks}: ratio {rows[-1][-1]:.4f}", flush=True)
  speed_table = _harness.markdown_table(
    ("method", "granularity", "groups", "T", "ours ms", "torchjd ms", "ours / torchjd"), rows
  )
  print(f"\n## Step time of {', '.join(methods)}, P = {num_leaves * leaf_size:,}\n")
  print(speed_table)
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return check_table + "\n\n" + speed_table


def split_only(argv: Sequence[str] | None) -> tuple[set[str], list[str]]:
  """Takes `--only a,b` (parts to run: gradvac, closed_form, qp; default all) out of argv."""
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--only", default=",".join(PARTS))
  known, rest = parser.parse_known_args(argv)
  parts = set(known.only.split(","))
  if parts - set(PARTS):
    raise SystemExit(f"unknown parts {sorted(parts - set(PARTS))}; choose from {PARTS}")
  return parts, rest


PARTS = ("gradvac", "closed_form", "qp", "config_rlw", "dualproj_fairgrad")


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the agreement and timing tables; returns them, a blank line apart."""
  parts, argv = split_only(argv)
  args = _harness.parse_args(argv, __doc__.splitlines()[0])
  if args.quick:
    check_tasks, check_size, num_leaves, leaf_size = 4, 100, 4, 1000
    cases = [("gradvac", "model", 4), ("gradvac", "layer", 4), ("pcgrad", "model", 4)]
  else:
    check_tasks, check_size, num_leaves, leaf_size = 8, 20_000, 48, 20_833
    cases = [("gradvac", "model", t) for t in (4, 16, 64)]
    cases += [("gradvac", "layer", t) for t in (8, 16)]
    cases += [("pcgrad", "model", t) for t in (4, 16, 64)]
  repeats = args.repeats or (3 if args.quick else 7)
  steps = 5
  print("# optax_gradvac vs torchjd")
  print(
    f"{_harness.machine_line()}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"torchjd {importlib.metadata.version('torchjd')}"
  )
  tables = []
  if "gradvac" in parts:
    tables += gradvac_tables(check_tasks, check_size, steps, cases, num_leaves, leaf_size, repeats)
  if "closed_form" in parts:
    tables.append(gram_methods_tables(args.quick, repeats, num_leaves, leaf_size))
  if "qp" in parts:
    tables.append(qp_methods_tables(args.quick, repeats, num_leaves, leaf_size))
  for part in ("config_rlw", "dualproj_fairgrad"):
    if part in parts:
      methods = part.split("_")
      tables.append(newer_methods_tables(methods, args.quick, repeats, num_leaves, leaf_size))
  return "\n\n".join(tables)


def gradvac_tables(
  check_tasks: int,
  check_size: int,
  steps: int,
  cases: Sequence[tuple[str, str, int]],
  num_leaves: int,
  leaf_size: int,
  repeats: int,
) -> list[str]:
  """Prints GradVac's and PCGrad's agreement and timing tables; returns both."""
  checks = [
    agreement("gradvac", "model", BETA, check_tasks, steps, check_size),
    agreement("gradvac", "model", 0.5, check_tasks, steps, check_size),
    agreement("gradvac", "layer", 0.5, check_tasks, steps, check_size),
    agreement("pcgrad", "model", 0.0, check_tasks, steps, check_size),
  ]
  check_table = _harness.markdown_table(
    (
      "method",
      "granularity",
      "beta",
      "T",
      "steps",
      "pairs corrected",
      "max rel. error, update",
      "max rel. error, targets",
      "agree to 1e-5",
    ),
    checks,
  )
  print(f"\n## Agreement (4 leaves of {check_size} float32, ascending visiting order)\n")
  print(check_table)

  rows = []
  for method, granularity, num_tasks in cases:
    leaves = make_leaves(num_tasks, num_leaves, leaf_size, seed=num_tasks)
    rows.append(speed(method, granularity, num_tasks, leaves, repeats))
    print(f"{method} {granularity} T={num_tasks}: ratio {rows[-1][-1]:.3f}", flush=True)
  speed_table = _harness.markdown_table(
    ("method", "granularity", "groups", "T", "ours ms", "torchjd ms", "ours / torchjd"), rows
  )
  params = num_leaves * leaf_size
  print(f"\n## Step time, P = {params:,} float32 in {num_leaves} leaves\n")
  print(speed_table)
  print(f"medians of {repeats} interleaved repetitions after one warm-up call each")
  return [check_table, speed_table]


if __name__ == "__main__":
  main()
