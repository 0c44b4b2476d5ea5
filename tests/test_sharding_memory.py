"""Sharded stacked steps gather no stacked gradient and stay within a scratch bound.

On 8 host CPU devices (a subprocess: ``sharding_memory_check.py``), for FSDP
(parameters' last axis sharded), task-sharded batches and data parallelism
(parameters replicated, every task's batch split), under Auto and Explicit axes,
the compiled HLO of the stacked step (per-task gradients, ``gradvac``, Adam) is
compared with the plain step's (gradient of the summed loss, Adam) of the same
layout:

- no all-gather result is larger than the largest parameter or than the plain
  step's largest all-gather: no ``[T, ...]`` gradient is gathered;
- per-device scratch is at most the plain step's plus
  ``1.3 T (P / D + largest parameter)`` floats, or ``1.3 T P`` (one copy of the
  stacked gradients) where the parameters are replicated (data);
- with replicated parameters, what the update adds to the all-reduced gradients
  themselves is small: scratch at most the plain step's plus ``2 T P`` (the
  combined all-reduce's inputs and outputs, as the plain step's ``2 P``) plus
  ``1.3 T`` times the largest parameter.
"""

import pathlib

import host_devices
import pytest

_SCRIPT = pathlib.Path(__file__).with_name("sharding_memory_check.py")

_FSDP_TEMP = (
  "XLA:CPU has no reduce-scatter and combines the all-reduces of every layer's per-task "
  "gradient (a partial sum over the batch shards) into one: all the full [T, "
  "*param.shape] all-reduced gradients are alive at once before each device takes its "
  "slice (about T P per device); with that combiner disabled "
  "(--xla_disable_hlo_passes=cpu-all-reduce-combiner) the step comes within 4 % of the "
  "bound here and meets it in benchmarks/README.md, section 8"
)
_TASK_AUTO = (
  "Auto axes: the gradients' task-axis sharding is not visible at trace time, so the "
  "Gram contraction of task-sharded gradients is left to XLA, which all-gathers each "
  "[T, ...] leaf; a with_sharding_constraint onto a parameter axis fixes it but also "
  "re-partitions a Megatron-style model's activations (benchmarks/README.md, section 8)"
)
_DATA_TEMP = (
  "XLA:CPU combines the all-reduces of every layer's per-task gradient (each device's "
  "partial sum over its batch shard) into one, whose inputs and outputs, 2 T P, are all "
  "alive at once, as the plain step's 2 P are; with that combiner disabled "
  "(--xla_disable_hlo_passes=cpu-all-reduce-combiner) the step meets the bound under "
  "Explicit axes (benchmarks/README.md, section 8)"
)
_DATA_AUTO = (
  "Auto axes: that the gradients are replicated is not visible at trace time, so each "
  "leaf is contracted in place over all its parameter axes, as a sharded one must be: "
  "XLA:CPU makes a transposed copy of it for that besides the row-major copy the "
  "weighted sum reads, and the overflow check holds the leaf as it came (under Explicit "
  "axes all three read one row-major [T, P] view)"
)
_XFAIL = {
  ("fsdp", "Auto", "temp"): _FSDP_TEMP,
  ("fsdp", "Explicit", "temp"): _FSDP_TEMP,
  ("task", "Auto", "gather"): _TASK_AUTO,
  ("task", "Auto", "temp"): _TASK_AUTO,
  ("data", "Auto", "temp"): _DATA_TEMP,
  ("data", "Explicit", "temp"): _DATA_TEMP,
  ("data", "Auto", "update"): _DATA_AUTO,
}
_LAYOUTS = ("fsdp", "task", "data")


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str], dict]:
  expected = [(layout, mode) for layout in _LAYOUTS for mode in ("Auto", "Explicit")]
  key = lambda report: (report["layout"], report["mode"])  # noqa: E731
  return host_devices.reports(_SCRIPT, key, expected, timeout=600)


def _cases() -> list:
  cases = []
  for layout in _LAYOUTS:
    for mode in ("Auto", "Explicit"):
      for check in ("gather", "temp", "update") if layout == "data" else ("gather", "temp"):
        reason = _XFAIL.get((layout, mode, check))
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        cases.append(pytest.param(layout, mode, check, marks=marks, id=f"{layout}-{mode}-{check}"))
  return cases


def test_collectives_are_seen(reports: dict) -> None:
  # The parser finds the collectives the layouts must have: the plain FSDP step
  # gathers every parameter, and every Gram reduction is an all-reduce.
  for (layout, _), report in reports.items():
    assert report["stacked"]["all-reduce"] > 0
    if layout == "fsdp":
      assert report["plain"]["all-gather"] >= report["largest_param"] // report["devices"]


@pytest.mark.parametrize(("layout", "mode", "check"), _cases())
def test_sharded_step(reports: dict, layout: str, mode: str, check: str) -> None:
  report = reports[layout, mode]
  stacked, plain = report["stacked"], report["plain"]
  if check == "gather":
    limit = max(report["largest_param"], plain["all-gather"])
    assert stacked["all-gather"] <= limit, report
    return
  num_tasks, num_params, largest = (
    report["num_tasks"],
    report["num_params"],
    report["largest_param"],
  )
  if check == "update":  # replicated: beyond the all-reduce's inputs and outputs
    floats = 2 * num_tasks * num_params + 1.3 * num_tasks * largest
  elif layout == "data":  # replicated: one copy of the stacked gradients
    floats = 1.3 * num_tasks * num_params
  else:
    floats = 1.3 * num_tasks * (num_params / report["devices"] + largest)
  limit = plain["temp_bytes"] + 4 * floats
  assert stacked["temp_bytes"] <= limit, (stacked["temp_bytes"] / limit, report)
