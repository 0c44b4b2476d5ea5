"""Runs a check script on 8 host CPU devices and reads the JSON reports it prints."""

import fcntl
import functools
import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any


@functools.cache
def _stdout(script: pathlib.Path, timeout: int) -> str:
  # Once per test run: pytest-xdist may hand a module's tests to several workers, and
  # pytest tears a module's fixtures down whenever another module's test runs in between.
  # The workers share the run's directory (tests/conftest.py); the first to come runs the
  # script, the others wait for its output.
  run_dir = os.environ.get("OPTAX_GRADVAC_TESTS_RUN_DIR")
  if run_dir is None:
    return _run(script, timeout)
  output = pathlib.Path(run_dir) / f"{script.stem}.stdout"
  with open(output.with_suffix(".lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not output.exists():
      output.write_text(_run(script, timeout))
    return output.read_text()


def _run(script: pathlib.Path, timeout: int) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-4000:]
  return result.stdout


def reports(
  script: pathlib.Path, key: Callable[[dict], Any], expected: Iterable[Any], *, timeout: int
) -> dict[Any, dict]:
  """The reports of ``script`` (one JSON object per line), by ``key``; all ``expected`` found.

  A subprocess, so that the calling process keeps its single device: the device
  count must be set before JAX starts. It runs once per test run.
  """
  stdout = _stdout(script, timeout)
  found = {
    key(report): report
    for report in (json.loads(line) for line in stdout.splitlines() if line[:1] == "{")
  }
  assert set(found) == set(expected), stdout
  return found
