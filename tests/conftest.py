"""Hypothesis profiles for the property tests (the tests marked ``@given``).

``default``: what CI runs, 20 examples per property test, no deadline (the
first example of each property compiles). ``deep``: a long, opt-in search
with 50x as many examples, for before a release or after touching the
algorithm. The deep search is one command (tens of minutes on 2 CPU cores):

    HYPOTHESIS_PROFILE=deep python -m pytest tests -m hypothesis -p no:xdist

``--hypothesis-profile=deep`` selects it too, and wins over the variable.
"""

import os

from hypothesis import HealthCheck, settings

settings.register_profile("default", max_examples=20, deadline=None)
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


def pytest_configure(config):
  """Under pytest-xdist, tests marked ``xdist_group`` run on one worker each group.

  The 8-device checks start one subprocess per module (a module-scoped fixture); with
  xdist's default ``load`` distribution every worker that runs one of a module's tests
  would start it again.
  """
  if getattr(config.option, "dist", "no") == "load":
    config.option.dist = "loadgroup"
