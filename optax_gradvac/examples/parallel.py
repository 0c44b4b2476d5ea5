"""Independent training runs side by side, one process per CPU core.

A training step of the multilingual model keeps about one core busy (XLA:CPU finds little
to split in its small matmuls), so runs of different methods or seeds go faster side by
side in separate processes than one after another. Each worker is a fresh interpreter
(``spawn``): it builds its own data, compiles its own programs and trains; only the run's
description goes in and its :class:`~optax_gradvac.examples.train.History` comes out.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# The worker's row for its progress bar (0 in the main process).
_slot = 0


def available_cores() -> int:
  """The number of cores this process may run on."""
  if hasattr(os, "sched_getaffinity"):
    return len(os.sched_getaffinity(0))
  return os.cpu_count() or 1


def default_workers(num_runs: int) -> int:
  """How many runs to train at once: one per core, or all of them if that is faster.

  ``num_runs`` runs of about equal length on ``C`` cores take ``ceil(num_runs / C)`` run
  lengths one per core, but ``num_runs / C`` all at once, the cores shared evenly: 3 runs on
  2 cores, 1.5 run lengths instead of 2. All at once is chosen up to 1.5 runs per core
  (each run holds its own memory, about 2 GB at the default size).

  Args:
    num_runs: the number of runs.

  Returns:
    The number of worker processes, between 1 and ``num_runs``.
  """
  cores = available_cores()
  return max(1, num_runs if num_runs <= 1.5 * cores else cores)


def worker_slot() -> int:
  """This worker's index, ``0 .. workers - 1`` (0 outside a worker): its progress-bar row."""
  return _slot


def _start_worker(slots: Any, parent: int) -> None:
  global _slot
  _slot = slots.get()
  # A worker whose parent was killed (not interrupted with its process group, which ends
  # the workers too) would train on for nothing: it exits as soon as it is orphaned.
  threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()


def _exit_when_orphaned(parent: int) -> None:
  while os.getppid() == parent:
    time.sleep(1.0)
  os._exit(1)


def map_runs(
  function: Callable[[Item], Result],
  items: Sequence[Item],
  *,
  workers: int = 1,
  on_result: Callable[[int, Result], None] | None = None,
) -> list[Result]:
  """``[function(item) for item in items]``, in ``workers`` processes.

  With one worker everything runs in this process, in order. Otherwise the items are
  handed out in order to the first free worker; the results still come back in the order of
  ``items``.

  Args:
    function: a module-level function (the workers import it by name).
    items: its arguments, each picklable.
    workers: how many processes run at once.
    on_result: called in this process as ``on_result(index, result)`` as soon as each
      result arrives (e.g. to save it), in the order they finish.

  Returns:
    The results, in the order of ``items``.

  Raises:
    ValueError: if ``workers`` is not positive.
  """
  if workers < 1:
    raise ValueError(f"workers must be positive, got {workers}")
  results: list[Any] = [None] * len(items)
  if workers == 1 or len(items) <= 1:
    for index, item in enumerate(items):
      results[index] = function(item)
      if on_result is not None:
        on_result(index, results[index])
    return results
  context = multiprocessing.get_context("spawn")
  slots = context.Queue()
  for slot in range(workers):
    slots.put(slot)
  with futures.ProcessPoolExecutor(
    workers, mp_context=context, initializer=_start_worker, initargs=(slots, os.getpid())
  ) as pool:
    pending = {pool.submit(function, item): index for index, item in enumerate(items)}
    try:
      for future in futures.as_completed(pending):
        index = pending[future]
        results[index] = future.result()
        if on_result is not None:
          on_result(index, results[index])
    except BaseException:
      for future in pending:
        future.cancel()
      raise
  return results
