"""Smoke tests: every benchmark script runs at tiny sizes and prints its table."""

import importlib.util
import pathlib
import sys
from types import ModuleType

import pytest

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


def load(name: str) -> ModuleType:
  """Imports `benchmarks/<name>.py` as the scripts see each other: by bare name."""
  if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
  spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
  "name",
  [
    "transform",
    "train_step",
    "compile_memory",
    "peers",
    "peers_losses",
    "low_memory",
    "streaming",
    "in_scan",
    "accelerator",
  ],
)
def test_quick_run_prints_a_table(name: str, capsys: pytest.CaptureFixture[str]) -> None:
  if name in ("peers", "peers_losses"):
    pytest.importorskip("torchjd")
  tables = load(name).main(["--quick"]).split("\n\n")
  printed = capsys.readouterr().out
  for table in tables:
    assert table in printed
    lines = table.splitlines()
    assert lines[0].startswith("| ") and lines[1].startswith("|---|")
    assert len(lines) > 2
  if name in ("peers", "peers_losses"):
    assert "| NO |" not in printed  # the agreement check with torchjd
