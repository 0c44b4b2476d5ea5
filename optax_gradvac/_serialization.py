"""msgpack serialization of optimizer states that hold typed PRNG keys."""

import inspect
import types
from typing import Any, TypeVar

import jax

from optax_gradvac import _checks

Tree = TypeVar("Tree")


def _serialization(name: str) -> types.ModuleType:
  """``flax.serialization``, imported when first needed: flax is an optional extra."""
  try:
    from flax import serialization
  except ImportError as error:
    raise ImportError(
      f"{name} needs flax (flax.serialization): pip install 'optax_gradvac[flax]'."
    ) from error
  return serialization


def _wrap_key_data(data: Any, dtype: Any) -> jax.Array:
  """Typed keys of ``dtype`` (``key<fry>``, ...) from their raw ``uint32`` data."""
  if "dtype" in inspect.signature(jax.random.wrap_key_data).parameters:
    return jax.random.wrap_key_data(data, dtype=dtype)
  # jax before 0.8 takes the implementation, which the key dtype holds.
  return jax.random.wrap_key_data(data, impl=dtype._impl)


def _is_key(leaf: Any) -> bool:
  dtype = getattr(leaf, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def to_bytes(tree: Any) -> bytes:
  """:func:`flax.serialization.to_bytes` for trees that hold typed PRNG keys.

  Needs flax (``pip install 'optax_gradvac[flax]'``).

  A :class:`GradVacState` keeps a typed key, which msgpack cannot encode:
  every key is stored as its raw ``uint32`` data (:func:`jax.random.key_data`).
  Read the bytes back with :func:`from_bytes`.

  Args:
    tree: any tree flax can serialize, e.g. an optimizer state or
      ``{"params": params, "opt_state": opt_state}``; typed keys are allowed.

  Returns:
    The msgpack-encoded bytes.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import optax_gradvac as ogv
    >>> tx = optax.chain(ogv.gradvac(num_tasks=2), optax.adam(1e-3))
    >>> params = {"w": jnp.zeros(3)}
    >>> data = ogv.to_bytes(tx.init(params))
    >>> state = ogv.from_bytes(jax.eval_shape(tx.init, params), data)
    >>> print(state[0].key.dtype, state[0].targets.shape)
    key<fry> (1, 2, 2)
  """
  return _serialization("to_bytes").to_bytes(
    jax.tree.map(lambda leaf: jax.random.key_data(leaf) if _is_key(leaf) else leaf, tree)
  )


def from_bytes(target: Tree, encoded: bytes) -> Tree:
  """:func:`flax.serialization.from_bytes` for bytes written by :func:`to_bytes`.

  Typed keys are rebuilt with the PRNG implementation of the target's keys.

  Args:
    target: a tree with the structure to restore, e.g. a fresh
      ``tx.init(params)`` or ``jax.eval_shape(tx.init, params)``.
    encoded: the bytes from :func:`to_bytes`.

  Returns:
    The restored tree, with ``target``'s structure; arrays are on the host
    (place sharded states with ``jax.device_put``, or checkpoint them with
    orbax-checkpoint, which keeps shardings).
  """
  serialization = _serialization("from_bytes")
  saved = serialization.msgpack_restore(encoded)
  _checks.check_restorable("from_bytes", serialization.to_state_dict(target), saved)
  restored = serialization.from_state_dict(target, saved)
  return jax.tree.map(
    lambda leaf, value: _wrap_key_data(value, leaf.dtype) if _is_key(leaf) else value,
    target,
    restored,
  )
