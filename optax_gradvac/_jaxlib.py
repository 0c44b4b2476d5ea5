"""A warning at import for a jaxlib release known to miscompile per-task gradients."""

import importlib.metadata
import os
import warnings

# jaxlib releases whose XLA:CPU computes wrong per-task gradients, and the XLA flag
# that avoids it. pyproject.toml excludes them; they can still come from an
# environment built without the project's dependency ranges.
MISCOMPILING = {"0.10.2": "--xla_cpu_experimental_ynn_fusion_type="}
REPORT = "https://optax-gradvac.github.io/optax_gradvac/bug_reports/jaxlib_0_10_2.html"


def miscompile_warning(version: str, xla_flags: str) -> str | None:
  """The warning for jaxlib ``version`` under ``XLA_FLAGS=xla_flags``, or ``None``."""
  flag = MISCOMPILING.get(version)
  if flag is None or flag in xla_flags.split():
    return None
  return (
    f"jaxlib {version}'s XLA:CPU miscompiles jit(vmap(vjp)) on AVX-512 machines: "
    "per-task gradients from optax_gradvac.segment_value_and_grad (and jax.jacrev) can "
    "be wrong by 20% or more, with the losses right. Install another jaxlib "
    f"(pip install 'jaxlib!={version}'), or set XLA_FLAGS={flag} before jax starts. "
    f"See {REPORT}"
  )


def warn_if_miscompiling() -> None:
  """Warns once, at import, if the installed jaxlib is one of :data:`MISCOMPILING`."""
  try:
    version = importlib.metadata.version("jaxlib")
  except importlib.metadata.PackageNotFoundError:
    return
  message = miscompile_warning(version, os.environ.get("XLA_FLAGS", ""))
  if message is not None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
