"""Shared timing and reporting helpers for the benchmark scripts."""

import argparse
import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence

import jax


def parse_args(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
  """Parses the options every benchmark script shares."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not data")
  parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per case")
  return parser.parse_args(argv)


def interleaved_medians(
  functions: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1
) -> dict[str, float]:
  """Median wall time in seconds of each zero-argument function.

  The functions take turns within every repetition, and the order rotates from
  one repetition to the next, so that a slow spell of a shared machine falls on
  all of them alike rather than on whichever happened to run then. Each result
  is passed through `jax.block_until_ready`, so asynchronous dispatch is timed to
  completion.
  """
  names = list(functions)
  for _ in range(warmup):
    for name in names:
      jax.block_until_ready(functions[name]())
  times: dict[str, list[float]] = {name: [] for name in names}
  for repeat in range(repeats):
    shift = repeat % len(names)
    for name in names[shift:] + names[:shift]:
      start = time.perf_counter()
      jax.block_until_ready(functions[name]())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(values) for name, values in times.items()}


def timed(function: Callable[[], object]) -> tuple[object, float]:
  """Runs a function once; returns its result and its wall time in seconds."""
  start = time.perf_counter()
  result = function()
  return result, time.perf_counter() - start


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
  """Formats rows as a markdown table; floats get three significant digits."""

  def cell(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)

  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
  return "\n".join(lines)


def machine_line() -> str:
  """One line naming the machine and the JAX version the figures come from."""
  cpu = platform.machine()
  with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line), cpu)
  return (
    f"{cpu}, {os.cpu_count()} cores, jax {jax.__version__} on {jax.default_backend()}, "
    f"python {platform.python_version()}"
  )
