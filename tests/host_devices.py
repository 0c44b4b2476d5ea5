"""Runs a check script on 8 host CPU devices and reads the JSON reports it prints."""

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Iterable
from typing import Any


def reports(
  script: pathlib.Path, key: Callable[[dict], Any], expected: Iterable[Any], *, timeout: int
) -> dict[Any, dict]:
  """The reports of ``script`` (one JSON object per line), by ``key``; all ``expected`` found.

  A subprocess, so that the calling process keeps its single device: the device
  count must be set before JAX starts.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  result = subprocess.run(
    [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=timeout
  )
  assert result.returncode == 0, result.stderr[-4000:]
  found = {
    key(report): report
    for report in (json.loads(line) for line in result.stdout.splitlines() if line[:1] == "{")
  }
  assert set(found) == set(expected), result.stdout
  return found
