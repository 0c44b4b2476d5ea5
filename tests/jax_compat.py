"""What the tests need from jax, on every jax the project supports (0.7.2 and newer)."""

import jax

# A context manager that turns float64 on or off: `jax.enable_x64` from jax 0.8,
# `jax.experimental.enable_x64` before.
if hasattr(jax, "enable_x64"):
  enable_x64 = jax.enable_x64
else:
  from jax.experimental import enable_x64 as enable_x64
