"""The in-scan step on a mesh: the single-device result, no gathered [T, ...] copy, and
the sharding tests' scratch bounds.

On 8 host CPU devices (a subprocess: ``sharding_tap_check.py``), a 16-layer scanned
MLP tapped in its scan body, data parallel (batch split, parameters replicated) and
FSDP (kernels split, each layer gathered before its tap), Auto axes, float64:

- the update and state equal the same step's on one device (to 1e-9: the sums over
  the batch shards are ordered differently, which the solvers may amplify, as in
  ``test_tap.py``);
- no all-gather result is larger than the largest parameter: the tapped ``[T, ...]``
  copies and the per-task gradients are never gathered;
- per-device scratch is within ``test_sharding_memory.py``'s bounds for the stacked
  step of the same layout: the plain step's plus ``1.3 T P`` (replicated
  parameters) or ``1.3 T (P / D + M)`` (FSDP).
"""

import pathlib

import host_devices
import pytest

_SCRIPT = pathlib.Path(__file__).with_name("sharding_tap_check.py")


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
  key = lambda report: report["layout"]  # noqa: E731
  return host_devices.reports(_SCRIPT, key, ["data", "fsdp"], timeout=600)


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_tapped_step_on_a_mesh(reports: dict, layout: str) -> None:
  report = reports[layout]
  assert report["difference"] <= 1e-9, report
  assert report["all-reduce"] > 0  # the parser sees the collectives
  assert report["all-gather"] <= report["largest_param"], report
  num_tasks, num_params, largest = (
    report["num_tasks"],
    report["num_params"],
    report["largest_param"],
  )
  if layout == "data":
    floats = 1.3 * num_tasks * num_params
  else:
    floats = 1.3 * num_tasks * (num_params / 8 + largest)
  limit = report["plain_temp_bytes"] + report["itemsize"] * floats
  assert report["temp_bytes"] <= limit, (report["temp_bytes"] / limit, report)
