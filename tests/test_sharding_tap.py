"""The in-scan step on a mesh: the single-device result, no gathered [T, ...] copy, one
layer's per-task gradients at a time.

On 8 host CPU devices (a subprocess: ``sharding_tap_check.py``), a 16-layer scanned
MLP tapped in its scan body, data parallel (batch split, parameters replicated) and
FSDP (kernels split, each layer gathered before its tap), Auto axes, float64, the
layers tapped by ``tap`` (body under ``jax.checkpoint``) or ``tapped_vmap`` (no remat,
against the plain step without remat too):

- the update and state equal the same step's on one device (to 1e-9: the sums over
  the batch shards are ordered differently, which the solvers may amplify, as in
  ``test_tap.py``);
- no all-gather result is larger than the largest parameter: the tapped ``[T, ...]``
  copies and the per-task gradients are never gathered;
- one layer at a time: from 8 to 16 layers the step's per-device scratch grows by at
  most the plain step's growth plus one layer's ``T x M`` (holding the layers' per-task
  gradients would add ``8 T x M``: each device's partial sums are whole);
- with replicated parameters, scratch within ``test_sharding_memory.py``'s bound for
  the stacked step: the plain step's plus ``1.3 T P``. (Its FSDP bound,
  ``1.3 T (P / D + M)``, is missed by the stacked step on XLA:CPU, a strict xfail there;
  the in-scan step holds a constant ``c T x M`` with ``c`` 3.7 on jaxlib 0.10.1 and 4.7 on
  0.12.1: a few whole-layer buffers, the partial sums, their all-reduce, the update.)
"""

import pathlib

import host_devices
import pytest

_SCRIPT = pathlib.Path(__file__).with_name("sharding_tap_check.py")


@pytest.fixture(scope="module")
def reports() -> dict[str, dict]:
  key = lambda report: (report["layout"], report["style"])  # noqa: E731
  return host_devices.reports(_SCRIPT, key, CASES, timeout=600)


CASES = [(layout, style) for style in ("tap", "tapped_vmap") for layout in ("data", "fsdp")]


@pytest.mark.parametrize("case", CASES, ids=["-".join(case) for case in CASES])
def test_tapped_step_on_a_mesh(reports: dict, case: tuple[str, str]) -> None:
  report = reports[case]
  layout = case[0]
  assert report["difference"] <= 1e-9, report
  assert report["all-reduce"] > 0  # the parser sees the collectives
  assert report["all-gather"] <= report["largest_param"], report
  num_tasks, num_params, largest = (
    report["num_tasks"],
    report["num_params"],
    report["largest_param"],
  )
  # One layer at a time: the layers beyond half the depth add no per-task gradients, where
  # holding them would add (L / 2) T x M per device (their partial sums are whole).
  growth = report["temp_bytes"] - report["half_depth_temp_bytes"]
  plain_growth = report["plain_temp_bytes"] - report["half_depth_plain_temp_bytes"]
  one_layer = report["itemsize"] * num_tasks * largest
  assert growth - plain_growth <= one_layer, (growth, plain_growth, one_layer, report)
  if layout == "data":  # the stacked sharding test's bound, parameters replicated
    limit = report["plain_temp_bytes"] + report["itemsize"] * 1.3 * num_tasks * num_params
    assert report["temp_bytes"] <= limit, (report["temp_bytes"] / limit, report)
