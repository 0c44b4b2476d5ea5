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
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")

# The worker's row for its progress bar (0 in the main process).
_slot = 0


def default_workers(num_runs: int) -> int:
  """The number of cores this process may use, at most ``num_runs``."""
  return max(1, min(len(os.sched_getaffinity(0)), num_runs))


def worker_slot() -> int:
  """This worker's index, ``0 .. workers - 1`` (0 outside a worker): its progress-bar row."""
  return _slot


def _start_worker(slots: Any) -> None:
  global _slot
  _slot = slots.get()


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
    workers, mp_context=context, initializer=_start_worker, initargs=(slots,)
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
