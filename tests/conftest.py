"""Hypothesis profiles for the property tests (the tests marked ``@given``).

``default``: what CI runs, 10 examples per property test, no deadline (the
first example of each property compiles). ``deep``: a long, opt-in search
with 100x as many examples, for before a release or after touching the
algorithm. The deep search is one command (tens of minutes on 2 CPU cores):

    HYPOTHESIS_PROFILE=deep python -m pytest tests -m hypothesis -p no:xdist

``--hypothesis-profile=deep`` selects it too, and wins over the variable.
"""

import atexit
import importlib.metadata
import os
import shutil
import tempfile

from hypothesis import HealthCheck, settings

# One XLA compilation cache for the run: this process, its pytest-xdist workers (which
# inherit the environment), the 8-device subprocesses and the notebooks' kernels. The
# suite compiles the same programs many times over (every test builds its own
# transformation, so jax's in-memory caches miss); a program compiled once is then
# loaded, not compiled again. Set before jax is imported, which reads these variables.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="optax_gradvac-tests-xla-")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
# A directory for the run, shared by the pytest-xdist workers (tests/host_devices.py).
if "OPTAX_GRADVAC_TESTS_RUN_DIR" not in os.environ:
  _run_dir = tempfile.mkdtemp(prefix="optax_gradvac-tests-run-")
  atexit.register(shutil.rmtree, _run_dir, ignore_errors=True)
  os.environ["OPTAX_GRADVAC_TESTS_RUN_DIR"] = _run_dir

# XLA:CPU compiles the suite's thousands of small programs at the lowest backend
# optimization, with the legacy elemental emitters where jaxlib still has them: about
# 2-5x less compile time, the same HLO (fusion, scheduling and buffer assignment, hence
# memory_analysis and the collectives, are unchanged) and results equal to rounding.
# tests/test_compiled_task_gradients.py compiles with XLA's defaults, which users get.
# Read by XLA when jax first starts a backend; inherited by every subprocess.
_JAXLIB = tuple(int(part) for part in importlib.metadata.version("jaxlib").split(".")[:2])
FAST_COMPILE_FLAGS = {"xla_backend_optimization_level": "0"}
if _JAXLIB < (0, 11):
  FAST_COMPILE_FLAGS["xla_cpu_use_fusion_emitters"] = "false"
_xla_flags = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
  [_xla_flags]
  + [f"--{name}={value}" for name, value in FAST_COMPILE_FLAGS.items() if name not in _xla_flags]
).strip()

settings.register_profile("default", max_examples=10, deadline=None)
settings.register_profile(
  "deep",
  max_examples=1000,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
  print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Scripts that the sharding tests run in subprocesses with 8 host devices: importing
# them (as --doctest-modules would) sets XLA_FLAGS for the whole test process.
collect_ignore = [
  "sharding_check.py",
  "sharding_memory_check.py",
  "sharding_low_memory_check.py",
  "sharded_task_gradients_check.py",
]

# Keras reads its backend once, when it is first imported (tests/test_docs.py runs
# the keras guide): the JAX one, in every process, xdist workers included.
os.environ["KERAS_BACKEND"] = "jax"
