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

  python benchmarks/peers.py [--quick] [--repeats N]   # needs the `peers` extra
"""

import contextlib
import functools
import importlib.metadata
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from unittest import mock

import _harness
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torchjd.aggregation import GradVac, PCGrad

import optax_gradvac as ogv

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


def main(argv: Sequence[str] | None = None) -> str:
  """Prints the agreement table and the timing table; returns both, a blank line apart."""
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
  return check_table + "\n\n" + speed_table


if __name__ == "__main__":
  main()
