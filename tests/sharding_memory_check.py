"""Per-device scratch and collectives of sharded training steps, on 8 host devices.

Run by ``test_sharding_memory.py`` in a subprocess, because the device count must
be set before JAX starts. Compiles (runs nothing) the stacked step (per-task
gradients, ``gradvac``, Adam) and the plain step (gradient of the summed loss,
Adam) of ``benchmarks/sharding.py`` for the FSDP, task-sharded and data-parallel
layouts under Auto and Explicit axes, and prints one JSON object per configuration: temporary
bytes per device, the largest result of each collective (elements), the largest
parameter and the parameter count.
"""

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "benchmarks"))

import sharding
from jax.sharding import AxisType

NUM_TASKS, NUM_LAYERS, WIDTH, BATCH = 8, 4, 256, 32


def main() -> None:
  import jax

  assert jax.device_count() == 8, jax.devices()
  for layout in ("fsdp", "task", "data"):
    for axis_type in (AxisType.Auto, AxisType.Explicit):
      report = {"layout": layout, "mode": axis_type.name}
      report.update(
        sharding.compile_both(
          layout,
          axis_type,
          num_tasks=NUM_TASKS,
          num_layers=NUM_LAYERS,
          width=WIDTH,
          batch=BATCH,
        )
      )
      report.update(
        num_tasks=NUM_TASKS,
        devices=jax.device_count(),
        num_params=NUM_LAYERS * (WIDTH * WIDTH + WIDTH),
        largest_param=WIDTH * WIDTH,
      )
      print(json.dumps(report), flush=True)


if __name__ == "__main__":
  main()
