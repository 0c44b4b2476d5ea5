"""The low-memory path on a mesh: exact, and how much it holds per device.

On 8 host CPU devices (a subprocess: ``sharding_low_memory_check.py``), for the
four layouts of ``benchmarks/sharding.py`` (fsdp, tensor, task, data) under Auto
and Explicit axes:

- values: two ``gradvac`` steps on the low-memory path
  (``tx.update(None, ..., task_grads_fn=fn)``) equal those of the stacked path
  on the same mesh, and those of the stacked path on one device, to float32
  rounding (``1e-6`` of each leaf's largest magnitude);
- memory, from the compiled low-memory and plain steps (with Adam): per-device
  scratch is at most the plain step's plus ``1.3 T (largest leaf) / D`` floats
  (``temp``), or at least plus ``1.3 T (largest leaf)`` (``temp-undivided``), and
  no all-gather or all-reduce result is larger than both the largest parameter
  and the plain step's (``collectives``): no ``[T, ...]`` gradient is gathered
  or reduced whole.
"""

import pathlib

import host_devices
import pytest

_SCRIPT = pathlib.Path(__file__).with_name("sharding_low_memory_check.py")
_LAYOUTS = ("fsdp", "tensor", "task", "data")
_MODES = ("Auto", "Explicit")

_COMBINED = (
  "the batch is split over the devices, so every per-task gradient is a partial sum "
  "that XLA:CPU all-reduces at its full [T, *param.shape] size and then slices (it "
  "forms no reduce-scatter), and its all-reduce combiner (no size limit on CPU) "
  "merges the all-reduces of all the leaves of one pass into one: the whole stacked "
  "gradient is held, as input and result of that all-reduce"
)
_TASK_AUTO = (
  "Auto axes: the gradients' task-axis sharding is not visible at trace time, so the "
  "Gram contraction and the weighted sum of task-sharded gradients are left to XLA, "
  "which all-gathers each [T, ...] leaf; a with_sharding_constraint onto a parameter "
  "axis fixes it but re-partitions a Megatron-style model's activations "
  "(benchmarks/README.md, section 9)"
)
_XFAIL = {
  **{
    (layout, mode, check): _COMBINED
    for layout in ("fsdp", "data")
    for mode in _MODES
    for check in ("temp", "temp-undivided", "collectives")
  },
  **{("task", "Auto", check): _TASK_AUTO for check in ("temp", "temp-undivided", "collectives")},
}


@pytest.fixture(scope="module")
def reports() -> dict[tuple[str, str, str], dict]:
  # The subprocess runs once per test run, whichever workers ask (host_devices.py).
  expected = [
    (check, layout, mode)
    for check in ("values", "memory")
    for layout in _LAYOUTS
    for mode in _MODES
  ]
  key = lambda report: (report["check"], report["layout"], report["mode"])  # noqa: E731
  return host_devices.reports(_SCRIPT, key, expected, timeout=1200)


@pytest.mark.parametrize("mode", _MODES)
@pytest.mark.parametrize("layout", _LAYOUTS)
def test_low_memory_path_matches_the_stacked_path(reports: dict, layout: str, mode: str) -> None:
  report = reports["values", layout, mode]
  assert report["corrected"] > 0, report  # GradVac changed the gradients
  assert report["against_stacked"] <= 1e-6, report
  assert report["against_one_device"] <= 1e-6, report


def test_collectives_are_seen(reports: dict) -> None:
  # The parser finds the collectives the layouts must have: the plain FSDP step
  # gathers every parameter, and every plain step reduces its gradient or its
  # activations.
  for (check, layout, _), report in reports.items():
    if check == "memory":
      assert report["plain"]["all-reduce"] > 0, report
      if layout == "fsdp":
        assert report["plain"]["all-gather"] >= report["largest_param"] // report["devices"]


def _cases() -> list:
  cases = []
  for layout in _LAYOUTS:
    for mode in _MODES:
      for check in ("temp", "temp-undivided", "collectives"):
        reason = _XFAIL.get((layout, mode, check))
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        cases.append(pytest.param(layout, mode, check, marks=marks, id=f"{layout}-{mode}-{check}"))
  return cases


@pytest.mark.parametrize(("layout", "mode", "check"), _cases())
def test_low_memory_step_on_a_mesh(reports: dict, layout: str, mode: str, check: str) -> None:
  report = reports["memory", layout, mode]
  low, plain = report["low"], report["plain"]
  if check == "collectives":
    for op in ("all-gather", "all-reduce"):
      assert low[op] <= max(report["largest_param"], plain[op]), (op, report)
    return
  divisor = report["devices"] if check == "temp" else 1
  limit = plain["temp_bytes"] + 1.3 * report["num_tasks"] * report["largest_param"] * 4 / divisor
  assert low["temp_bytes"] <= limit, (low["temp_bytes"] / limit, report)
