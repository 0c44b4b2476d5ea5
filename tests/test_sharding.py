"""Sharded training steps match single-device results (8 host CPU devices)."""

import json
import os
import pathlib
import subprocess
import sys

_SCRIPT = pathlib.Path(__file__).with_name("sharding_check.py")
_CONFIGS = {(mode, layout) for mode in ("Auto", "Explicit") for layout in ("data", "task", "model")}


def test_sharded_steps_match_single_device():
  # A subprocess, so that this process keeps its single device: the device
  # count is fixed when JAX starts. One test rather than one per mesh, so that
  # pytest-xdist workers do not each start the subprocess.
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # the script asks for 8 host devices
  result = subprocess.run(
    [sys.executable, str(_SCRIPT)], capture_output=True, text=True, env=env, timeout=600
  )
  assert result.returncode == 0, result.stderr[-4000:]
  reports = {
    (report["mode"], report["layout"]): report
    for report in (json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{")
  }
  assert set(reports) == _CONFIGS, result.stdout

  failures = [
    report
    for report in reports.values()
    if not (report["max_error"] <= 1e-6 and report["same_decisions"])
  ]
  assert not failures, failures
  # Under Explicit axes the shardings are part of the types: the per-task
  # gradients stay split over tasks, the updates over the model axis.
  assert reports["Explicit", "task"]["spec"] == "P('task', None, None)"
  assert all("'model'" in spec for spec in reports["Explicit", "model"]["spec"])
